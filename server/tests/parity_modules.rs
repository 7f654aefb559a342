//! Parity of the tokenizers, CLIP, T5 and VAE with transformers / diffusers, on the tiny random
//! components that `tests/parity/tiny_components.py` writes (fp32, CPU).
//!
//! Data: `$DENOISED_PARITY_DATA/modules` or `<repo>/tests/parity/data/modules`; generate it with
//! `make parity-data`. Missing data fails the tests.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use denoised_server::models::clip::ClipTextModel;
use denoised_server::models::t5::T5EncoderModel;
use denoised_server::models::tokenizer::{ClipTokenizer, T5Tokenizer};
use denoised_server::models::vae::AutoencoderKL;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Largest accepted |rust - python| for model outputs.
const TOLERANCE: f64 = 1e-4;

fn modules_dir() -> PathBuf {
    let data = std::env::var_os("DENOISED_PARITY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/parity/data"));
    let dir = data.join("modules");
    assert!(
        dir.join("manifest.json").is_file(),
        "parity data missing: no {}; run `make parity-data` \
         (or `python tests/parity/tiny_components.py --out tests/parity/data`)",
        dir.join("manifest.json").display()
    );
    dir
}

struct Case {
    dir: PathBuf,
    name: String,
    entry: Value,
    reference: HashMap<String, Tensor>,
}

impl Case {
    fn tensor(&self, key: &str) -> &Tensor {
        self.reference
            .get(key)
            .unwrap_or_else(|| panic!("{}: reference has no `{key}`", self.name))
    }

    fn model_dir(&self) -> PathBuf {
        self.dir.join(&self.name)
    }
}

/// The manifest entries of one section with their reference tensors.
fn cases(section: &str) -> (Vec<Case>, Value) {
    let dir = modules_dir();
    let manifest_path = dir.join("manifest.json");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let entries = manifest[section]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no `{section}` list", manifest_path.display()));
    assert!(
        !entries.is_empty(),
        "{}: empty `{section}`",
        manifest_path.display()
    );
    let cases = entries
        .iter()
        .map(|entry| {
            let reference_path = dir.join(entry["reference"].as_str().unwrap());
            let reference = Tensor::read_safetensors(&reference_path)
                .unwrap_or_else(|e| panic!("{}: {e}", reference_path.display()))
                .into_iter()
                .collect();
            Case {
                dir: dir.clone(),
                name: entry["name"].as_str().unwrap().to_owned(),
                entry: entry.clone(),
                reference,
            }
        })
        .collect();
    (cases, manifest)
}

/// Max |a - b| after checking the shapes agree.
fn max_abs_diff(what: &str, actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let diff = (actual.to_kind(Kind::Double) - expected.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    println!("{what}: max |Δ| = {diff:.3e}");
    diff
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor) {
    let diff = max_abs_diff(what, actual, expected);
    assert!(
        diff <= TOLERANCE,
        "{what}: max |Δ| {diff:e} > {TOLERANCE:e}"
    );
}

enum AnyTokenizer {
    Clip(ClipTokenizer),
    T5(T5Tokenizer),
}

impl AnyTokenizer {
    fn encode(&self, text: &str, max_len: usize) -> Vec<i64> {
        match self {
            Self::Clip(t) => t.encode(text, "prompt", max_len).unwrap(),
            Self::T5(t) => t.encode(text, "prompt", max_len).unwrap(),
        }
    }

    fn max_length(&self) -> usize {
        match self {
            Self::Clip(t) => t.max_length(),
            Self::T5(t) => t.max_length(),
        }
    }
}

#[test]
fn tokenizers_match_transformers() {
    let (cases, manifest) = cases("tokenizers");
    let prompts: Vec<&str> = manifest["prompts"]
        .as_array()
        .expect("manifest has `prompts`")
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for case in &cases {
        let dir = case.model_dir();
        let tokenizer = match case.entry["kind"].as_str() {
            Some("clip") => AnyTokenizer::Clip(ClipTokenizer::load(&dir).unwrap()),
            Some("t5") => AnyTokenizer::T5(T5Tokenizer::load(&dir).unwrap()),
            other => panic!("{}: unknown tokenizer kind {other:?}", case.name),
        };
        assert_eq!(
            tokenizer.max_length() as u64,
            case.entry["model_max_length"].as_u64().unwrap(),
            "{}: model_max_length",
            case.name
        );
        for len in case.entry["max_lengths"].as_array().unwrap() {
            let len = len.as_u64().unwrap() as usize;
            let expected = case.tensor(&format!("ids_{len}"));
            for (i, prompt) in prompts.iter().enumerate() {
                let expected = Vec::<i64>::try_from(expected.get(i as i64)).unwrap();
                assert_eq!(
                    tokenizer.encode(prompt, len),
                    expected,
                    "{} max_len {len}, prompt {prompt:?}",
                    case.name
                );
            }
            println!(
                "{} max_len {len}: {} prompts identical",
                case.name,
                prompts.len()
            );
        }
    }
}

#[test]
fn clip_text_model_matches_transformers() {
    let _guard = tch::no_grad_guard();
    for case in cases("clip").0 {
        let model = ClipTextModel::load(&case.model_dir(), Device::Cpu, Kind::Float).unwrap();
        let (last_hidden, pooled) = model.forward(case.tensor("input_ids"));
        assert_close(
            &format!("{} last_hidden", case.name),
            &last_hidden,
            case.tensor("last_hidden"),
        );
        assert_close(
            &format!("{} pooled", case.name),
            &pooled,
            case.tensor("pooled"),
        );
    }
}

#[test]
fn t5_encoder_matches_transformers() {
    let _guard = tch::no_grad_guard();
    for case in cases("t5").0 {
        let model = T5EncoderModel::load(&case.model_dir(), Device::Cpu, Kind::Float).unwrap();
        let hidden = model.forward(case.tensor("input_ids"));
        assert_close(
            &format!("{} hidden", case.name),
            &hidden,
            case.tensor("hidden"),
        );
    }
}

#[test]
fn vae_matches_diffusers() {
    let _guard = tch::no_grad_guard();
    for case in cases("vae").0 {
        let vae = AutoencoderKL::load(&case.model_dir(), Device::Cpu, Kind::Float).unwrap();
        assert!(
            vae.config().shift_factor.is_some(),
            "{}: FLUX-style VAE has a shift",
            case.name
        );
        let decoded = vae.decode(case.tensor("latent"));
        assert_close(
            &format!("{} decode", case.name),
            &decoded,
            case.tensor("decoded"),
        );
        let mean = vae.encode(case.tensor("image"));
        assert_close(
            &format!("{} encode mean", case.name),
            &mean,
            case.tensor("encoded_mean"),
        );
    }
}

/// Half-precision runs (FLUX runs its encoders and VAE in bf16) stay near the f32 reference; in f16
/// the T5 feed-forward output projection runs in f32, as transformers keeps it. Bounds are ~2.5x
/// the measured error (bf16 ~4e-2, f16 ~5e-3 on outputs of magnitude ~1).
#[test]
fn half_precision_stays_close() {
    let _guard = tch::no_grad_guard();
    for (kind, tolerance) in [(Kind::BFloat16, 0.1), (Kind::Half, 0.0125)] {
        let check = |what: String, actual: &Tensor, expected: &Tensor| {
            assert_eq!(actual.kind(), kind, "{what}: dtype");
            let diff = max_abs_diff(&what, actual, expected);
            assert!(
                diff <= tolerance,
                "{what}: max |Δ| {diff:e} > {tolerance:e}"
            );
        };
        let what = |case: &Case, out: &str| format!("{} {out} {kind:?}", case.name);
        for case in cases("clip").0 {
            let model = ClipTextModel::load(&case.model_dir(), Device::Cpu, kind).unwrap();
            let (_, pooled) = model.forward(case.tensor("input_ids"));
            check(what(&case, "pooled"), &pooled, case.tensor("pooled"));
        }
        for case in cases("t5").0 {
            let model = T5EncoderModel::load(&case.model_dir(), Device::Cpu, kind).unwrap();
            let hidden = model.forward(case.tensor("input_ids"));
            check(what(&case, "hidden"), &hidden, case.tensor("hidden"));
        }
        for case in cases("vae").0 {
            let vae = AutoencoderKL::load(&case.model_dir(), Device::Cpu, kind).unwrap();
            let decoded = vae.decode(&case.tensor("latent").to_kind(kind));
            check(what(&case, "decode"), &decoded, case.tensor("decoded"));
        }
    }
}

/// The engine moves loaded models and tokenizers to its worker threads.
#[test]
fn components_are_send() {
    fn send<T: Send>() {}
    send::<ClipTokenizer>();
    send::<T5Tokenizer>();
    send::<ClipTextModel>();
    send::<T5EncoderModel>();
    send::<AutoencoderKL>();
}
