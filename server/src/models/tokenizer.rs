//! The two FLUX tokenizers: CLIP byte-level BPE (`tokenizer/`) and T5 SentencePiece Unigram
//! (`tokenizer_2/`), both through the `tokenizers` crate so the ids are those of transformers.
//!
//! `encode` gives what FluxPipeline asks transformers for: `padding="max_length",
//! max_length=max_len, truncation=True` — the text's tokens cut so that they fit together with the
//! special tokens, the special tokens added, then right-padded with the pad id. A text the
//! tokenizer refuses (e.g. a character its vocabulary cannot represent when it has no unknown
//! token) is the caller's input: [`ModelError::InvalidInput`] naming the request field.
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PostProcessor, SplitDelimiterBehavior, Tokenizer, TruncationDirection,
};

use super::error::{ModelError, Result};

const CLIP_BOS: &str = "<|startoftext|>";
const CLIP_EOS: &str = "<|endoftext|>";
/// CLIP's pre-tokenizer pattern (transformers' `CLIPTokenizer`): special tokens, English
/// contractions, letter runs, single digits, runs of other non-space characters.
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// transformers' `model_max_length` when a CLIP tokenizer_config does not say.
const CLIP_DEFAULT_MAX_LENGTH: usize = 77;
/// The FLUX default `max_sequence_length`, used when a T5 tokenizer_config does not say.
const T5_DEFAULT_MAX_LENGTH: usize = 512;

/// CLIP tokenizer: `<|startoftext|>` + BPE tokens + `<|endoftext|>`, padded with the pad token.
pub struct ClipTokenizer {
    inner: PaddedTokenizer,
}

impl ClipTokenizer {
    /// Loads `dir/tokenizer.json` if present, else builds CLIP's BPE from `vocab.json` +
    /// `merges.txt` exactly as transformers' `CLIPTokenizer` does. Special tokens and
    /// `model_max_length` come from `special_tokens_map.json` / `tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let specials = SpecialTokens::read(dir)?;
        let json = dir.join("tokenizer.json");
        let (tokenizer, path) = if json.exists() {
            (load_tokenizer_json(&json)?, json)
        } else {
            let vocab = dir.join("vocab.json");
            (
                build_clip_bpe(&vocab, &dir.join("merges.txt"), &specials)?,
                vocab,
            )
        };
        let pad = specials.pad.as_deref().unwrap_or(CLIP_EOS);
        let max_length = specials.model_max_length.unwrap_or(CLIP_DEFAULT_MAX_LENGTH);
        Ok(Self {
            inner: PaddedTokenizer::new(tokenizer, path, pad, max_length)?,
        })
    }

    /// Token ids of `text` (the request's `field`), truncated and padded to exactly `max_len`
    /// (see the module docs).
    pub fn encode(&self, text: &str, field: &str, max_len: usize) -> Result<Vec<i64>> {
        self.inner.encode(text, field, max_len)
    }

    /// `model_max_length` of the tokenizer config (77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.inner.max_length
    }
}

/// T5 tokenizer: Unigram tokens + `</s>`, padded with `<pad>`.
pub struct T5Tokenizer {
    inner: PaddedTokenizer,
}

impl T5Tokenizer {
    /// Loads `dir/tokenizer.json`; the pad token and `model_max_length` come from
    /// `special_tokens_map.json` / `tokenizer_config.json` (defaults `<pad>`, 512).
    pub fn load(dir: &Path) -> Result<Self> {
        let specials = SpecialTokens::read(dir)?;
        let path = dir.join("tokenizer.json");
        let tokenizer = load_tokenizer_json(&path)?;
        let pad = specials.pad.as_deref().unwrap_or("<pad>");
        let max_length = specials.model_max_length.unwrap_or(T5_DEFAULT_MAX_LENGTH);
        Ok(Self {
            inner: PaddedTokenizer::new(tokenizer, path, pad, max_length)?,
        })
    }

    /// Token ids of `text` (the request's `field`), truncated and padded to exactly `max_len`
    /// (see the module docs).
    pub fn encode(&self, text: &str, field: &str, max_len: usize) -> Result<Vec<i64>> {
        self.inner.encode(text, field, max_len)
    }

    /// `model_max_length` of the tokenizer config (512 for FLUX's T5).
    pub fn max_length(&self) -> usize {
        self.inner.max_length
    }
}

/// A tokenizer whose post-processor adds the special tokens, plus the fixed-length policy.
struct PaddedTokenizer {
    tokenizer: Tokenizer,
    /// Special tokens the post-processor adds to one sequence (2 for CLIP, 1 for T5).
    num_special: usize,
    pad_id: i64,
    max_length: usize,
    /// The file the tokenizer came from, for messages.
    path: PathBuf,
}

impl PaddedTokenizer {
    fn new(mut tokenizer: Tokenizer, path: PathBuf, pad: &str, max_length: usize) -> Result<Self> {
        // A saved tokenizer.json may carry the padding / truncation of its last use; length
        // policy is `encode`'s alone.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| tokenizer_error(&path, e))?;
        let pad_id = tokenizer.token_to_id(pad).ok_or_else(|| {
            tokenizer_error(&path, format!("pad token `{pad}` is not in the vocabulary"))
        })?;
        let num_special = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        Ok(Self {
            tokenizer,
            num_special,
            pad_id: i64::from(pad_id),
            max_length,
            path,
        })
    }

    /// `max_len` ids: the text's tokens cut to `max_len - num_special`, the special tokens, padding.
    /// A `max_len` below the number of special tokens keeps the first `max_len` ids.
    fn encode(&self, text: &str, field: &str, max_len: usize) -> Result<Vec<i64>> {
        let refused = |e: tokenizers::Error| {
            // Which file refused is for the operator's log, not the caller's message.
            tracing::debug!(tokenizer = %self.path.display(), "refused the `{field}`: {e}");
            ModelError::invalid_input(field, format!("the tokenizer refuses it: {e}"))
        };
        let mut encoding = self.tokenizer.encode(text, false).map_err(refused)?;
        encoding.truncate(
            max_len.saturating_sub(self.num_special),
            0,
            TruncationDirection::Right,
        );
        let encoding = self
            .tokenizer
            .post_process(encoding, None, true)
            .map_err(refused)?;
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
        ids.resize(max_len, self.pad_id);
        Ok(ids)
    }
}

fn tokenizer_error(path: &Path, message: impl ToString) -> ModelError {
    ModelError::Tokenizer {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn load_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(tokenizer_error(path, "file not found"));
    }
    Tokenizer::from_file(path).map_err(|e| tokenizer_error(path, e))
}

/// Special tokens and length of a transformers tokenizer folder.
struct SpecialTokens {
    bos: Option<String>,
    eos: Option<String>,
    unk: Option<String>,
    pad: Option<String>,
    model_max_length: Option<usize>,
}

impl SpecialTokens {
    /// Reads `tokenizer_config.json` then `special_tokens_map.json` (which wins, as in
    /// transformers' legacy loading); both are optional.
    fn read(dir: &Path) -> Result<Self> {
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let token = |key: &str| {
            [&map, &config]
                .into_iter()
                .flatten()
                .find_map(|json| token_content(json.get(key)?))
        };
        // transformers writes a huge sentinel (int(1e30)) for "no limit"; such a value or a
        // non-integer one means "not given".
        let model_max_length = config
            .as_ref()
            .and_then(|c| c.get("model_max_length")?.as_u64())
            .and_then(|n| usize::try_from(n).ok());
        Ok(Self {
            bos: token("bos_token"),
            eos: token("eos_token"),
            unk: token("unk_token"),
            pad: token("pad_token"),
            model_max_length,
        })
    }
}

/// A special token entry: either the token itself or an `AddedToken` object with `content`.
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        super::weights::read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// CLIP's tokenizer as transformers builds it from `vocab.json` + `merges.txt`: NFC, whitespace
/// runs to one space, lower-case; CLIP's split regex then GPT-2 byte-level mapping; BPE with a
/// `</w>` end-of-word suffix; bos/eos around the sequence.
fn build_clip_bpe(vocab: &Path, merges: &Path, specials: &SpecialTokens) -> Result<Tokenizer> {
    let utf8 = |p: &Path| {
        p.to_str()
            .map(str::to_owned)
            .ok_or_else(|| tokenizer_error(p, "path is not valid UTF-8"))
    };
    for file in [vocab, merges] {
        if !file.exists() {
            return Err(tokenizer_error(
                file,
                "file not found (and no tokenizer.json beside it)",
            ));
        }
    }
    let bos = specials.bos.as_deref().unwrap_or(CLIP_BOS);
    let eos = specials.eos.as_deref().unwrap_or(CLIP_EOS);
    let unk = specials.unk.as_deref().unwrap_or(CLIP_EOS);
    let pad = specials.pad.as_deref().unwrap_or(CLIP_EOS);
    let bpe = BPE::from_file(&utf8(vocab)?, &utf8(merges)?)
        .unk_token(unk.to_owned())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_owned())
        .build()
        .map_err(|e| tokenizer_error(vocab, format!("with {}: {e}", merges.display())))?;

    let pattern_error = |e: Box<dyn std::error::Error + Send + Sync>| tokenizer_error(vocab, e);
    let normalizer = NormalizerSequence::new(vec![
        NFC.into(),
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(pattern_error)?
        .into(),
        Lowercase.into(),
    ]);
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(pattern_error)?;
    let pre_tokenizer =
        PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(normalizer))
        .with_pre_tokenizer(Some(pre_tokenizer));
    let id = |token: &str| {
        tokenizer.token_to_id(token).ok_or_else(|| {
            tokenizer_error(
                vocab,
                format!("special token `{token}` is not in the vocabulary"),
            )
        })
    };
    let processor = RobertaProcessing::new((eos.to_owned(), id(eos)?), (bos.to_owned(), id(bos)?))
        .trim_offsets(false)
        .add_prefix_space(false);
    // transformers registers every special token as an added token matched on the raw text, so e.g.
    // a literal `<|endoftext|>` in a prompt is one token, not BPE pieces.
    let mut added: Vec<AddedToken> = Vec::new();
    for token in [bos, eos, unk, pad] {
        if !added.iter().any(|a| a.content == token) {
            id(token)?;
            added.push(AddedToken::from(token, true));
        }
    }
    tokenizer.with_post_processor(Some(processor));
    tokenizer.add_special_tokens(&added);
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("denoised-tok-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A 6-merge CLIP vocabulary over the letters of "a cat" (ids chosen by hand).
    fn write_tiny_clip(dir: &Path, config: &str) {
        let vocab = r#"{"a":0,"c":1,"t":2,"a</w>":3,"t</w>":4,"ca":5,"cat</w>":6,"!</w>":7,"!":8,"<|startoftext|>":9,"<|endoftext|>":10}"#;
        std::fs::write(dir.join("vocab.json"), vocab).unwrap();
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\nc a\nca t</w>\n").unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
    }

    #[test]
    fn clip_bpe_from_vocab_and_merges_truncates_and_pads() {
        let dir = tempdir("clip");
        write_tiny_clip(
            &dir,
            r#"{"model_max_length": 77, "pad_token": "<|endoftext|>"}"#,
        );
        let tok = ClipTokenizer::load(&dir).unwrap();
        assert_eq!(tok.max_length(), 77);
        // Upper case and repeated spaces are normalised away; "cat" is one merged token.
        assert_eq!(
            tok.encode("A  CAT!", "prompt", 8).unwrap(),
            vec![9, 3, 6, 7, 10, 10, 10, 10]
        );
        // Truncation keeps bos and eos.
        assert_eq!(
            tok.encode("a cat a cat", "prompt", 4).unwrap(),
            vec![9, 3, 6, 10]
        );
        // Special token spelled out in the text stays one token.
        assert_eq!(
            tok.encode("a<|endoftext|>", "prompt", 5).unwrap(),
            vec![9, 3, 10, 10, 10]
        );
    }

    #[test]
    fn clip_pad_token_comes_from_the_special_tokens_map() {
        let dir = tempdir("clip-pad");
        write_tiny_clip(&dir, r#"{"model_max_length": 16}"#);
        std::fs::write(
            dir.join("special_tokens_map.json"),
            r#"{"pad_token": {"content": "!"}}"#,
        )
        .unwrap();
        let tok = ClipTokenizer::load(&dir).unwrap();
        assert_eq!(tok.max_length(), 16);
        assert_eq!(
            tok.encode("cat", "prompt", 5).unwrap(),
            vec![9, 6, 10, 8, 8]
        );
    }

    /// A T5-style Unigram tokenizer over "a" and "b" with no unknown token: it cannot represent
    /// any other character and refuses texts that have one.
    fn write_tiny_t5_without_unk(dir: &Path) {
        let json = r#"{
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                              "prepend_scheme": "always", "split": true},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 0}}],
                "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
            "decoder": null,
            "model": {"type": "Unigram", "unk_id": null, "byte_fallback": false,
                      "vocab": [["<pad>", 0.0], ["</s>", 0.0], ["\u2581", -1.0],
                                ["a", -1.0], ["b", -1.0]]}
        }"#;
        std::fs::write(dir.join("tokenizer.json"), json).unwrap();
    }

    #[test]
    fn a_text_the_tokenizer_refuses_is_invalid_input_naming_the_field() {
        let dir = tempdir("t5-no-unk");
        write_tiny_t5_without_unk(&dir);
        let tok = T5Tokenizer::load(&dir).unwrap();
        // "▁", "a", "▁", "b", "</s>", then padding.
        assert_eq!(
            tok.encode("a b", "prompt", 7).unwrap(),
            vec![2, 3, 2, 4, 1, 0, 0]
        );
        match tok.encode("a c", "negative_prompt", 7) {
            Err(ModelError::InvalidInput { field, message }) => {
                assert_eq!(field, "negative_prompt");
                assert!(message.contains("unk"), "{message}");
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempdir("clip-missing");
        let err = ClipTokenizer::load(&dir).err().unwrap().to_string();
        assert!(err.contains("vocab.json"), "{err}");
        let err = T5Tokenizer::load(&dir).err().unwrap().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
