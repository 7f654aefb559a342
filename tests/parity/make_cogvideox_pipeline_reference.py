"""Tiny random CogVideoXPipeline folders, and diffusers' own generations on them (with and without caches).

Writes, under ``--out`` (``tests/parity/data/cogvideox_pipeline``):

* ``<model>/``: a complete CogVideoXPipeline folder saved with ``save_pretrained``
  (``model_index.json``, ``tokenizer/`` T5TokenizerFast as built by ``tiny_components``,
  ``text_encoder/`` T5EncoderModel, ``transformer/`` CogVideoXTransformer3DModel, ``vae/``
  AutoencoderKLCogVideoX, ``scheduler/``). Two models:

  - ``tiny_2b``: 3D sin-cos positions, 2 blocks, attention bias, CogVideoXDDIMScheduler with the
    CogVideoX-2b config (v-prediction, snr_shift_scale 3.0, zero-SNR, trailing), VAE scaling factor
    1.15258426;
  - ``tiny_5b``: 3D RoPE, 3 blocks, no attention bias, CogVideoXDPMScheduler with the CogVideoX-5b
    config (snr_shift_scale 1.0), VAE scaling factor 0.7; its cases use a non-square latent whose
    rotary grid is cropped from the config's base grid (``sample_height/width`` 8x8 latent).

  Each VAE is the tiny 4-level one of ``make_cogvideox_reference.py`` (temporal compression 4,
  spatial x8); LayerNorm weights and biases of the transformer are perturbed
  (``make_cogvideox_transformer.jitter_norms``), as are the norms / biases of T5 and the VAE.

* ``<case>.safetensors``, one per case (fp32 unless said otherwise):

  - ``noise``: the initial latents ``[1, F_lat, C, h, w]`` exactly as ``prepare_latents`` drew them
    (``randn`` from the case's CPU generator, before anything else is drawn from it);
  - ``prompt_embeds``: what the transformer is given as ``encoder_hidden_states``: ``[neg; pos]``
    (``[2, L, D]``) with CFG, ``[pos]`` (``[1, L, D]``) without;
  - ``timesteps``: the scheduler's timesteps (int64, ``[steps]``);
  - ``step{i}``: the latents after step ``i`` (``callback_on_step_end``), ``latents``: the final ones;
  - ``video`` (pipeline cases only): uint8 ``[F, H, W, 3]``, ``np.round(frames * 255)`` of the
    ``output_type="np"`` output (first video);
  - ``dpm_noise{i}_{j}`` (DPM cases only): the ``j``-th tensor CogVideoXDPMScheduler drew from the
    generator at step ``i`` (see ``dpm_draws_per_step``).

  Cache cases run with ``output_type="latent"`` (no decode, so no ``video``).

* ``manifest.json``:

  - ``diffusers_version``, ``torch_version``;
  - ``models``: per model ``name``, ``dir``, ``scheduler`` (class name), ``rope``
    (``use_rotary_positional_embeddings``), ``num_layers``, ``max_text_seq_length``,
    ``latent_channels``, ``vae_scaling_factor``, ``vae_scale_factor_spatial``,
    ``vae_scale_factor_temporal``;
  - ``cases``: per case

    - ``name``, ``model``, ``prompt``, ``negative_prompt`` (null: diffusers' default, the empty
      string), ``height``, ``width``, ``num_frames``, ``steps``, ``guidance_scale``,
      ``use_dynamic_cfg``, ``seed`` (of ``torch.Generator("cpu")``), ``max_sequence_length``;
    - ``timesteps``: the timestep of each step (ints, as ``pipe.current_timestep``);
    - ``guidance_per_step``: the guidance scale the step applied (``pipe._guidance_scale`` after the
      step: constant unless ``use_dynamic_cfg``; a Python float, i.e. f64);
    - ``latent_shape`` ``[1, F_lat, C, h, w]``; ``video_shape`` ``[F, H, W, 3]`` or null;
    - ``reference``: the case's safetensors file;
    - ``cache``: null, or the cache config in the server's API field names (``kind`` plus fields;
      ranges as ``[min, max]``; FasterCache's ``attention_weight`` a constant). diffusers ran it
      with ``pipe.transformer.enable_cache(config)``; PAB and FasterCache got
      ``current_timestep_callback=lambda: pipe.current_timestep``, FasterCache
      ``attention_weight_callback=lambda _: w`` and ``tensor_format="BFCHW"`` (the CogVideoX latent
      layout; it has no numerical effect) and its default low/high-frequency weight callbacks;
    - ``decisions``: per step ``[blocks_computed, attention_computed]``: how many
      ``transformer_blocks.i`` and ``transformer_blocks.i.attn1`` really ran (forward pre-hooks on
      ``norm1`` and ``attn1.to_q``: a block or attention served from a cache does not reach them).
      One batched ``[uncond; cond]`` forward per step, so these count modules, not batch rows;
    - ``batch_per_step``: the batch the transformer's inner forward ran at (pre-hook on
      ``patch_embed``): 2 with CFG, 1 without, and 1 on FasterCache steps whose unconditional half
      was skipped;
    - ``hooks``: per diffusers hook name, how many modules carry it (``{}`` when nothing is hooked);
    - ``uncached_change``: max |cached - uncached| of the final latents (same settings, no cache);
      null for the cases without a cache. Every cache case changes the output by more than 1e-3,
      except those with ``expect_no_change`` true (TaylorSeer's default patterns, which hook
      nothing on CogVideoX, and MagCache calibration, which never skips);
    - ``calibrated_mag_ratios`` (MagCache calibration only): the ratios diffusers printed;
    - ``dpm_draws_per_step`` (DPM cases only): how many tensors the scheduler drew at each step.

Everything is fp32 on CPU and seeded, so the output is deterministic; runs in well under a minute on
two cores. Read by the Rust CogVideoX pipeline and cache parity tests.

    python tests/parity/make_cogvideox_pipeline_reference.py --out tests/parity/data/cogvideox_pipeline
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_components as tc  # noqa: E402
from make_cache_reference import FASTER, FBC, MAG, PAB, TAYLOR, Counter, diffusers_config  # noqa: E402
from make_cogvideox_reference import (  # noqa: E402
    COGVIDEOX_2B,
    COGVIDEOX_5B,
    VAES,
    make_cogvideox_vae,
    record_dpm_draws,
)
from make_cogvideox_transformer import jitter_norms  # noqa: E402

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from diffusers.hooks import HookRegistry  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers import T5TokenizerFast  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

# The tiny VAE of the CogVideoX VAE parity tests (4 levels, latent 4, temporal compression 4).
VAE_4_LEVELS = next(v for v in VAES if v["name"] == "vae_4_levels")["config"]

# `sample_*` are latent sizes (sample_frames in pixel frames). `t5` is passed to make_t5_encoder;
# its d_model is the transformer's text_embed_dim.
MODELS = [
    dict(
        name="tiny_2b",
        seed=41,
        transformer=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                         time_embed_dim=24, text_embed_dim=32, num_layers=2, sample_height=6, sample_width=8,
                         sample_frames=9, patch_size=2, max_text_seq_length=12, attention_bias=True,
                         use_rotary_positional_embeddings=False),
        t5=dict(d_model=32, layers=2, heads=4, d_kv=8, d_ff=37),
        vae=dict(VAE_4_LEVELS, scaling_factor=1.15258426),
        scheduler=(CogVideoXDDIMScheduler, COGVIDEOX_2B),
    ),
    dict(
        name="tiny_5b",
        seed=42,
        transformer=dict(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4,
                         time_embed_dim=20, text_embed_dim=24, num_layers=3, sample_height=8, sample_width=8,
                         sample_frames=9, patch_size=2, max_text_seq_length=10, attention_bias=False,
                         use_rotary_positional_embeddings=True),
        t5=dict(d_model=24, layers=1, heads=3, d_kv=8, d_ff=32),
        vae=dict(VAE_4_LEVELS, scaling_factor=0.7),
        scheduler=(CogVideoXDPMScheduler, COGVIDEOX_5B),
    ),
]
T5_VOCAB = 1000

# Shared generation settings. 2b: 48x64 px = 6x8 latent (sin-cos table from the config); 5b: 80x48 px
# = 10x6 latent, rotary grid 5x3 cropped from the 4x4 base grid.
G2B = dict(model="tiny_2b", prompt="A photo of a cat sitting on a red chair next to the window.",
           negative_prompt=None, height=48, width=64, num_frames=9, guidance_scale=6.0, use_dynamic_cfg=False,
           seed=0, max_sequence_length=12)
G5B = dict(model="tiny_5b", prompt="A lighthouse on a rocky cliff during a storm with huge waves.",
           negative_prompt=None, height=80, width=48, num_frames=9, guidance_scale=6.0, use_dynamic_cfg=False,
           seed=42, max_sequence_length=10)

# Whole-pipeline cases (no cache).
CASES = [
    dict(G2B, name="2b_ddim", steps=4),
    dict(G2B, name="2b_negative_dynamic_cfg", steps=5, seed=7, use_dynamic_cfg=True,
         prompt="A hot air balloon floating over green hills at sunrise.",
         negative_prompt="blurry, low quality, distorted"),
    dict(G5B, name="5b_dpm", steps=5),
    dict(G5B, name="5b_no_cfg", steps=4, seed=3, guidance_scale=1.0),
    # 13 frames = 4 latent frames (the VAE decodes them to 16) at another size: the 2b sin-cos table
    # is recomputed for this grid and frame count.
    dict(G2B, name="2b_13_frames", steps=3, seed=11, num_frames=13, height=32, width=48, guidance_scale=5.0),
]

# The diffusers caching guide's CogVideoX configurations.
PAB_GUIDE = dict(kind=PAB, spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=[100, 800])
FASTER_GUIDE = dict(kind=FASTER, spatial_attention_block_skip_range=2,
                    spatial_attention_timestep_skip_range=[-1, 681], attention_weight=0.3,
                    low_frequency_weight_update_timestep_range=[99, 901],
                    high_frequency_weight_update_timestep_range=[-1, 301], alpha_low_frequency=1.1,
                    alpha_high_frequency=1.1, unconditional_batch_skip_range=5,
                    unconditional_batch_timestep_skip_range=[-1, 781], is_guidance_distilled=False)
TAYLOR_BASE = dict(kind=TAYLOR, cache_interval=3, disable_cache_before_step=2, max_order=1,
                   taylor_factors_dtype="float32")

# The tiny models' magnitude ratios: their MagCache calibration runs at 10 steps (the settings of
# G2B / G5B; `mag_calibrate` records the 2b one), rounded to 5 decimals.
MAG_RATIOS_2B = [1.0, 0.97869, 0.97387, 0.9804, 0.99262, 0.99377, 1.01753, 0.96453, 1.00059, 0.99584]
MAG_RATIOS_5B = [1.0, 0.96852, 1.00036, 1.07808, 0.99843, 1.03809, 0.9913, 1.01252, 0.99776, 1.02979]

# Cache cases: `cache` in the server's API field names (ranges [min, max]).
CACHE_CASES = [
    # PAB: the guide's config on DDIM at 10 steps (timesteps 999, 899, ..., 99), and N = 3 always in range.
    dict(G2B, name="pab_guide", steps=10, cache=PAB_GUIDE),
    dict(G5B, name="pab_n3_full_range", steps=10,
         cache=dict(kind=PAB, spatial_attention_block_skip_range=3,
                    spatial_attention_timestep_skip_range=[-1, 1001])),
    # FasterCache: the guide's config (uncond half skipped from t < 781 on steps not a multiple of 5),
    # and the diffusers tests' one (uncond every other step, weight 0.5) on the 5b model (DPM).
    dict(G2B, name="faster_cache_guide", steps=12, cache=FASTER_GUIDE),
    dict(G5B, name="faster_cache_uncond_2", steps=12,
         cache=dict(kind=FASTER, spatial_attention_block_skip_range=2,
                    spatial_attention_timestep_skip_range=[-1, 901], attention_weight=0.5,
                    unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=[-1, 901],
                    is_guidance_distilled=False)),
    # FirstBlockCache: head transformer_blocks.0, tail transformer_blocks.{L-1}.
    dict(G5B, name="fbc", steps=10, cache=dict(kind=FBC, threshold=0.6)),
    dict(G2B, name="fbc_tests_threshold", steps=10, cache=dict(kind=FBC, threshold=0.8)),
    # MagCache: calibration (never skips; records the ratios), then fixed ratios.
    dict(G2B, name="mag_calibrate", steps=10, expect_no_change=True,
         cache=dict(kind=MAG, calibrate=True, num_inference_steps=10)),
    dict(G2B, name="mag_cache", steps=10,
         cache=dict(kind=MAG, threshold=0.06, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=10,
                    mag_ratios=MAG_RATIOS_2B)),
    dict(G5B, name="mag_cache_5b", steps=10,
         cache=dict(kind=MAG, threshold=0.1, max_skip_steps=2, retention_ratio=0.3, num_inference_steps=10,
                    mag_ratios=MAG_RATIOS_5B)),
    # TaylorSeer: naming attn1 (the default patterns fullmatch `...attn`, which no CogVideoX module
    # name is: a silent no-op), and lite mode.
    dict(G5B, name="taylor_seer_attn1", steps=10,
         cache=dict(TAYLOR_BASE, cache_identifiers=[r"transformer_blocks\.\d+\.attn1"])),
    dict(G2B, name="taylor_seer_default_noop", steps=10, expect_no_change=True, cache=dict(TAYLOR_BASE)),
    dict(G5B, name="taylor_seer_lite", steps=10, cache=dict(TAYLOR_BASE, use_lite_mode=True)),
]


# ----------------------------------------------------------------------------------------------------
# Models


def build_model(spec: dict, root: Path, tokenizer_dir: Path) -> Path:
    """Builds one tiny CogVideoXPipeline and saves it under `root / spec["name"]`."""
    seed = spec["seed"]
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(**spec["transformer"]).eval()
    jitter_norms(transformer, seed)
    vae = make_cogvideox_vae(dict(seed=seed + 1, config=spec["vae"]))
    assert vae.config.latent_channels == transformer.config.in_channels == transformer.config.out_channels
    text_encoder = tc.make_t5_encoder(seed + 2, vocab_size=T5_VOCAB, **spec["t5"])
    assert text_encoder.config.d_model == transformer.config.text_embed_dim
    scheduler_cls, scheduler_config = spec["scheduler"]
    pipe = CogVideoXPipeline(tokenizer=T5TokenizerFast.from_pretrained(str(tokenizer_dir)),
                             text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler_cls(**scheduler_config))
    out = root / spec["name"]
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out))
    # The tokenizer folder as built (spiece.model + tokenizer.json), not re-saved.
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    return out


def load_pipe(folder: Path) -> CogVideoXPipeline:
    """The pipeline as the Rust side loads it: from disk, fp32."""
    pipe = CogVideoXPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_entry(spec: dict, pipe: CogVideoXPipeline) -> dict:
    c = pipe.transformer.config
    return {
        "name": spec["name"],
        "dir": spec["name"],
        "scheduler": type(pipe.scheduler).__name__,
        "rope": bool(c.use_rotary_positional_embeddings),
        "num_layers": c.num_layers,
        "max_text_seq_length": c.max_text_seq_length,
        "latent_channels": pipe.vae.config.latent_channels,
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
        "vae_scale_factor_spatial": pipe.vae_scale_factor_spatial,
        "vae_scale_factor_temporal": pipe.vae_scale_factor_temporal,
    }


# ----------------------------------------------------------------------------------------------------
# Running a generation


class CogVideoXCounter(Counter):
    """Counts, per step, the CogVideoX blocks and `attn1` modules whose inner layers ran, and the
    batch the transformer's inner forward ran at."""

    def __init__(self):
        super().__init__()
        self.batch = None
        self.batches: list[int] = []

    def watch(self, transformer):
        for block in transformer.transformer_blocks:
            block.norm1.register_forward_pre_hook(lambda *_: self._add("blocks"))
            block.attn1.to_q.register_forward_pre_hook(lambda *_: self._add("attention"))
        # patch_embed(text_embeds, image_embeds): runs once per forward, after FasterCache's split.
        transformer.patch_embed.register_forward_pre_hook(lambda _m, args: setattr(self, "batch", args[0].shape[0]))

    def end_step(self):
        super().end_step()
        self.batches.append(self.batch)
        self.batch = None


def hook_counts(transformer) -> dict[str, int]:
    """How many modules carry each diffusers hook."""
    counts: dict[str, int] = {}
    for _, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry):
            for name in registry.hooks:
                counts[name] = counts.get(name, 0) + 1
    return counts


def generate(pipe: CogVideoXPipeline, case: dict, output_type: str, dpm_draws: list | None = None,
             cache: dict | None = None) -> dict:
    """Runs CogVideoXPipeline for one case (on a copy of its transformer, with `cache` enabled);
    returns the reference tensors and per-step records."""
    transformer = copy.deepcopy(pipe.transformer)
    pipe = CogVideoXPipeline(**{**pipe.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    counter = CogVideoXCounter()
    counter.watch(transformer)
    if cache is not None:
        config = diffusers_config(cache, pipe)
        if cache["kind"] == FASTER:
            config.tensor_format = "BFCHW"
        transformer.enable_cache(config)

    # The initial latents exactly as prepare_latents drew them.
    drawn = {}
    prepare_latents = pipe.prepare_latents

    def recording_prepare_latents(*args, **kwargs):
        drawn["noise"] = prepare_latents(*args, **kwargs)
        drawn["draws_before"] = len(dpm_draws) if dpm_draws is not None else 0
        return drawn["noise"].clone()

    pipe.prepare_latents = recording_prepare_latents

    records = {"timesteps": [], "guidance": [], "steps": [], "draws": []}

    def on_step_end(p, i, t, kwargs):
        counter.end_step()
        records["timesteps"].append(int(t))
        records["guidance"].append(float(p._guidance_scale))
        records["steps"].append(kwargs["latents"].detach().clone())
        if i == 0:
            records["prompt_embeds"] = kwargs["prompt_embeds"].detach().clone()
        if dpm_draws is not None:
            records["draws"].append(len(dpm_draws))
        return kwargs

    kwargs = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=case["height"],
                  width=case["width"], num_frames=case["num_frames"], num_inference_steps=case["steps"],
                  guidance_scale=case["guidance_scale"], use_dynamic_cfg=case["use_dynamic_cfg"],
                  generator=torch.Generator("cpu").manual_seed(case["seed"]),
                  max_sequence_length=case["max_sequence_length"], output_type=output_type,
                  callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    hooks = hook_counts(transformer)
    printed = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(printed):
        frames = pipe(**kwargs).frames

    tensors = {"noise": drawn["noise"], "prompt_embeds": records["prompt_embeds"],
               "timesteps": pipe.scheduler.timesteps.clone(), "latents": records["steps"][-1].clone()}
    tensors.update({f"step{i}": s for i, s in enumerate(records["steps"])})
    out = {"tensors": tensors, "timesteps": records["timesteps"], "guidance_per_step": records["guidance"],
           "decisions": counter.steps, "batch_per_step": counter.batches, "hooks": hooks,
           "printed": printed.getvalue()}
    if output_type == "np":
        # frames: float32 [B, F, H, W, 3] in [0, 1].
        video = np.round(frames[0] * 255).astype(np.uint8)
        tensors["video"] = torch.from_numpy(np.ascontiguousarray(video))
    if dpm_draws is not None:
        marks = [drawn["draws_before"]] + records["draws"]
        out["dpm_draws_per_step"] = [b - a for a, b in zip(marks, marks[1:])]
        for i, (a, b) in enumerate(zip(marks, marks[1:])):
            for j, noise in enumerate(dpm_draws[a:b]):
                tensors[f"dpm_noise{i}_{j}"] = noise
    return out


def case_entry(case: dict, result: dict, reference: str) -> dict:
    """The manifest entry of a case (settings + what the run recorded)."""
    tensors = result["tensors"]
    entry = {k: v for k, v in case.items() if k != "expect_no_change"}
    entry.update({
        "cache": case.get("cache"),
        "timesteps": result["timesteps"],
        "guidance_per_step": result["guidance_per_step"],
        "latent_shape": list(tensors["noise"].shape),
        "video_shape": list(tensors["video"].shape) if "video" in tensors else None,
        "reference": reference,
        "decisions": result["decisions"],
        "batch_per_step": result["batch_per_step"],
        "hooks": result["hooks"],
        "uncached_change": result.get("uncached_change"),
        "expect_no_change": bool(case.get("expect_no_change", False)),
    })
    for key in ("dpm_draws_per_step", "calibrated_mag_ratios"):
        if key in result:
            entry[key] = result[key]
    return entry


# ----------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="data directory (tests/parity/data/cogvideox_pipeline)")
    parser.add_argument("--only", help="regex: run only the matching cases and write no references (exploring)")
    args = parser.parse_args()
    start = time.perf_counter()
    root = Path(args.out)
    if not args.only and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    warnings.simplefilter("ignore", (FutureWarning, UserWarning))
    # Quiet: the tiny prompts are truncated on purpose, FasterCache warns that it is experimental.
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    dpm_draws = record_dpm_draws()

    tokenizer_dir = root / "_tokenizer"
    if tokenizer_dir.exists():
        shutil.rmtree(tokenizer_dir)
    tc.make_t5_tokenizer(tokenizer_dir)
    manifest = {"diffusers_version": diffusers.__version__, "torch_version": torch.__version__,
                "models": [], "cases": []}
    pipes = {}
    for spec in MODELS:
        pipe = load_pipe(build_model(spec, root, tokenizer_dir))
        pipes[spec["name"]] = pipe
        manifest["models"].append(model_entry(spec, pipe))
    shutil.rmtree(tokenizer_dir)

    def draws_for(pipe):
        return dpm_draws if isinstance(pipe.scheduler, CogVideoXDPMScheduler) else None

    def write(case, result):
        if args.only:
            return
        reference = f"{case['name']}.safetensors"
        save_file({k: v.contiguous() for k, v in result["tensors"].items()}, str(root / reference))
        manifest["cases"].append(case_entry(case, result, reference))

    for case in CASES:
        if args.only and not re.search(args.only, case["name"]):
            continue
        pipe = pipes[case["model"]]
        result = generate(pipe, case, "np", draws_for(pipe))
        extra = f"; DPM draws per step {result['dpm_draws_per_step']}" if "dpm_draws_per_step" in result else ""
        print(f"{case['name']}: timesteps {result['timesteps']}, batch {result['batch_per_step'][0]}, "
              f"video {tuple(result['tensors']['video'].shape)}{extra}")
        if case["use_dynamic_cfg"]:
            print(f"  guidance per step {result['guidance_per_step']}")
        write(case, result)

    uncached = {}
    for case in CACHE_CASES:
        if args.only and not re.search(args.only, case["name"]):
            continue
        pipe = pipes[case["model"]]
        result = generate(pipe, case, "latent", draws_for(pipe), cache=case["cache"])
        key = json.dumps({k: v for k, v in case.items() if k not in ("name", "cache", "expect_no_change")},
                         sort_keys=True)
        if key not in uncached:
            uncached[key] = generate(pipe, case, "latent", draws_for(pipe))["tensors"]["latents"]
        change = (result["tensors"]["latents"] - uncached[key]).abs().max().item()
        result["uncached_change"] = change
        if case["cache"].get("calibrate"):
            found = re.findall(r"^\[.*\]$", result["printed"], flags=re.M)
            if not found:
                raise RuntimeError(f"{case['name']}: no calibration output")
            result["calibrated_mag_ratios"] = json.loads(found[0])
        print(f"{case['name']}: uncached_change {change:.3e}; hooks {result['hooks']}")
        print(f"  timesteps {result['timesteps']}")
        print(f"  [blocks, attention] per step {result['decisions']}")
        print(f"  batch per step {result['batch_per_step']}")
        if "calibrated_mag_ratios" in result:
            print(f"  calibrated ratios {[round(r, 5) for r in result['calibrated_mag_ratios']]}")
        if case.get("expect_no_change"):
            if change != 0.0:
                raise RuntimeError(f"{case['name']}: expected no change, got {change:.3e}")
        elif change < 1e-3:
            raise RuntimeError(f"{case['name']}: the cache does not change the output; pick another config")
        write(case, result)

    if not args.only:
        with open(root / "manifest.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest['models'])} models and {len(manifest['cases'])} cases to {root} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
