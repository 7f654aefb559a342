"""Tiny random CogVideoXTransformer3DModel folders and diffusers' own forwards on them.

Writes, under ``--out`` (``tests/parity/data/cogvideox_transformer``):

* ``<model>/``: a diffusers ``transformer/`` folder (``config.json`` + safetensors) per tiny
  configuration: 2b-style (3D sin-cos positions added to the tokens), 5b-style (3D RoPE on the
  video tokens, no attention bias) and 1.5-style (RoPE with ``patch_size_t=2``);
* ``<model>.<case>.safetensors``: the inputs of one forward (batch 2, the two rows at different
  timesteps), the rotary tables CogVideoXPipeline prepares for that latent size (RoPE models), the
  ``(hidden, encoder)`` output of every block and the final output;
* ``manifest.json``: what the Rust test needs to know about the above.

Cases run at the config's sample size and at another one, so that the sin-cos table is recomputed
and the RoPE crop region differs from the base grid. fp32 on CPU, seeded: deterministic. Read by
``server/tests/parity_cogvideox_transformer.rs``; runs in a few seconds on two cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

# `sample_*` are latent sizes; sample_frames counts pixel frames ((F - 1) / 4 + 1 latent frames).
MODELS = [
    dict(
        name="sincos_2b",
        seed=21,
        config=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                    time_embed_dim=24, text_embed_dim=12, num_layers=2, sample_width=10, sample_height=6,
                    sample_frames=9, patch_size=2, max_text_seq_length=7,
                    use_rotary_positional_embeddings=False),
        # (latent frames, latent height, latent width, text tokens)
        cases=[("sample", 3, 6, 10, 7), ("other", 2, 8, 6, 7)],
    ),
    dict(
        name="rope_5b",
        seed=22,
        config=dict(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4,
                    time_embed_dim=20, text_embed_dim=12, num_layers=3, sample_width=8, sample_height=6,
                    sample_frames=9, patch_size=2, max_text_seq_length=9, attention_bias=False,
                    use_rotary_positional_embeddings=True),
        cases=[("sample", 3, 6, 8, 9), ("other", 2, 4, 10, 5)],
    ),
    dict(
        name="rope_1_5",
        seed=23,
        config=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                    time_embed_dim=16, text_embed_dim=12, num_layers=2, sample_width=8, sample_height=6,
                    sample_frames=13, patch_size=2, patch_size_t=2, max_text_seq_length=6,
                    use_rotary_positional_embeddings=True),
        cases=[("sample", 4, 6, 8, 6), ("other", 2, 4, 6, 6)],
    ),
]

# CogVideoXPipeline's VAE scale factors (8 spatially, 4 in time) for the rotary grid.
VAE_SCALE_SPATIAL = 8


def jitter_norms(model: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """LayerNorm weights start at exactly 1 and biases at 0; perturb them so a swapped or missing
    norm shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def rotary(transformer, frames: int, height: int, width: int):
    """The (cos, sin) tables CogVideoXPipeline hands the transformer for a latent size."""
    fake = types.SimpleNamespace(vae_scale_factor_spatial=VAE_SCALE_SPATIAL, transformer=transformer)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        fake, height * VAE_SCALE_SPATIAL, width * VAE_SCALE_SPATIAL, frames, torch.device("cpu"))


def forward_reference(t: CogVideoXTransformer3DModel, seed: int, frames: int, h: int, w: int,
                      l_txt: int) -> dict[str, torch.Tensor]:
    c = t.config
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(2, frames, c.in_channels, h, w, generator=gen),
        "encoder_hidden_states": torch.randn(2, l_txt, c.text_embed_dim, generator=gen),
        "timestep": torch.tensor([981, 437]),
    }
    tensors = dict(inputs)
    image_rotary_emb = None
    if c.use_rotary_positional_embeddings:
        image_rotary_emb = rotary(t, frames, h, w)
        tensors["rope.cos"], tensors["rope.sin"] = image_rotary_emb
    handles = []
    for i, block in enumerate(t.transformer_blocks):
        def hook(_module, _args, output, i=i):
            hidden, encoder = output
            tensors[f"block{i}.hidden"] = hidden.detach().clone()
            tensors[f"block{i}.encoder"] = encoder.detach().clone()
        handles.append(block.register_forward_hook(hook))
    with torch.no_grad():
        out = t(**inputs, image_rotary_emb=image_rotary_emb, return_dict=False)[0]
    for handle in handles:
        handle.remove()
    tensors["output"] = out
    return tensors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    root: Path = args.out
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"models": []}
    for spec in MODELS:
        torch.manual_seed(spec["seed"])
        t = CogVideoXTransformer3DModel(**spec["config"]).eval()
        jitter_norms(t, spec["seed"])
        out = root / spec["name"]
        if out.exists():
            shutil.rmtree(out)
        t.save_pretrained(str(out))
        cases = []
        for k, (case, frames, h, w, l_txt) in enumerate(spec["cases"]):
            tensors = forward_reference(t, spec["seed"] * 10 + k, frames, h, w, l_txt)
            reference = f"{spec['name']}.{case}.safetensors"
            save_file({key: v.contiguous() for key, v in tensors.items()}, str(root / reference))
            cases.append(dict(name=case, reference=reference, frames=frames, height=h, width=w,
                              text_tokens=l_txt))
            print(f"{spec['name']}.{case}: output {tuple(tensors['output'].shape)}")
        manifest["models"].append(dict(name=spec["name"], dir=spec["name"],
                                       num_layers=spec["config"]["num_layers"], cases=cases))
    with open(root / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)


if __name__ == "__main__":
    main()
