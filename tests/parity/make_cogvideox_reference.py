"""CogVideoX parts in diffusers layout, and diffusers' own outputs for them.

Writes, under ``--out`` (``tests/parity/data/cogvideox``):

* ``scheduler.safetensors``: for CogVideoXDDIMScheduler and CogVideoXDPMScheduler under several
  configs: ``alphas_cumprod``; per step count the timesteps and a whole denoising run on a random
  latent ``[1, 3, 4, 6, 5]`` with a fixed fake model output per step (the step inputs and outputs,
  and for DPM every noise tensor the scheduler drew, in order); plus the timesteps of every
  spacing for a sweep of step counts;
* ``<vae>/``: a tiny random AutoencoderKLCogVideoX saved with ``save_pretrained`` per VAE config,
  and ``<vae>.safetensors``: decodes of seeded random latents for several latent frame counts (odd
  and even, so both of ``_decode``'s frame batchings run), encodes of seeded random videos, and
  decodes with ``enable_tiling`` (small tiles that overlap in both directions, tiles whose stride
  and crop disagree, one direction only, and sizes that do not tile: the latent equal to the tile,
  and the default tile sizes);
* ``manifest.json``: everything the Rust tests need to know about the above.

The DPM runs draw their noise as CogVideoXPipeline does: one CPU generator seeded once, first the
initial latents (``prepare_latents``), then whatever ``scheduler.step`` draws from it.

Everything is fp32 on CPU and seeded, so the output is deterministic. Read by
``server/tests/parity_cogvideox.rs``. Runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_components import _jitter_  # noqa: E402

import diffusers  # noqa: E402
import diffusers.schedulers.scheduling_dpm_cogvideox as dpm_module  # noqa: E402
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

# The shipped checkpoints' scheduler configs (THUDM/CogVideoX-2b and -5b).
COGVIDEOX_2B = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                    num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                    set_alpha_to_one=True, snr_shift_scale=3.0, steps_offset=0, timestep_spacing="trailing")
COGVIDEOX_5B = dict(COGVIDEOX_2B, snr_shift_scale=1.0)

# (name, class, config): the real configs, then variants over every option the Rust side implements.
SCHEDULER_CONFIGS = [
    ("ddim_2b", CogVideoXDDIMScheduler, COGVIDEOX_2B),
    ("ddim_5b", CogVideoXDDIMScheduler, COGVIDEOX_5B),
    ("ddim_leading_epsilon", CogVideoXDDIMScheduler,
     dict(COGVIDEOX_2B, rescale_betas_zero_snr=False, timestep_spacing="leading", steps_offset=1,
          prediction_type="epsilon")),
    ("ddim_linspace_sample", CogVideoXDDIMScheduler,
     dict(COGVIDEOX_5B, rescale_betas_zero_snr=False, timestep_spacing="linspace", set_alpha_to_one=False,
          prediction_type="sample", snr_shift_scale=2.0)),
    ("dpm_5b", CogVideoXDPMScheduler, COGVIDEOX_5B),
    ("dpm_2b", CogVideoXDPMScheduler, COGVIDEOX_2B),
    ("ddim_linear_zero_snr", CogVideoXDDIMScheduler,
     dict(COGVIDEOX_5B, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)),
    # The class defaults (the docstring's "linear, 0.0001-0.02" is wrong: they are the DDIM ones).
    ("dpm_defaults", CogVideoXDPMScheduler, dict(clip_sample=False)),
    # Linear betas are float32 (scaled_linear ones float64), so the whole schedule is too.
    ("dpm_linear_betas", CogVideoXDPMScheduler,
     dict(clip_sample=False, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)),
    ("dpm_linspace_no_alpha_one", CogVideoXDPMScheduler,
     dict(COGVIDEOX_2B, rescale_betas_zero_snr=False, timestep_spacing="linspace", set_alpha_to_one=False)),
]
SCHEDULER_STEPS = [1, 2, 7, 50]
LATENT_SHAPE = (1, 3, 4, 6, 5)  # [B, F, C, H, W], as the pipeline's latents
# Timesteps of every spacing for these step counts (they depend on nothing else but steps_offset).
SWEEP_STEPS = list(range(1, 101)) + [128, 150, 199, 250, 333, 500, 999, 1000]


# Tiny VAEs: the diffusers test config (cogvideox.md 3.6), and two levels with wider channels, two
# resnets per block, channel changes between levels (conv shortcuts) and temporal compression 2.
VAES = [
    dict(name="vae_4_levels", seed=7,
         config=dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                     temporal_compression_ratio=4, scaling_factor=1.15258426),
         batch=1, latent_hw=(3, 4), latent_frames=[1, 3, 4, 5], video_frames=[9, 17],
         # (name, latent [frames, h, w], enable_tiling keyword arguments). Tiles are 2^3 px per
         # latent px here; diffusers' strides are in latent px, its blends and crops in pixels.
         tiled_decodes=[
             # 32x40 px tiles, stride 3x4 latent px, blend 8x8 px: 2x3 tiles, 48x72 px out.
             ("grid", (5, 6, 9), dict(tile_sample_min_height=32, tile_sample_min_width=40,
                                      tile_overlap_factor_height=1 / 4, tile_overlap_factor_width=1 / 5)),
             # Stride 1x2 latent px but crops of 14x20 px: 4x4 tiles, and the output (50x68 px) is not
             # 8x the latent (32x56), as diffusers makes it. One frame, to keep the 16 tiles fast.
             ("uneven_crops", (1, 4, 7), dict(tile_sample_min_height=16, tile_sample_min_width=24,
                                              tile_overlap_factor_height=1 / 6, tile_overlap_factor_width=1 / 5)),
             # Only the width exceeds the tile, yet the height is cut too (stride 5 of 6 rows).
             ("width_only", (1, 6, 9), dict(tile_sample_min_height=48, tile_sample_min_width=40)),
             # The latent is exactly the tile: not tiled (diffusers tiles only a larger one).
             ("equal_to_tile", (3, 6, 9), dict(tile_sample_min_height=48, tile_sample_min_width=72)),
             # enable_tiling() of the config (sample 480x720): 240x360 px tiles, not reached here.
             ("defaults", (3, 6, 9), dict()),
         ]),
    dict(name="vae_2_levels", seed=8,
         config=dict(block_out_channels=(8, 16), latent_channels=3, layers_per_block=2, norm_num_groups=4,
                     temporal_compression_ratio=2, norm_eps=1e-5, scaling_factor=0.7),
         batch=2, latent_hw=(5, 3), latent_frames=[3, 4], video_frames=[5, 12],
         # 2 px per latent px: 8x6 px tiles, stride 3x2, blend 2x2 px: 3x4 tiles, 16x14 px out.
         tiled_decodes=[
             ("grid", (4, 8, 7), dict(tile_sample_min_height=8, tile_sample_min_width=6,
                                      tile_overlap_factor_height=1 / 4, tile_overlap_factor_width=1 / 3)),
         ]),
]


def make_cogvideox_vae(spec: dict) -> AutoencoderKLCogVideoX:
    levels = len(spec["config"]["block_out_channels"])
    torch.manual_seed(spec["seed"])
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * levels,
                                 up_block_types=("CogVideoXUpBlock3D",) * levels, **spec["config"]).eval()
    # Norm weights start at exactly 1 and biases at 0; perturb them so a missed mapping shows.
    _jitter_(vae, spec["seed"])
    return vae


def vae_references(root: Path) -> list[dict]:
    entries = []
    for spec in VAES:
        make_cogvideox_vae(spec).save_pretrained(str(root / spec["name"]))
        # Reload, so the references are those of exactly what the Rust side loads.
        vae = AutoencoderKLCogVideoX.from_pretrained(str(root / spec["name"])).eval()
        c = vae.config
        gen = torch.Generator().manual_seed(spec["seed"])
        h, w = spec["latent_hw"]
        factor = 2 ** (len(c.block_out_channels) - 1)
        tensors, decodes, encodes = {}, [], []
        with torch.no_grad():
            for frames in spec["latent_frames"]:
                latent = torch.randn(spec["batch"], c.latent_channels, frames, h, w, generator=gen)
                tensors[f"latent{frames}"] = latent
                tensors[f"decoded{frames}"] = vae.decode(latent).sample
                decodes.append({"latent_frames": frames, "frames": tensors[f"decoded{frames}"].shape[2]})
            for frames in spec["video_frames"]:
                video = torch.rand(spec["batch"], c.in_channels, frames, h * factor, w * factor, generator=gen) * 2 - 1
                tensors[f"video{frames}"] = video
                tensors[f"mean{frames}"] = vae.encode(video).latent_dist.mean
                encodes.append({"frames": frames, "latent_frames": tensors[f"mean{frames}"].shape[2]})
        tiled = tiled_references(root / spec["name"], spec, gen, tensors)
        reference = f"{spec['name']}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / reference))
        entries.append({"name": spec["name"], "dir": spec["name"], "reference": reference,
                        "levels": len(c.block_out_channels), "decodes": decodes, "encodes": encodes,
                        "tiled_decodes": tiled})
    return entries


def tiled_references(folder: Path, spec: dict, gen: torch.Generator, tensors: dict) -> list[dict]:
    """Decodes with tiling enabled, one freshly loaded VAE per case (enable_tiling keeps the previous
    call's values for the arguments it is not given). Records whether `_decode` went through
    `tiled_decode` and how many tiles it decoded (decoder calls without a conv cache)."""
    cases = []
    for name, (frames, h, w), kwargs in spec["tiled_decodes"]:
        vae = AutoencoderKLCogVideoX.from_pretrained(str(folder)).eval()
        vae.enable_tiling(**kwargs)
        tiled_calls, tiles = [], []
        tiled_decode, decoder_forward = vae.tiled_decode, vae.decoder.forward

        def counting_tiled_decode(*args, **kw):
            tiled_calls.append(1)
            return tiled_decode(*args, **kw)

        def counting_decoder(sample, *args, conv_cache=None, **kw):
            if conv_cache is None:
                tiles.append(tuple(sample.shape[3:]))
            return decoder_forward(sample, *args, conv_cache=conv_cache, **kw)

        vae.tiled_decode, vae.decoder.forward = counting_tiled_decode, counting_decoder
        latent = torch.randn(spec["batch"], vae.config.latent_channels, frames, h, w, generator=gen)
        with torch.no_grad():
            decoded = vae.decode(latent).sample
        tensors[f"tiled_{name}.latent"], tensors[f"tiled_{name}.decoded"] = latent, decoded
        cases.append({
            "name": name, "latent": f"tiled_{name}.latent", "decoded": f"tiled_{name}.decoded",
            "enable_tiling": kwargs,
            # The values enable_tiling settled on, which tiled_decode reads.
            "tiling": {key: getattr(vae, key) for key in (
                "tile_sample_min_height", "tile_sample_min_width",
                "tile_overlap_factor_height", "tile_overlap_factor_width")},
            "tile_latent_min": [vae.tile_latent_min_height, vae.tile_latent_min_width],
            "tiled": bool(tiled_calls), "tiles": len(tiles) if tiled_calls else 0,
            "output_shape": list(decoded.shape),
        })
    return cases


def record_dpm_draws():
    """Wraps the DPM module's `randn_tensor` so every draw is recorded, in order."""
    draws: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        noise = randn_tensor(*args, **kwargs)
        draws.append(noise.clone())
        return noise

    dpm_module.randn_tensor = recording
    return draws


def scheduler_run(cls, config: dict, steps: int, seed: int, draws: list) -> dict[str, torch.Tensor]:
    """One denoising run as CogVideoXPipeline's loop makes it, with fake model outputs."""
    scheduler = cls(**config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    # The pipeline's `prepare_latents` draw, then (DPM) the scheduler's draws from the same generator.
    latents = randn_tensor(LATENT_SHAPE, generator=generator, dtype=torch.float32)
    model_gen = torch.Generator("cpu").manual_seed(seed + 1)
    out = {"timesteps": scheduler.timesteps.clone(), "initial": latents.clone()}
    old_pred_original_sample = None
    for i, t in enumerate(scheduler.timesteps):
        model_output = torch.randn(LATENT_SHAPE, generator=model_gen)
        out[f"model_output{i}"] = model_output
        if cls is CogVideoXDPMScheduler:
            before = len(draws)
            latents, old_pred_original_sample = scheduler.step(
                model_output, old_pred_original_sample, t, scheduler.timesteps[i - 1] if i > 0 else None, latents,
                generator=generator, return_dict=False)
            out[f"draws{i}"] = torch.tensor(len(draws) - before)
            for j, noise in enumerate(draws[before:]):
                out[f"noise{i}_{j}"] = noise
            out[f"pred_original_sample{i}"] = old_pred_original_sample.clone()
        else:
            latents, pred_original_sample = scheduler.step(model_output, t, latents, return_dict=False)
            out[f"pred_original_sample{i}"] = pred_original_sample.clone()
        out[f"prev_sample{i}"] = latents.clone()
    return out


def scheduler_references() -> tuple[dict, dict[str, torch.Tensor]]:
    draws = record_dpm_draws()
    configs, cases, tensors = {}, [], {}
    for c, (name, cls, config) in enumerate(SCHEDULER_CONFIGS):
        scheduler = cls(**config)
        full_config = {"_class_name": cls.__name__, **dict(scheduler.config)}
        configs[name] = {k: v for k, v in full_config.items() if not k.startswith("_") or k == "_class_name"}
        tensors[f"{name}.alphas_cumprod"] = scheduler.alphas_cumprod.clone()
        for steps in SCHEDULER_STEPS:
            key = f"{name}_{steps}"
            for k, v in scheduler_run(cls, config, steps, seed=100 * c + steps, draws=draws).items():
                tensors[f"{key}.{k}"] = v
            cases.append({"key": key, "config": name, "steps": steps,
                          "seed": 100 * c + steps, "latent_shape": list(LATENT_SHAPE)})
    sweep = []
    for spacing, offset in [("trailing", 0), ("leading", 0), ("leading", 1), ("linspace", 0)]:
        scheduler = CogVideoXDDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        prefix = f"sweep_{spacing}_{offset}"
        steps_ok, out_of_range = [], []
        for steps in SWEEP_STEPS:
            scheduler.set_timesteps(steps)
            # diffusers accepts a schedule reaching past the last training timestep and fails only
            # when a step indexes alphas_cumprod with it; the Rust side refuses it up front.
            if scheduler.timesteps.max() >= scheduler.config.num_train_timesteps:
                out_of_range.append(steps)
                continue
            tensors[f"{prefix}_{steps}"] = scheduler.timesteps.clone()
            steps_ok.append(steps)
        sweep.append({"key_prefix": prefix, "timestep_spacing": spacing, "steps_offset": offset,
                      "steps": steps_ok, "out_of_range_steps": out_of_range})
    return {"configs": configs, "cases": cases, "timestep_sweep": sweep}, tensors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="data directory (tests/parity/data/cogvideox)")
    args = parser.parse_args()
    root = Path(args.out)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    torch.set_num_threads(2)
    torch.manual_seed(0)

    manifest = {"diffusers_version": diffusers.__version__, "torch_version": torch.__version__}
    scheduler_manifest, tensors = scheduler_references()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "scheduler.safetensors"))
    manifest["scheduler"] = {"reference": "scheduler.safetensors", **scheduler_manifest}

    manifest["vae"] = vae_references(root)

    with open(root / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    print(f"wrote {len(scheduler_manifest['cases'])} scheduler runs and {len(manifest['vae'])} VAEs to {root}")


if __name__ == "__main__":
    main()
