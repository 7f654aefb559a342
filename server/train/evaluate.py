"""Checks that a model folder draws what it is asked: generates the fixed 50 prompt/seed pairs of
dataset.json with diffusers' FluxPipeline (no cache) and judges every image with analyse.py.

    python server/train/evaluate.py --model models/default --pairs 50 [--steps N] [--save out/eval]

Prints the agreement rate (all four attributes right) and the per-attribute rates; exits 1 when the
agreement is below --threshold (default 0.9). Image i uses `torch.Generator("cpu").manual_seed(seed_i)`
as the generator, the dataset's default size / steps / max_sequence_length unless overridden.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Waiting OpenMP threads must sleep, not spin: on a shared machine a spinning thread waits for a
# descheduled peer, and a 2-thread step got 4x slower than a 1-thread one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import analyse  # noqa: E402
import dataset  # noqa: E402


def main() -> int:
    d = dataset.DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/default")
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--steps", type=int, default=d["num_inference_steps"])
    p.add_argument("--size", type=int, default=d["height"])
    p.add_argument("--max-sequence-length", type=int, default=d["max_sequence_length"])
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", help="folder to write the images and a report.json to")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    from diffusers import FluxPipeline
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    pipe = FluxPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    pairs = dataset.eval_pairs()[: args.pairs]
    if len(pairs) < args.pairs:
        raise SystemExit(f"dataset.json has only {len(pairs)} pairs")
    save = Path(args.save) if args.save else None
    if save:
        save.mkdir(parents=True, exist_ok=True)

    # Denoising step durations (transformer + scheduler), from the pipeline's step-end callback.
    step_times: list[float] = []
    last = [0.0]

    def on_step_end(_pipe, i, _t, _kwargs):
        now = time.perf_counter()
        if i > 0:
            step_times.append(now - last[0])
        last[0] = now
        return {}

    totals = {a: 0 for a in (*analyse.ATTRIBUTES, "all")}
    rows, t0 = [], time.time()
    for i, pair in enumerate(pairs):
        image = pipe(pair["prompt"], height=args.size, width=args.size, num_inference_steps=args.steps,
                     max_sequence_length=args.max_sequence_length, callback_on_step_end=on_step_end,
                     generator=torch.Generator("cpu").manual_seed(pair["seed"])).images[0]
        verdict = analyse.agreement(image, pair["prompt"])
        found = analyse.analyse(image)
        for k, ok in verdict.items():
            totals[k] += ok
        rows.append({**pair, "found": {a: found[a] for a in analyse.ATTRIBUTES}, "ok": verdict["all"]})
        if save:
            image.save(save / f"{i:02d}.png")
        if not verdict["all"]:
            wrong = {a: found[a] for a in analyse.ATTRIBUTES if not verdict[a]}
            print(f"  miss {i:02d} seed {pair['seed']}: {pair['prompt']!r} -> {wrong}")
    seconds = time.time() - t0
    n = len(pairs)
    rates = {k: v / n for k, v in totals.items()}
    print(f"agreement {rates['all']:.1%} ({totals['all']}/{n}) at {args.steps} steps, {args.size}x{args.size}, "
          f"max_sequence_length {args.max_sequence_length}; "
          + ", ".join(f"{a} {rates[a]:.1%}" for a in analyse.ATTRIBUTES)
          + f"; {seconds / n:.2f}s per image, median step {1000 * float(np.median(step_times)):.1f} ms")
    if save:
        (save / "report.json").write_text(json.dumps({"rates": rates, "steps": args.steps, "size": args.size,
                                                       "median_step_s": float(np.median(step_times)),
                                                       "pairs": rows}, indent=2))
    return 0 if rates["all"] >= args.threshold else 1


if __name__ == "__main__":
    sys.exit(main())
