"""References for the step caches: diffusers' own caches run on the tiny FLUX pipelines.

Reads the tiny pipelines ``make_reference.py`` wrote under ``--data`` (``tests/parity/data``) and
writes ``<data>/cache/``:

* ``<case>.safetensors``: the final packed latents of one cached generation;
* ``manifest.json``: per case, the generation settings, the cache config in the server's API field
  names (``cache``; optionally a ``switch`` to another config, or a ``reset``, before some step),
  the per-step counts of computed blocks and attention modules (``decisions``, summed over the CFG
  forwards of the step, as the server's step stats are), MagCache calibration ratios, and which
  semantics the reference follows (``reference``).

Every generation runs FluxPipeline (fp32, CPU) with ``pipe.transformer.enable_cache(config)``;
PAB and FasterCache get ``current_timestep_callback=lambda: pipe.current_timestep``. A module
"computed" when its inner layers ran: blocks are counted by their first norm, attention by its
query projection (forward pre-hooks on ``norm1`` / ``norm`` and ``attn.to_q``).

Where the server's documented semantics differ from diffusers, ``reference`` says what the case is
compared with instead:

* ``per_branch``: PAB / FasterCache under true CFG. diffusers shares their state between FLUX's
  separately run cond and uncond forwards; the server keeps it per branch. The reference is
  diffusers' code arranged to follow ours: the uncond forwards run on a twin transformer carrying
  its own, identical cache hooks.
* ``self_consistency``: FasterCache's unconditional-branch reuse with FLUX's sequential true CFG,
  which diffusers cannot run (it needs a batched [uncond; cond] forward). The reference is a
  Python re-implementation of the server's own algorithm, so the case is a self-consistency check,
  not parity with diffusers (the batched-CFG uncond skip diffusers does implement is compared with
  diffusers itself on CogVideoX: ``make_cogvideox_pipeline_reference.py``,
  ``server/tests/parity_cogvideox_pipeline.rs``). The cond forwards run diffusers' attention hooks
  in distilled mode, told an out-of-range timestep at steps whose uncond forward runs (diffusers
  computes every attention of a full-batch forward); the uncond forward either runs on an uncached
  twin (then the band deltas are taken with diffusers' ``_split_low_high_freq``) or is rebuilt from
  the step's cond output the way diffusers' denoiser hook rebuilds the uncond half, on the
  unpacked ``[B, C, h, w]`` latent.

TaylorSeer's lite mode needs no special reference: the server skips the blocks instead of zeroing
them, which changes no output (diffusers' predicted ``proj_out`` ignores its input).

Run after ``make_reference.py``: ``python tests/parity/make_cache_reference.py --data tests/parity/data``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import re
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    FluxPipeline,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.hooks.faster_cache import _split_low_high_freq
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

FLUX_RATIOS = [float(r) for r in FLUX_MAG_RATIOS]

# Generation settings shared by the cases (tiny models, 16x16 pixels = 8x8 latent = 16 tokens).
DEV = dict(model="dev_like", prompt="A photo of a cat sitting on a red chair.", width=16, height=16,
           guidance=3.5, seed=0, max_sequence_length=16)
DEV_CFG = dict(DEV, negative_prompt="blurry, low quality", true_cfg_scale=2.5, seed=7)
SCHNELL = dict(model="schnell_like", prompt="A red vintage car parked in front of a diner", width=32,
               height=32, guidance=0.0, seed=123, max_sequence_length=16)

PAB = "pyramid_attention_broadcast"
FASTER = "faster_cache"
TAYLOR = "taylor_seer"
FBC = "first_block_cache"
MAG = "mag_cache"

# `cache` / `switch.cache` use the server's API field names; ranges are [min, max].
CASES = [
    # PAB: the diffusers docs' config, and an always-in-range one with N = 3.
    dict(DEV, name="pab_docs", steps=12,
         cache=dict(kind=PAB, spatial_attention_block_skip_range=2,
                    spatial_attention_timestep_skip_range=[100, 800])),
    dict(SCHNELL, name="pab_n3_full_range", steps=8,
         cache=dict(kind=PAB, spatial_attention_block_skip_range=3,
                    spatial_attention_timestep_skip_range=[-1, 1001])),
    dict(DEV_CFG, name="pab_true_cfg", steps=8, reference="per_branch",
         cache=dict(kind=PAB, spatial_attention_block_skip_range=2,
                    spatial_attention_timestep_skip_range=[-1, 1001])),
    # FasterCache on FLUX-dev (guidance-distilled): the diffusers tests' and docs' configs, and a
    # step-linear weight.
    dict(DEV, name="faster_cache_tests", steps=8,
         cache=dict(kind=FASTER, spatial_attention_block_skip_range=2,
                    spatial_attention_timestep_skip_range=[-1, 901], attention_weight=0.5,
                    is_guidance_distilled=True)),
    dict(DEV, name="faster_cache_docs", steps=10,
         cache=dict(kind=FASTER, spatial_attention_block_skip_range=2,
                    spatial_attention_timestep_skip_range=[-1, 681], attention_weight=0.3,
                    is_guidance_distilled=True)),
    dict(SCHNELL, name="faster_cache_linear_weight", steps=8,
         cache=dict(kind=FASTER, spatial_attention_block_skip_range=3,
                    spatial_attention_timestep_skip_range=[-1, 901],
                    attention_weight=dict(linear=[0.2, 0.8]), is_guidance_distilled=True)),
    dict(DEV_CFG, name="faster_cache_true_cfg_distilled", steps=8, reference="per_branch",
         cache=dict(kind=FASTER, spatial_attention_block_skip_range=2,
                    spatial_attention_timestep_skip_range=[-1, 901], is_guidance_distilled=True)),
    dict(DEV_CFG, name="faster_cache_uncond_reuse", steps=10, reference="self_consistency",
         cache=dict(kind=FASTER, spatial_attention_block_skip_range=2,
                    spatial_attention_timestep_skip_range=[-1, 901],
                    unconditional_batch_skip_range=3, unconditional_batch_timestep_skip_range=[-1, 901],
                    low_frequency_weight_update_timestep_range=[-1, 901],
                    high_frequency_weight_update_timestep_range=[-1, 501],
                    alpha_low_frequency=1.1, alpha_high_frequency=1.2, is_guidance_distilled=False)),
    # TaylorSeer: the diffusers docstring's config, second order, lite mode, true CFG.
    dict(DEV, name="taylor_seer_docstring", steps=14,
         cache=dict(kind=TAYLOR, cache_interval=5, disable_cache_before_step=3, max_order=1,
                    taylor_factors_dtype="float32")),
    dict(SCHNELL, name="taylor_seer_order2_cooldown", steps=12,
         cache=dict(kind=TAYLOR, cache_interval=3, disable_cache_before_step=2,
                    disable_cache_after_step=10, max_order=2, taylor_factors_dtype="float32")),
    dict(DEV, name="taylor_seer_lite", steps=12,
         cache=dict(kind=TAYLOR, cache_interval=3, disable_cache_before_step=3, max_order=1,
                    taylor_factors_dtype="float32", use_lite_mode=True)),
    dict(DEV_CFG, name="taylor_seer_true_cfg", steps=10,
         cache=dict(kind=TAYLOR, cache_interval=3, disable_cache_before_step=2, max_order=1,
                    taylor_factors_dtype="float32")),
    # FirstBlockCache: the diffusers tests' threshold and a tighter one.
    dict(DEV, name="fbc_tests", steps=10, cache=dict(kind=FBC, threshold=0.8)),
    dict(SCHNELL, name="fbc_tight", steps=10, cache=dict(kind=FBC, threshold=0.3)),
    dict(DEV_CFG, name="fbc_true_cfg", steps=10, cache=dict(kind=FBC, threshold=0.5)),
    # MagCache: FLUX ratios at the docs' defaults, the tests' flat ratios, resampled ratios,
    # calibration, true CFG.
    dict(DEV, name="mag_flux_ratios", steps=28,
         cache=dict(kind=MAG, threshold=0.06, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=28,
                    mag_ratios=FLUX_RATIOS)),
    dict(SCHNELL, name="mag_tests_flat", steps=12,
         cache=dict(kind=MAG, threshold=0.06, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=12,
                    mag_ratios=[1.0] * 12)),
    dict(DEV, name="mag_resampled", steps=16,
         cache=dict(kind=MAG, threshold=0.24, max_skip_steps=2, retention_ratio=0.25, num_inference_steps=16,
                    mag_ratios=FLUX_RATIOS)),
    dict(DEV, name="mag_calibrate", steps=8,
         cache=dict(kind=MAG, calibrate=True, num_inference_steps=8)),
    dict(DEV_CFG, name="mag_true_cfg", steps=12,
         cache=dict(kind=MAG, threshold=0.1, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=12,
                    mag_ratios=FLUX_RATIOS)),
    # A switch (disable_cache + enable_cache) and a reset (_reset_stateful_cache) between steps.
    dict(DEV, name="switch_fbc_to_taylor_seer", steps=12, cache=dict(kind=FBC, threshold=0.8),
         switch=dict(step=5, cache=dict(kind=TAYLOR, cache_interval=3, disable_cache_before_step=2,
                                        max_order=1, taylor_factors_dtype="float32"))),
    dict(DEV, name="switch_pab_to_none", steps=10,
         cache=dict(kind=PAB, spatial_attention_block_skip_range=2,
                    spatial_attention_timestep_skip_range=[-1, 1001]),
         switch=dict(step=6, cache=dict(kind="none"))),
    dict(DEV, name="reset_mag_cache", steps=16,
         cache=dict(kind=MAG, threshold=0.1, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=16,
                    mag_ratios=FLUX_RATIOS),
         reset=8),
    dict(DEV, name="reset_taylor_seer", steps=12,
         cache=dict(kind=TAYLOR, cache_interval=3, disable_cache_before_step=2, max_order=1,
                    taylor_factors_dtype="float32"),
         reset=6),
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def diffusers_config(spec: dict, pipe: FluxPipeline, attention_timestep=None):
    """The diffusers config for an API-style `spec` (None for no cache). Unset fields keep
    diffusers' defaults, which the server resolves to the same values."""
    kind = spec["kind"]
    fields = {k: v for k, v in spec.items() if k != "kind"}
    ranges = {k: tuple(v) for k, v in fields.items() if k.endswith("_range") and isinstance(v, list)}
    fields.update(ranges)
    timestep = lambda: pipe.current_timestep  # noqa: E731
    if kind == "none":
        return None
    if kind == PAB:
        return PyramidAttentionBroadcastConfig(current_timestep_callback=timestep, **fields)
    if kind == FASTER:
        weight = fields.pop("attention_weight", 0.5)
        if isinstance(weight, dict):
            start, end = weight["linear"]
            steps = len(pipe.scheduler.timesteps)

            def attention_weight(_module):
                # The server's AttentionWeight::Linear: linear in the step fraction.
                index = int((pipe.scheduler.timesteps == pipe.current_timestep).nonzero()[0])
                return start + (end - start) * (index / (steps - 1))
        else:
            attention_weight = lambda _module, w=weight: w  # noqa: E731
        return FasterCacheConfig(current_timestep_callback=attention_timestep or timestep,
                                 attention_weight_callback=attention_weight, tensor_format="BCHW", **fields)
    if kind == TAYLOR:
        if "taylor_factors_dtype" in fields:
            fields["taylor_factors_dtype"] = DTYPES[fields["taylor_factors_dtype"]]
        return TaylorSeerCacheConfig(**fields)
    if kind == FBC:
        return FirstBlockCacheConfig(**fields)
    if kind == MAG:
        return MagCacheConfig(**fields)
    raise ValueError(f"unknown cache kind {kind}")


class Counter:
    """Counts, per step, the blocks and attention modules whose inner layers ran."""

    def __init__(self):
        self.blocks = 0
        self.attention = 0
        self.steps: list[list[int]] = []

    def watch(self, transformer):
        for block in transformer.transformer_blocks:
            block.norm1.register_forward_pre_hook(lambda *_: self._add("blocks"))
            block.attn.to_q.register_forward_pre_hook(lambda *_: self._add("attention"))
        for block in transformer.single_transformer_blocks:
            block.norm.register_forward_pre_hook(lambda *_: self._add("blocks"))
            block.attn.to_q.register_forward_pre_hook(lambda *_: self._add("attention"))

    def _add(self, what):
        setattr(self, what, getattr(self, what) + 1)

    def end_step(self):
        self.steps.append([self.blocks, self.attention])
        self.blocks = self.attention = 0


def track_context(transformer) -> dict:
    """Records the name of the cache context FluxPipeline opens around each forward."""
    current = {"name": None}
    original = transformer.cache_context

    @contextlib.contextmanager
    def cache_context(name, **kwargs):
        current["name"] = name
        with original(name, **kwargs):
            yield

    transformer.cache_context = cache_context
    return current


def route_uncond(transformer, uncond_forward):
    """Sends the forwards FluxPipeline runs in its "uncond" context to `uncond_forward`."""
    current = track_context(transformer)
    cond_forward = transformer.forward

    def forward(*args, **kwargs):
        if current["name"] == "uncond":
            return uncond_forward(*args, **kwargs)
        return cond_forward(*args, **kwargs)

    transformer.forward = forward


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def setup_uncond_reuse(pipe: FluxPipeline, twin, spec: dict, case: dict):
    """FasterCache with FLUX's sequential true CFG, re-implementing the server's semantics (module
    doc; the ``self_consistency`` reference); `twin` (uncached) runs the uncond forwards that are
    not rebuilt."""
    transformer = pipe.transformer
    state = {"steps": 0, "reuse": False, "cond": None, "deltas": None, "attention_t": None}
    transformer.enable_cache(diffusers_config(dict(spec, is_guidance_distilled=True), pipe,
                                              attention_timestep=lambda: state["attention_t"]))
    c = FasterCacheConfig()  # diffusers' defaults for the fields the case leaves out
    get = lambda key: spec.get(key, getattr(c, key))  # noqa: E731
    u_lo, u_hi = get("unconditional_batch_timestep_skip_range")
    lf_lo, lf_hi = get("low_frequency_weight_update_timestep_range")
    hf_lo, hf_hi = get("high_frequency_weight_update_timestep_range")
    vsf = pipe.vae_scale_factor
    h, w = 2 * (case["height"] // (vsf * 2)), 2 * (case["width"] // (vsf * 2))
    current = track_context(transformer)
    cond_forward = transformer.forward

    def forward(*args, **kwargs):
        t = pipe.current_timestep
        if current["name"] == "cond":
            iteration = state["steps"]
            state["steps"] += 1
            state["reuse"] = (iteration > 0 and u_lo < t < u_hi
                              and iteration % get("unconditional_batch_skip_range") != 0)
            # Full-batch steps compute every attention in diffusers: out of range = compute.
            state["attention_t"] = t if state["reuse"] else 1e9
            out = cond_forward(*args, **kwargs)
            state["cond"] = out[0]
            return out
        cond = state["cond"]
        if state["reuse"]:
            low_delta, high_delta = state["deltas"]
            low_delta = low_delta * (get("alpha_low_frequency") if lf_lo < t < lf_hi else 1.0)
            high_delta = high_delta * (get("alpha_high_frequency") if hf_lo < t < hf_hi else 1.0)
            state["deltas"] = (low_delta, high_delta)
            low, high = _split_low_high_freq(unpack(cond, h, w).float())
            uncond = torch.fft.ifft2(torch.fft.ifftshift((low_delta + low) + (high_delta + high))).real
            return (pack(uncond).to(cond.dtype),)
        out = twin(*args, **kwargs)
        low_u, high_u = _split_low_high_freq(unpack(out[0], h, w).float())
        low_c, high_c = _split_low_high_freq(unpack(cond, h, w).float())
        state["deltas"] = (low_u - low_c, high_u - high_c)
        return out

    transformer.forward = forward


def run_case(pipe: FluxPipeline, case: dict) -> tuple[torch.Tensor, dict]:
    # Hooks and routing go on copies; `twin` runs the uncond forwards of the non-diffusers references.
    reference = case.get("reference", "diffusers")
    transformer = copy.deepcopy(pipe.transformer)
    twin = copy.deepcopy(pipe.transformer) if reference != "diffusers" else None
    pipe = FluxPipeline(**{**pipe.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    counter = Counter()
    for t in (transformer, twin):
        if t is not None:
            counter.watch(t)
    spec = case["cache"]
    if reference == "per_branch":
        twin.enable_cache(diffusers_config(spec, pipe))
        transformer.enable_cache(diffusers_config(spec, pipe))
        route_uncond(transformer, twin)
    elif reference == "self_consistency":
        setup_uncond_reuse(pipe, twin, spec, case)
    else:
        transformer.enable_cache(diffusers_config(spec, pipe))

    def on_step_end(_pipe, i, _t, kwargs):
        counter.end_step()
        switch = case.get("switch")
        if switch and i + 1 == switch["step"]:
            transformer.disable_cache()
            config = diffusers_config(switch["cache"], pipe)
            if config is not None:
                transformer.enable_cache(config)
        if case.get("reset") == i + 1:
            transformer._reset_stateful_cache()
        return kwargs

    kwargs = dict(prompt=case["prompt"], width=case["width"], height=case["height"],
                  num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                  max_sequence_length=case["max_sequence_length"],
                  generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="latent",
                  callback_on_step_end=on_step_end)
    if case.get("negative_prompt") is not None:
        kwargs.update(negative_prompt=case["negative_prompt"], true_cfg_scale=case["true_cfg_scale"])
    printed = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(printed):
        latents = pipe(**kwargs).images
    extra = {"decisions": counter.steps, "reference": reference}
    if spec.get("calibrate"):
        # diffusers prints the ratios when the run completes (one list per context: cond first).
        found = re.findall(r"^\[.*\]$", printed.getvalue(), flags=re.M)
        if not found:
            raise RuntimeError(f"{case['name']}: no calibration output")
        extra["calibrated_mag_ratios"] = json.loads(found[0])
    return latents, extra


def run_uncached(pipe: FluxPipeline, case: dict) -> torch.Tensor:
    kwargs = dict(prompt=case["prompt"], width=case["width"], height=case["height"],
                  num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                  max_sequence_length=case["max_sequence_length"],
                  generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="latent")
    if case.get("negative_prompt") is not None:
        kwargs.update(negative_prompt=case["negative_prompt"], true_cfg_scale=case["true_cfg_scale"])
    with torch.no_grad():
        return pipe(**kwargs).images


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="parity data directory (tests/parity/data)")
    parser.add_argument("--only", help="regex: run only the matching cases and write nothing (for exploring)")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        sys.exit(f"{data / 'manifest.json'} missing: run tests/parity/make_reference.py first")
    out = data / "cache"
    if not args.only:
        out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", (FutureWarning, UserWarning))
    # Quiet: the tiny prompts get truncated on purpose.
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    pipes = {}
    manifest = {"diffusers_version": diffusers.__version__, "torch_version": torch.__version__, "cases": []}
    for case in CASES:
        if args.only and not re.search(args.only, case["name"]):
            continue
        model = case["model"]
        if model not in pipes:
            pipes[model] = FluxPipeline.from_pretrained(str(data / model), torch_dtype=torch.float32)
            pipes[model].set_progress_bar_config(disable=True)
        latents, extra = run_case(pipes[model], case)
        uncached = run_uncached(pipes[model], case)
        change = (latents - uncached).abs().max().item()
        print(f"{case['name']}: cache changed the latents by {change:.3e}; "
              f"[blocks, attention] computed per step {extra['decisions']}")
        if change < 1e-3 and not case["cache"].get("calibrate"):
            raise RuntimeError(f"{case['name']}: the cache does not change the output; pick another config")
        if args.only:
            continue
        reference = f"{case['name']}.safetensors"
        save_file({"latents": latents.contiguous()}, str(out / reference))
        manifest["cases"].append({"negative_prompt": None, "true_cfg_scale": 1.0, **case, **extra,
                                  "output": reference, "uncached_change": change})

    if args.only:
        return
    with open(out / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest['cases'])} cache cases to {out}")


if __name__ == "__main__":
    main()
