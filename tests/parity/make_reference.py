"""Tiny random FLUX pipelines in diffusers layout, and diffusers' own outputs for them.

Writes, under ``--out`` (``tests/parity/data``):

* ``<model>/``: a complete FluxPipeline folder (``model_index.json``, scheduler, CLIP + T5 text
  encoders and tokenizers, transformer, VAE) per tiny model configuration;
* ``<model>.forward.safetensors``: inputs and output of one transformer forward (batch 2), with the
  output of every block;
* ``<case>.safetensors``: per generation case, the initial packed noise, the packed latents after
  every step, the final latents and the final 8-bit image;
* ``scheduler.safetensors``: sigmas and timesteps of FlowMatchEulerDiscreteScheduler for several
  configs, step counts and image sizes;
* ``manifest.json``: everything the Rust tests need to know about the above;
* ``modules/``: the per-module references of ``tiny_components.write_module_references``.

Everything is fp32 on CPU and seeded, so the output is deterministic. Read by
``server/tests/parity_flux.rs``. Runs in well under a minute on two cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_components as tc  # noqa: E402

import diffusers  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

# FLUX.1 scheduler configs (scheduler/scheduler_config.json of the real checkpoints).
SCHEDULER_DEV = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096, num_train_timesteps=1000)
SCHEDULER_SCHNELL = dict(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                         base_image_seq_len=256, max_image_seq_len=4096, num_train_timesteps=1000)
# Dynamic shifting scaled to tiny images, so the shift differs between the cases' sizes.
SCHEDULER_TINY = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.6, max_shift=1.3,
                      base_image_seq_len=4, max_image_seq_len=64, num_train_timesteps=1000)

# Tiny models. `joint_attention_dim` is the T5 width, `pooled_projection_dim` the CLIP width.
MODELS = [
    dict(
        name="dev_like",
        seed=11,
        transformer=dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                         guidance_embeds=True, axes_dims_rope=[4, 4, 8]),
        clip=dict(hidden_size=32, layers=2, heads=4, hidden_act="quick_gelu"),
        t5=dict(d_model=32, layers=2, heads=4, d_kv=8, d_ff=37),
        vae=dict(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4),
        scheduler=SCHEDULER_DEV,
        shard=None,
    ),
    dict(
        name="schnell_like",
        seed=22,
        transformer=dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
                         num_attention_heads=4, joint_attention_dim=24, pooled_projection_dim=16,
                         guidance_embeds=False, axes_dims_rope=[2, 2, 4]),
        clip=dict(hidden_size=16, layers=1, heads=2, hidden_act="gelu", intermediate_size=24),
        t5=dict(d_model=24, layers=1, heads=3, d_kv=8, d_ff=32, feed_forward_proj="relu"),
        vae=dict(latent_channels=2, block_out_channels=(8, 8, 16), norm_num_groups=2, mid_block_add_attention=False),
        scheduler=SCHEDULER_SCHNELL,
        shard=None,
    ),
    dict(
        name="sharded",
        seed=33,
        transformer=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=24,
                         num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=40,
                         guidance_embeds=True, axes_dims_rope=[8, 8, 8]),
        clip=dict(hidden_size=40, layers=1, heads=4, intermediate_size=48),
        t5=dict(d_model=48, layers=1, heads=2, d_kv=12, d_ff=40),
        vae=dict(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4),
        scheduler=SCHEDULER_TINY,
        shard="60KB",
    ),
]

# Generation cases: sizes include non-square and non-multiple ones (rounded down like diffusers).
CASES = [
    dict(name="dev_square", model="dev_like", prompt="A photo of a cat sitting on a red chair.",
         width=16, height=16, steps=4, guidance=3.5, seed=0, max_sequence_length=16),
    dict(name="dev_wide_odd_size", model="dev_like", prompt="An astronaut riding a horse on the moon",
         width=27, height=13, steps=3, guidance=5.0, seed=42, max_sequence_length=24),
    dict(name="dev_true_cfg", model="dev_like", prompt="A watercolor painting of a small village by the sea",
         negative_prompt="blurry, low quality", true_cfg_scale=2.5,
         width=12, height=20, steps=3, guidance=3.5, seed=7, max_sequence_length=12),
    dict(name="schnell_tall", model="schnell_like", prompt="A red vintage car parked in front of a diner",
         width=24, height=40, steps=2, guidance=0.0, seed=123, max_sequence_length=16),
    dict(name="schnell_empty_prompt", model="schnell_like", prompt="",
         width=32, height=32, steps=4, guidance=0.0, seed=2024, max_sequence_length=8),
    dict(name="sharded_dynamic_shift", model="sharded", prompt="a dragon sleeping on a pile of gold coins",
         width=20, height=16, steps=5, guidance=2.0, seed=1, max_sequence_length=10),
]

# Scheduler schedules checked on their own: configs x step counts x image sequence lengths.
SCHEDULER_CONFIGS = [
    ("dev", SCHEDULER_DEV),
    ("schnell", SCHEDULER_SCHNELL),
    ("static_shift", dict(shift=3.0, use_dynamic_shifting=False)),
    ("linear_shift", dict(SCHEDULER_DEV, time_shift_type="linear")),
    ("shift_terminal", dict(SCHEDULER_DEV, shift_terminal=0.1)),
    ("inverted", dict(SCHEDULER_SCHNELL, invert_sigmas=True)),
]
SCHEDULER_STEPS = [1, 4, 28, 50]
SCHEDULER_SEQ_LENS = [16, 1024, 4096, 6000]


def jitter_norms(model: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """RMSNorm weights start at exactly 1; perturb them so a swapped or missing norm shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.add_(scale * torch.randn(p.shape, generator=gen))


def build_model(spec: dict, root: Path, tokenizer_dirs: dict[str, Path]) -> Path:
    """Builds one tiny FluxPipeline and saves it under `root / spec["name"]`."""
    seed = spec["seed"]
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**spec["transformer"]).eval()
    jitter_norms(transformer, seed)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]),
        vae=tc.make_vae(seed + 1, **spec["vae"]),
        text_encoder=tc.make_clip_text_model(seed + 2, vocab_size=1000, **spec["clip"]),
        tokenizer=_load_tokenizer("clip", tokenizer_dirs["tokenizer"]),
        text_encoder_2=tc.make_t5_encoder(seed + 3, vocab_size=1000, **spec["t5"]),
        tokenizer_2=_load_tokenizer("t5", tokenizer_dirs["tokenizer_2"]),
        transformer=transformer,
    )
    out = root / spec["name"]
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out))
    # The tokenizers as built (FLUX layout: the CLIP one without tokenizer.json), not re-saved.
    for name, src in tokenizer_dirs.items():
        shutil.rmtree(out / name)
        shutil.copytree(src, out / name)
    if spec["shard"]:
        shutil.rmtree(out / "transformer")
        transformer.save_pretrained(str(out / "transformer"), max_shard_size=spec["shard"])
        assert any((out / "transformer").glob("*.safetensors.index.json")), "transformer was not sharded"
    return out


def _load_tokenizer(kind: str, path: Path):
    from transformers import CLIPTokenizer, T5TokenizerFast

    return (CLIPTokenizer if kind == "clip" else T5TokenizerFast).from_pretrained(str(path))


def transformer_forward_reference(pipe: FluxPipeline, seed: int) -> dict[str, torch.Tensor]:
    """One forward on random inputs (batch 2, text ids that are not all zero so every RoPE axis
    is exercised), with the (encoder, hidden) output of every block in flattened order."""
    t = pipe.transformer
    c = t.config
    gen = torch.Generator().manual_seed(seed)
    batch, h, w, l_txt = 2, 3, 5, 7
    inputs = {
        "hidden_states": torch.randn(batch, h * w, c.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(batch, l_txt, c.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=gen),
        "timestep": torch.tensor([0.73, 0.21]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, h, w, "cpu", torch.float32),
        "txt_ids": torch.stack([torch.arange(l_txt).float(), torch.zeros(l_txt), torch.ones(l_txt)], dim=1),
    }
    if c.guidance_embeds:
        inputs["guidance"] = torch.tensor([4.0, 1.5])
    blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(blocks):
        def hook(_module, _args, output, i=i):
            encoder, hidden = output
            captured[f"block{i}.encoder"] = encoder.detach().clone()
            captured[f"block{i}.hidden"] = hidden.detach().clone()
        handles.append(block.register_forward_hook(hook))
    with torch.no_grad():
        out = t(**inputs, return_dict=False)[0]
    for handle in handles:
        handle.remove()
    return {**inputs, **captured, "output": out}


def run_case(pipe: FluxPipeline, case: dict) -> dict[str, torch.Tensor]:
    """Runs FluxPipeline for one case; returns its reference tensors."""
    steps: list[torch.Tensor] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        steps.append(kwargs["latents"].detach().clone())
        return kwargs

    kwargs = dict(
        prompt=case["prompt"],
        width=case["width"],
        height=case["height"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance"],
        max_sequence_length=case["max_sequence_length"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        output_type="np",
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    if case.get("negative_prompt") is not None:
        kwargs.update(negative_prompt=case["negative_prompt"], true_cfg_scale=case["true_cfg_scale"])
    with torch.no_grad():
        image = pipe(**kwargs).images  # [1, H, W, 3] float32 in [0, 1]
    # VaeImageProcessor.numpy_to_pil's conversion.
    image_u8 = (image * 255).round().astype("uint8")[0]

    # The initial noise, drawn as FluxPipeline.prepare_latents does.
    vsf = pipe.vae_scale_factor
    lh, lw = 2 * (case["height"] // (vsf * 2)), 2 * (case["width"] // (vsf * 2))
    channels = pipe.transformer.config.in_channels // 4
    noise = randn_tensor((1, channels, lh, lw), generator=torch.Generator("cpu").manual_seed(case["seed"]),
                         dtype=torch.float32)
    noise = FluxPipeline._pack_latents(noise, 1, channels, lh, lw)

    tensors = {"noise": noise, "latents": steps[-1].clone(), "image": torch.from_numpy(np.ascontiguousarray(image_u8))}
    tensors.update({f"step{i}": s for i, s in enumerate(steps)})
    return tensors


def scheduler_references() -> tuple[list[dict], dict[str, torch.Tensor]]:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    entries, tensors = [], {}
    for name, config in SCHEDULER_CONFIGS:
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        full_config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **dict(scheduler.config)}
        full_config = {k: v for k, v in full_config.items() if not k.startswith("_") or k == "_class_name"}
        for steps in SCHEDULER_STEPS:
            if steps == 1 and config.get("shift_terminal"):
                continue  # a 1-step schedule cannot be stretched (diffusers divides 0 by 0)
            for seq_len in SCHEDULER_SEQ_LENS:
                mu = calculate_shift(seq_len, scheduler.config.get("base_image_seq_len", 256),
                                     scheduler.config.get("max_image_seq_len", 4096),
                                     scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
                scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
                key = f"{name}_{steps}_{seq_len}"
                tensors[f"{key}.sigmas"] = scheduler.sigmas.clone()
                tensors[f"{key}.timesteps"] = scheduler.timesteps.clone()
                entries.append({"key": key, "config": full_config, "steps": steps, "image_seq_len": seq_len,
                                "mu": mu})
    return entries, tensors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="data directory (tests/parity/data)")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    torch.manual_seed(0)

    # One pair of tokenizers for all models, built once in FLUX's layout.
    tok_root = root / "_tokenizers"
    if tok_root.exists():
        shutil.rmtree(tok_root)
    tokenizer_dirs = {"tokenizer": tok_root / "tokenizer", "tokenizer_2": tok_root / "tokenizer_2"}
    tc.make_clip_tokenizer(tokenizer_dirs["tokenizer"])
    tc.make_t5_tokenizer(tokenizer_dirs["tokenizer_2"])

    manifest = {
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "models": [],
        "cases": [],
    }
    pipes = {}
    for spec in MODELS:
        folder = build_model(spec, root, tokenizer_dirs)
        # Reload from disk, so the references are those of exactly what the Rust side loads.
        pipe = FluxPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipes[spec["name"]] = pipe
        forward = f"{spec['name']}.forward.safetensors"
        save_file({k: v.contiguous() for k, v in transformer_forward_reference(pipe, spec["seed"]).items()},
                  str(root / forward))
        c = pipe.transformer.config
        manifest["models"].append({
            "name": spec["name"],
            "dir": spec["name"],
            "guidance_embeds": c.guidance_embeds,
            "sharded": bool(spec["shard"]),
            "num_layers": c.num_layers,
            "num_single_layers": c.num_single_layers,
            "vae_scale_factor": pipe.vae_scale_factor,
            "forward_reference": forward,
        })
    shutil.rmtree(tok_root)

    for case in CASES:
        tensors = run_case(pipes[case["model"]], case)
        reference = f"{case['name']}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / reference))
        h, w, _ = tensors["image"].shape
        manifest["cases"].append({
            "negative_prompt": None,
            "true_cfg_scale": 1.0,
            **case,
            "reference": reference,
            "image_width": w,
            "image_height": h,
        })

    entries, tensors = scheduler_references()
    save_file(tensors, str(root / "scheduler.safetensors"))
    manifest["scheduler"] = {"reference": "scheduler.safetensors", "cases": entries}

    with open(root / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    # The per-module references (tokenizers, CLIP, T5, VAE) too, so that `make parity-data`
    # writes everything the Rust parity tests read.
    tc.write_module_references(root)
    print(f"wrote {len(MODELS)} models, {len(CASES)} cases and {len(entries)} schedules to {root}")


if __name__ == "__main__":
    main()
