"""The demo behind `make demo`: start `denoised` on the default model, generate a few prompts with
every cache strategy through `denoised-cli`, and write to `out/`:

- `out/<strategy>/<prompt-slug>.png`: the final images,
- `out/previews/`: the streamed latent previews of one run,
- `out/contact_sheet.png`: rows = strategies, columns = prompts, captions with wall time and PSNR
  against no cache,
- `out/demo.md`: the table behind the sheet.

MagCache needs magnitude ratios for the model and step count: the demo first runs a calibration
generation (`magcache:calibrate`) and uses the ratios it returns, as a user would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PROMPTS = [
    "a red circle at the top left on a blue background",
    "a yellow square in the center on a black background",
    "a green triangle at the bottom right on a white background",
    "a purple circle at the bottom left on a yellow background",
]

# (row label, --cache spec); MagCache's ratios are filled in after calibration.
STRATEGIES = [
    ("none", "none"),
    ("pab", "pab"),
    ("fastercache", "fastercache"),
    ("taylorseer", "taylorseer"),
    ("fbc", "fbc"),
    ("magcache", None),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(cli: Path, server: str, args: list[str]) -> dict:
    out = subprocess.run(
        [str(cli), "--server", server, "generate", "--json", *args],
        check=True, capture_output=True, text=True, timeout=600,
    )
    return json.loads(out.stdout)


def wait_for_server(cli: Path, server: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"demo: the server exited with {proc.returncode}")
        ok = subprocess.run([str(cli), "--server", server, "models"], capture_output=True, timeout=30)
        if ok.returncode == 0:
            return
        time.sleep(0.5)
    sys.exit("demo: the server did not come up")


def psnr(a: Path, b: Path) -> float:
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def slug(text: str) -> str:
    return "-".join(text.split()[:4])


def contact_sheet(rows: list[tuple[str, list[dict]]], out: Path, cell: int = 160) -> None:
    font = ImageFont.load_default()
    label_w, caption_h, header_h = 110, 30, 46
    sheet = Image.new("RGB", (label_w + cell * len(PROMPTS), header_h + (cell + caption_h) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, prompt in enumerate(PROMPTS):
        for k, line in enumerate(textwrap.wrap(prompt, 26)[:3]):
            draw.text((label_w + j * cell + 4, 2 + 14 * k), line, fill="black", font=font)
    for i, (name, results) in enumerate(rows):
        y = header_h + i * (cell + caption_h)
        draw.text((4, y + cell // 2), name, fill="black", font=font)
        for j, r in enumerate(results):
            img = Image.open(r["output"]).convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(img, (label_w + j * cell, y))
            q = "ref" if math.isinf(r["psnr"]) else f"{r['psnr']:.1f} dB"
            draw.text((label_w + j * cell + 4, y + cell + 2), f"{r['wall_ms']:.0f} ms  {q}", fill="black", font=font)
            draw.text((label_w + j * cell + 4, y + cell + 15), f"full {r['full_compute_steps']}/{r['steps']}",
                      fill="black", font=font)
    sheet.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server-bin", type=Path, required=True)
    ap.add_argument("--cli-bin", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--steps", type=int, default=0, help="0: the model's default")
    ap.add_argument("--size", type=int, default=0, help="0: the model's default")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    addr = f"127.0.0.1:{free_port()}"
    server = f"http://{addr}"
    log = open(args.out / "server.log", "w")
    proc = subprocess.Popen(
        [str(args.server_bin), "--listen", addr, "--model", f"default={args.model_dir}"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "info"},
    )
    try:
        wait_for_server(args.cli_bin, server, proc)
        common = ["--model", "default", "--seed", str(args.seed)]
        if args.steps:
            common += ["--steps", str(args.steps)]
        if args.size:
            common += ["--width", str(args.size), "--height", str(args.size)]

        calib = run_cli(args.cli_bin, server, [*common, "--prompt", PROMPTS[0], "--cache", "magcache:calibrate",
                                               "--out", str(args.out / "calibration.png")])
        ratios = "/".join(f"{r:.5f}" for r in calib["calibrated_mag_ratios"])
        steps = calib["steps"]
        print(f"demo: MagCache calibrated over {steps} steps")

        rows = []
        for name, spec in STRATEGIES:
            spec = spec or f"magcache:mag_ratios={ratios},num_inference_steps={steps}"
            results = []
            for j, prompt in enumerate(PROMPTS):
                target = args.out / name / f"{slug(prompt)}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                extra = []
                if name == "none" and j == 0:
                    extra = ["--preview", "latent", "--preview-every", "1", "--preview-dir", str(args.out / "previews")]
                r = run_cli(args.cli_bin, server, [*common, "--prompt", prompt, "--cache", spec, "--out", str(target),
                                                   *extra])
                results.append(r)
                print(f"demo: {name:12s} {prompt!r}: {r['wall_ms']:.0f} ms, full {r['full_compute_steps']}/{r['steps']}")
            rows.append((name, results))
        for _, results in rows:
            for r, base in zip(results, rows[0][1]):
                r["psnr"] = psnr(Path(r["output"]), Path(base["output"]))

        contact_sheet(rows, args.out / "contact_sheet.png")
        base_ms = sum(r["wall_ms"] for r in rows[0][1])
        lines = [
            "| strategy | mean wall time | speed-up | mean PSNR vs none | full-compute steps | est. FLOPs saved |",
            "|---|---|---|---|---|---|",
        ]
        for name, results in rows:
            ms = sum(r["wall_ms"] for r in results)
            finite = [r["psnr"] for r in results if not math.isinf(r["psnr"])]
            q = f"{sum(finite) / len(finite):.1f} dB" if finite else "reference"
            full = sum(r["full_compute_steps"] for r in results) / len(results)
            saved = sum(r["estimated_flops_saved"] for r in results) / max(sum(r["estimated_flops_total"] for r in results), 1)
            lines.append(f"| {name} | {ms / len(results):.0f} ms | {base_ms / ms:.2f}x | {q} | {full:.1f}/{steps} | {100 * saved:.0f}% |")
        table = "\n".join(lines)
        (args.out / "demo.md").write_text(table + "\n")
        print(table)
        print(f"demo: wrote {args.out / 'contact_sheet.png'}")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
