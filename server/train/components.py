"""Configurations and builders of the default model's components (FLUX architecture, tiny sizes).

The tokenizers are built from the dataset vocabulary (nothing downloaded); the models are the
transformers / diffusers classes FluxPipeline loads, so the saved folder is a real diffusers FLUX
checkpoint. Sizes are chosen to train in minutes on two CPU cores and to stay well under 30 MB.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

import torch

import dataset

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77  # FluxPipeline always pads CLIP prompts to the tokenizer's model_max_length
MAX_SEQUENCE_LENGTH = dataset.DEFAULTS["max_sequence_length"]  # T5 tokens (FluxPipeline max_sequence_length)

CLIP_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu", projection_dim=64,
                   # eos_token_id=2 selects transformers' legacy pooling (argmax of the ids), as in FLUX.
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)
T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)
# 64x64 images -> 16x16x4 latents (three levels: scale factor 4) -> 8x8 = 64 packed tokens of 16 channels.
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=dataset.IMAGE_SIZE, use_quant_conv=False,
                  use_post_quant_conv=False,
                  # no mid-block attention: the VAE trains on crops, and the data needs no global context
                  mid_block_add_attention=False)
# Few wide heads: FLUX has no absolute position embedding, so image tokens learn where they are only
# through RoPE (theta 10000). On an 8x8 token grid only frequencies near 1 rotate usefully; 28 dims
# per spatial axis give four such frequencies (12 dims gave two, and shapes came out as blobs).
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=4 * VAE_CONFIG["latent_channels"], num_layers=2,
                          num_single_layers=4, attention_head_dim=64, num_attention_heads=2,
                          joint_attention_dim=T5_CONFIG["d_model"], pooled_projection_dim=CLIP_CONFIG["hidden_size"],
                          guidance_embeds=False, axes_dims_rope=(8, 28, 28))
# Schnell-style scheduler (static shift, no resolution-dependent shift) with shift 3: a prompt fully
# determines its image, and the hard part is drawing it from (nearly) pure noise, so both training
# and sampling spend more of their steps at high sigma. Training samples sigma through this shift.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False, base_shift=0.5,
                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


# ---------------------------------------------------------------------------------------- tokenizers

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character map (the byte-level alphabet, in CLIP's order)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _learn_bpe(words: Counter) -> tuple[list[str], list[tuple[str, str]]]:
    """Greedy BPE on `</w>`-terminated words until every word is one token; ties broken by the pair
    itself, so the result is deterministic. Returns (new tokens in merge order, merges)."""
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    new_tokens: list[str] = []
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for w, count in words.items():
            s = splits[w]
            for pair in zip(s, s[1:]):
                pairs[pair] += count
        if not pairs:
            return new_tokens, merges
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        if a + b not in new_tokens:
            new_tokens.append(a + b)
        for w, s in splits.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            splits[w] = tuple(out)


def build_clip_tokenizer(out_dir: Path):
    """CLIP byte-level BPE laid out like OpenAI's (256 bytes, the same with `</w>`, merges, then
    `<|startoftext|>`, `<|endoftext|>` as the last ids), with merges learned on the dataset
    vocabulary so every dataset word is a single token; other text still encodes through bytes.
    Saved like FLUX's `tokenizer/` (vocab.json + merges.txt, pad = `<|endoftext|>`)."""
    from transformers import CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    base = alphabet + [c + "</w>" for c in alphabet]
    # Split the words exactly as CLIPTokenizer's normalizer / pre-tokenizer will.
    probe = CLIPTokenizer(vocab={t: i for i, t in enumerate(base + [CLIP_BOS, CLIP_EOS])}, merges=[])
    backend = probe.backend_tokenizer
    words: Counter = Counter()
    for prompt in dataset.all_prompts():
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(prompt)):
            words[word] += 1
    new_tokens, merges = _learn_bpe(words)
    vocab = {t: i for i, t in enumerate(base + new_tokens + [CLIP_BOS, CLIP_EOS])}

    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH, pad_token=CLIP_EOS)
    tok.save_pretrained(str(out_dir))
    (out_dir / "tokenizer.json").unlink(missing_ok=True)  # FLUX ships vocab.json + merges.txt only
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(out_dir))


def build_t5_tokenizer(out_dir: Path):
    """T5 Unigram tokenizer (`<pad>`=0, `</s>`=1, `<unk>`=2) whose pieces are the dataset words (one
    piece each, `▁word`) plus `▁` and printable ASCII characters as a low-scoring fallback, so other
    text still tokenizes. Built through transformers' own T5Tokenizer(vocab=...) so the saved
    tokenizer.json is exactly the pipeline transformers runs (a hand-made normalizer would be ignored
    by transformers but honoured by the `tokenizers` crate). (SentencePiece's trainer does not keep
    whole words on a corpus this small.) `model_max_length` is the model's max_sequence_length, so
    loaders that take the T5 budget from the tokenizer config use the length it was trained with."""
    from transformers import T5TokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in dataset.vocabulary()]
             + [("\u2581", -5.0)] + [(c, -8.0) for c in chars])
    T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH).save_pretrained(str(out_dir))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    tok = T5TokenizerFast.from_pretrained(str(out_dir))
    # The Rust server reads tokenizer.json with the `tokenizers` crate: it must give transformers' ids.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    for text in dataset.all_prompts()[:50] + ["  A Red  CIRCLE, zebra! \u2603", ""]:
        assert raw.encode(text).ids == tok(text).input_ids, text
    return tok


# -------------------------------------------------------------------------------------------- models

def new_text_encoders(seed: int, clip_vocab_size: int, t5_vocab_size: int):
    """Randomly initialised CLIPTextModel + T5EncoderModel (kept frozen: see README)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab_size, **CLIP_CONFIG)).eval()
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab_size, **T5_CONFIG)).eval()
    for p in list(clip.parameters()) + list(t5.parameters()):
        p.requires_grad_(False)
    return clip, t5


def new_vae(seed: int, scaling_factor: float = 1.0, shift_factor: float = 0.0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(scaling_factor=scaling_factor, shift_factor=shift_factor, **VAE_CONFIG)


def new_transformer(seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def new_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def prefix_clip_weights(model_dir: Path) -> None:
    """Stores the CLIP text encoder under `text_model.*` names, the layout of real FLUX checkpoints
    (transformers loads either)."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    if not all(k.startswith("text_model.") for k in tensors):
        save_file({f"text_model.{k}" if not k.startswith("text_model.") else k: v for k, v in tensors.items()},
                  str(path), metadata={"format": "pt"})


def folder_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


