"""Tiny, deterministic FLUX text encoders, tokenizers and VAE for parity tests.

Everything here is built locally (no model hub): the tokenizers are trained on a small fixed English
corpus, the models are randomly initialised from a seed. The components are the transformers /
diffusers classes FluxPipeline uses, saved in the layout of a real FLUX checkpoint folder, so the Rust
loaders read exactly what a real checkpoint would give them.

Used two ways:
  * imported by ``make_reference.py`` to assemble tiny FLUX pipelines (keep the ``make_*`` names and
    their keyword arguments stable);
  * ``python tests/parity/tiny_components.py --out tests/parity/data`` writes per-module references
    (``<out>/modules/``) read by ``server/tests/parity_modules.rs``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

# A small fixed English corpus, prompt-like, for training the tiny tokenizers.
CORPUS = [
    "A photo of a cat sitting on a red chair next to the window.",
    "The quick brown fox jumps over the lazy dog in the morning light.",
    "An astronaut riding a horse on the moon, digital art, highly detailed.",
    "A watercolor painting of a small village by the sea at sunset.",
    "Portrait of an old man with a long white beard, oil on canvas.",
    "A bowl of fresh fruit on a wooden table: apples, oranges and grapes.",
    "A futuristic city skyline at night with neon lights and flying cars.",
    "Two dogs playing in the snow, photographed with a telephoto lens.",
    "A cozy cabin in the mountains surrounded by tall pine trees.",
    "Close-up of a hummingbird drinking nectar from a bright flower.",
    "A steaming cup of coffee beside an open book on a rainy afternoon.",
    "The ancient ruins of a stone temple covered in green moss and vines.",
    "A child flying a kite on the beach, blue sky with white clouds.",
    "A robot painting a self-portrait in a sunny art studio.",
    "Macro photograph of dew drops on a spider web at dawn.",
    "A lighthouse on a rocky cliff during a storm with huge waves.",
    "A street market full of colorful spices, lanterns and people.",
    "An owl perched on a branch under the full moon, fantasy illustration.",
    "A bicycle leaning against a yellow wall in an old European town.",
    "A sailboat crossing a calm lake, reflections of the mountains in the water.",
    "Isometric view of a tiny island with a castle, trees and a waterfall.",
    "A plate of spaghetti with tomato sauce and basil, food photography.",
    "A herd of elephants walking across the savanna at golden hour.",
    "A cyberpunk girl with glowing headphones, anime style, 4k wallpaper.",
    "Black and white photograph of a jazz musician playing the saxophone.",
    "A field of sunflowers under a dramatic sky, impressionist painting.",
    "A red vintage car parked in front of a diner, retro 1950s poster.",
    "The northern lights dancing above a frozen lake in winter.",
    "A stack of pancakes with maple syrup, berries and whipped cream.",
    "A dragon sleeping on a pile of gold coins inside a dark cave.",
    "Children's book illustration of a bear reading under a tree.",
    "A glass of orange juice, it's sunny and we're happy, they'll say.",
    "Minimalist logo of a mountain and a river, flat vector design.",
    "A busy train station in Tokyo with commuters and bright signs.",
    "Underwater scene with coral reefs, turtles and schools of fish.",
    "A medieval knight in shining armor holding a sword and a shield.",
    "A hot air balloon floating over green hills at sunrise.",
    "A vase of tulips on a kitchen counter, soft natural lighting.",
    "Concept art of a spaceship landing on an alien planet with two suns.",
    "A snowy street at night, warm light coming from the shop windows.",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

# Prompts the references are computed for: plain, punctuation and case, unicode, an unknown word, an
# explicit special token, empty, and one long enough to be truncated at every max length used.
PROMPTS = [
    "A photo of a cat sitting on a red chair.",
    "  The QUICK brown fox -- it's jumping!!  over 3 lazy dogs...  ",
    "Café crème, naïve façade: ünïcödé ☃ and 漢字 text",
    "zzyzx qwerty xylophone",
    "a horse <|endoftext|> on the moon",
    "",
    " ".join(CORPUS[:6]),
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character map (the ByteLevel alphabet, in CLIP's order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _learn_clip_bpe(words: Counter, num_new_tokens: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Greedy BPE on `</w>`-terminated byte-level words; ties broken by the pair itself (deterministic).

    Returns (new vocab entries in merge order, merges)."""
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    new_tokens: list[str] = []
    seen: set[str] = set()
    merges: list[tuple[str, str]] = []
    while len(new_tokens) < num_new_tokens:
        pairs: Counter = Counter()
        for w, count in words.items():
            s = splits[w]
            for pair in zip(s, s[1:]):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        if a + b not in seen:
            seen.add(a + b)
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
    return new_tokens, merges


def make_clip_tokenizer(out_dir, vocab_words=None, vocab_size=1000, model_max_length=77, pad_token=CLIP_EOS,
                        keep_tokenizer_json=False, seed=0):
    """A CLIP BPE tokenizer built like OpenAI's: 256 byte tokens, the same with `</w>`, learned merges,
    then `<|startoftext|>` / `<|endoftext|>` as the last two ids (vocab_size entries in all, fewer if
    the corpus runs out of pairs).

    `vocab_words`: corpus lines to learn merges from (default: CORPUS). Saved like a FLUX `tokenizer/`
    folder (vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json); tokenizer.json is
    kept only with `keep_tokenizer_json`. Returns the `CLIPTokenizer` loaded back from `out_dir`.
    BPE learning is deterministic; `seed` is accepted for a uniform signature."""
    del seed
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    base = alphabet + [c + "</w>" for c in alphabet]

    # The normalizer / pre-tokenizer of an (empty) CLIPTokenizer split the corpus exactly as encoding will.
    probe = CLIPTokenizer(vocab={t: i for i, t in enumerate(base + [CLIP_BOS, CLIP_EOS])}, merges=[])
    backend = probe.backend_tokenizer
    words: Counter = Counter()
    for line in vocab_words or CORPUS:
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            words[word] += 1
    new_tokens, merges = _learn_clip_bpe(words, vocab_size - len(base) - 2)
    vocab = {t: i for i, t in enumerate(base + new_tokens + [CLIP_BOS, CLIP_EOS])}

    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token)
    tok.save_pretrained(str(out_dir))
    if not keep_tokenizer_json:
        os.remove(out_dir / "tokenizer.json")
    with open(out_dir / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": pad_token, "unk_token": CLIP_EOS}
    with open(out_dir / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    return CLIPTokenizer.from_pretrained(str(out_dir))


def make_t5_tokenizer(out_dir, vocab_words=None, vocab_size=400, extra_ids=100, model_max_length=512, seed=0):
    """A T5 SentencePiece-Unigram tokenizer (`<pad>`=0, `</s>`=1, `<unk>`=2, nmt_nfkc normalisation,
    `extra_ids` sentinels at the end) trained on `vocab_words` (default: CORPUS). Saved like a FLUX
    `tokenizer_2/` folder (spiece.model, tokenizer.json, special_tokens_map.json, tokenizer_config.json);
    returns the `T5TokenizerFast` loaded back from `out_dir`. `vocab_size` is an upper bound: the
    corpus is small, so the trainer may stop earlier. Training is deterministic (one thread); `seed`
    is accepted for a uniform signature."""
    del seed
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(vocab_words or CORPUS),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        normalization_rule_name="nmt_nfkc",
        num_threads=1,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(model.getvalue())
        tok = T5TokenizerFast.from_pretrained(tmp, extra_ids=extra_ids, model_max_length=model_max_length)
        tok.save_pretrained(str(out_dir))
        shutil.copy(Path(tmp) / "spiece.model", out_dir / "spiece.model")
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    with open(out_dir / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    return T5TokenizerFast.from_pretrained(str(out_dir))


def _jitter_(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Perturb norm weights and biases (initialised to exact 1 / 0) so a swapped or missing mapping of
    one of them shows up in the outputs."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(scale * torch.randn(p.shape, generator=gen))


def make_clip_text_model(seed, hidden_size=32, layers=2, heads=4, vocab_size=1000, intermediate_size=37,
                         max_position_embeddings=77, hidden_act="gelu", eos_token_id=2, layer_norm_eps=1e-5,
                         projection_dim=32):
    """A random `CLIPTextModel` (fp32, eval mode). `eos_token_id=2` selects transformers' legacy pooling
    (argmax of the ids), as in the real FLUX text encoder config."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=eos_token_id,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        layer_norm_eps=layer_norm_eps,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(config).eval()
    _jitter_(model, seed)
    return model


def make_t5_encoder(seed, d_model=32, layers=2, heads=4, d_kv=8, d_ff=37, vocab_size=1000,
                    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, layer_norm_epsilon=1e-6):
    """A random `T5EncoderModel` (fp32, eval mode); defaults shaped like T5 v1.1 (FLUX's text_encoder_2)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=relative_attention_num_buckets,
        relative_attention_max_distance=relative_attention_max_distance,
        feed_forward_proj=feed_forward_proj,
        layer_norm_epsilon=layer_norm_epsilon,
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()
    _jitter_(model, seed)
    return model


def make_vae(seed, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
             norm_num_groups=4, sample_size=32, scaling_factor=1.5035, shift_factor=0.0609,
             mid_block_add_attention=True):
    """A random FLUX-style `AutoencoderKL` (no quant convs, shift + scaling factor; fp32, eval mode)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=mid_block_add_attention,
    ).eval()
    _jitter_(vae, seed)
    return vae


def _prefix_clip_weights(model_dir: Path, model, ids, pooled) -> None:
    """Rewrites a saved CLIPTextModel with `text_model.`-prefixed tensor names (the layout of real
    FLUX `text_encoder/` checkpoints) and checks transformers still loads it to the same outputs."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    save_file({f"text_model.{k}": v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    reloaded = CLIPTextModel.from_pretrained(str(model_dir)).eval()
    assert torch.equal(reloaded(ids).pooler_output, pooled), "prefixed CLIP weights did not load back"


def _ids(tokenizer, prompts, max_length) -> torch.Tensor:
    """Token ids exactly as FluxPipeline asks for them."""
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids.to(torch.int64)


def write_module_references(out_dir):
    """Writes `<out_dir>/modules/`: tiny components in checkpoint layout (one folder each) and, beside
    them, `<name>.ref.safetensors` with inputs and outputs, plus `manifest.json` describing it all."""
    root = Path(out_dir) / "modules"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    manifest = {"prompts": PROMPTS, "tokenizers": [], "clip": [], "t5": [], "vae": []}

    def save_ref(name, tensors):
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(root / f"{name}.ref.safetensors"))
        return f"{name}.ref.safetensors"

    # Tokenizers: ids at the model max length and at a short length that truncates most prompts. The
    # CLIP ones: FLUX-like (vocab.json + merges.txt), then with `!` as pad token (a special token
    # too, as in SDXL's second tokenizer), then from tokenizer.json.
    clip_tok = make_clip_tokenizer(root / "clip_tokenizer")
    clip_tok_bang = make_clip_tokenizer(root / "clip_tokenizer_bang", pad_token="!")
    clip_tok_json = make_clip_tokenizer(root / "clip_tokenizer_json", pad_token="!", keep_tokenizer_json=True)
    t5_tok = make_t5_tokenizer(root / "t5_tokenizer")
    for name, kind, tok, lengths in [
        ("clip_tokenizer", "clip", clip_tok, [77, 8]),
        ("clip_tokenizer_bang", "clip", clip_tok_bang, [77, 3]),
        ("clip_tokenizer_json", "clip", clip_tok_json, [77, 5]),
        ("t5_tokenizer", "t5", t5_tok, [64, 6]),
    ]:
        tensors = {f"ids_{n}": _ids(tok, PROMPTS, n) for n in lengths}
        manifest["tokenizers"].append({"name": name, "kind": kind, "max_lengths": lengths,
                                       "model_max_length": tok.model_max_length,
                                       "reference": save_ref(name, tensors)})

    # Tokenized prompts plus two rows of random ids: there the largest id is not the eos token, which
    # tells transformers' legacy pooling (argmax of the ids) from the eos-position one.
    gen = torch.Generator().manual_seed(0)
    clip_ids = torch.cat([_ids(clip_tok, PROMPTS, 77), torch.randint(0, len(clip_tok), (2, 77), generator=gen)])
    clip_eos = clip_tok.convert_tokens_to_ids(CLIP_EOS)
    with torch.no_grad():
        # The FLUX-like one stores `text_model.*` names, as real FLUX checkpoints do.
        for name, kwargs, prefixed in [
            ("clip_legacy_quick_gelu", dict(seed=1, hidden_act="quick_gelu", eos_token_id=2), True),
            ("clip_gelu_eos", dict(seed=2, hidden_act="gelu", eos_token_id=clip_eos, layers=3, hidden_size=48,
                                   heads=6, intermediate_size=64), False),
        ]:
            model = make_clip_text_model(**kwargs)
            model.save_pretrained(str(root / name))
            out = model(clip_ids)
            if prefixed:
                _prefix_clip_weights(root / name, model, clip_ids, out.pooler_output)
            manifest["clip"].append({"name": name, "reference": save_ref(name, {
                "input_ids": clip_ids, "last_hidden": out.last_hidden_state, "pooled": out.pooler_output})})

        t5_ids = _ids(t5_tok, PROMPTS, 64)
        for name, kwargs, shard in [
            ("t5_gated_gelu", dict(seed=3), None),
            ("t5_relu_sharded", dict(seed=4, feed_forward_proj="relu", relative_attention_num_buckets=8,
                                     relative_attention_max_distance=20, layers=3, d_kv=6, d_ff=40), "40KB"),
        ]:
            model = make_t5_encoder(**kwargs)
            if shard:
                model.save_pretrained(str(root / name), max_shard_size=shard)
            else:
                model.save_pretrained(str(root / name))
            hidden = model(t5_ids).last_hidden_state
            manifest["t5"].append({"name": name, "reference": save_ref(name, {"input_ids": t5_ids, "hidden": hidden})})

        for name, kwargs, latent_hw in [
            ("vae_2_levels", dict(seed=5), 6),
            ("vae_3_levels", dict(seed=6, latent_channels=2, block_out_channels=(8, 8, 16), layers_per_block=2,
                                  norm_num_groups=2, mid_block_add_attention=False), 4),
        ]:
            vae = make_vae(**kwargs)
            vae.save_pretrained(str(root / name))
            gen = torch.Generator().manual_seed(kwargs["seed"] + 100)
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            latent = torch.randn(2, vae.config.latent_channels, latent_hw, latent_hw + 1, generator=gen)
            image = torch.rand(1, 3, latent_hw * factor, (latent_hw + 1) * factor, generator=gen) * 2 - 1
            decoded = vae.decode(latent).sample
            mean = vae.encode(image).latent_dist.mean
            manifest["vae"].append({"name": name, "reference": save_ref(name, {
                "latent": latent, "decoded": decoded, "image": image, "encoded_mean": mean})})

    with open(root / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="data directory (modules are written to <out>/modules)")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = write_module_references(args.out)
    print(f"wrote {root}")


if __name__ == "__main__":
    main()
