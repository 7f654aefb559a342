"""Procedural captioned-shapes dataset of the default model.

Everything the dataset can say or draw (colours, shapes, positions, the prompt template, size and
jitter ranges) comes from ``dataset.json`` beside this file; ``analyse.py`` reads the same file, so
the analyser judges generated images with exactly the vocabulary and geometry they were trained on.

An example is a coloured shape on a flat coloured background, e.g. "a red circle at the top left on
a blue background". Shapes are drawn 4x supersampled and box-filtered (anti-aliased edges).

The text-to-image data has one image per prompt: a prompt fully determines its image, which a
model this small learns in a CPU budget (with random sizes and offsets it only learned blobs). The
geometry is aligned to the transformer's token grid (a token is 2x2 latents = 8x8 pixels): shape
centres at 1/4, 1/2, 3/4 of the side and a 12-pixel half size, so a shape at any position is the
same token pattern shifted by whole tokens, which RoPE attention reproduces exactly. The VAE
instead trains on randomised geometry (``vae_augmentation``: its own centre grid, sizes and
sub-pixel offsets) so it reconstructs edges anywhere.

Example ``i`` of a dataset with seed ``s`` is a pure function of ``(s, i)`` (numpy PCG64 seeded with
both), so any subset can be regenerated in any order.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SPEC_PATH = Path(__file__).with_name("dataset.json")
SPEC = json.loads(SPEC_PATH.read_text())

IMAGE_SIZE: int = SPEC["image_size"]
COLORS: dict[str, tuple[int, int, int]] = {k: tuple(v) for k, v in SPEC["colors"].items()}
SHAPES: list[str] = list(SPEC["shapes"])
POSITIONS: dict[str, dict] = SPEC["positions"]
DEFAULTS: dict = SPEC["defaults"]
TEMPLATE: str = SPEC["template"]


@dataclass(frozen=True)
class Example:
    """One image's parameters. ``half_size``, ``dx``, ``dy`` are fractions of the image side."""

    color: str
    shape: str
    position: str
    background: str
    half_size: float = SPEC["half_size"]
    dx: float = 0.0
    dy: float = 0.0
    vae_grid: bool = False  # centre from vae_augmentation.grid instead of the position's centre

    @property
    def attributes(self) -> dict[str, str]:
        return {"background": self.background, "color": self.color, "shape": self.shape, "position": self.position}

    @property
    def prompt(self) -> str:
        return caption(self.color, self.shape, self.position, self.background)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(color: str, shape: str, position: str, background: str) -> str:
    return TEMPLATE.format(article=_article(color), color=color, shape=shape, position=POSITIONS[position]["phrase"],
                           background_article=_article(background), background=background)


def all_attribute_combinations() -> list[tuple[str, str, str, str]]:
    """(color, shape, position, background) for every prompt the dataset can produce, in a fixed order.
    The shape never has the background's colour (it would be invisible)."""
    return [(c, s, p, b) for c, s, p, b in itertools.product(COLORS, SHAPES, POSITIONS, COLORS) if c != b]


def all_prompts() -> list[str]:
    return [caption(*combo) for combo in all_attribute_combinations()]


def vocabulary() -> list[str]:
    """Every word a prompt can contain, sorted (what the tokenizers are built from)."""
    words = set(re.sub(r"\{\w+\}", " ", TEMPLATE).split()) | {_article(c) for c in COLORS}
    words.update(w for name in list(COLORS) + SHAPES for w in name.split())
    words.update(w for p in POSITIONS.values() for w in p["phrase"].split())
    return sorted(words)


@lru_cache(maxsize=1)
def _prompt_table() -> dict[str, dict[str, str]]:
    return {caption(*combo): dict(zip(("color", "shape", "position", "background"), combo))
            for combo in all_attribute_combinations()}


def parse_prompt(prompt: str) -> dict[str, str] | None:
    """Attributes a dataset prompt asks for (whitespace and case normalised), or None if the prompt is
    not one the dataset can produce."""
    return _prompt_table().get(" ".join(prompt.lower().split()))


def sample_example(rng: np.random.Generator, augment: bool = False) -> Example:
    """Random attributes; with ``augment``, random size and offset too (the VAE's training images)."""
    combos = all_attribute_combinations()
    combo = combos[rng.integers(len(combos))]
    if not augment:
        return Example(*combo)
    lo, hi = SPEC["vae_augmentation"]["half_size_range"]
    jitter = SPEC["vae_augmentation"]["center_jitter"]
    half_size, dx, dy = rng.uniform(lo, hi), rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)
    return Example(*combo, half_size=float(half_size), dx=float(dx), dy=float(dy), vae_grid=True)


def dataset_example(seed: int, index: int, augment: bool = False) -> Example:
    """Example ``index`` of the dataset with ``seed``: independent of every other index."""
    return sample_example(np.random.default_rng([seed, index]), augment)


def prompt_examples() -> list[Example]:
    """The text-to-image training set: one example per prompt, in all_attribute_combinations order."""
    return [Example(*combo) for combo in all_attribute_combinations()]


def shape_mask(shape: str, box: tuple[float, float, float, float], size: int = IMAGE_SIZE,
               supersample: int = SPEC["supersample"]) -> np.ndarray:
    """Coverage in [0, 1] (float32, size x size) of ``shape`` drawn to fill ``box`` = (x0, y0, x1, y1)
    in pixel coordinates. Each shape exactly fills its box, so the analyser can fit a template to the
    bounding box it measures."""
    s = supersample
    x0, y0, x1, y1 = (v * s for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":  # apex up
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _vae_grid_center(position: str) -> tuple[float, float]:
    """The position's cell on the VAE's own centre grid (same column / row order)."""
    xs = sorted({p["center"][0] for p in POSITIONS.values()})
    ys = sorted({p["center"][1] for p in POSITIONS.values()})
    grid = SPEC["vae_augmentation"]["grid"]
    cx, cy = POSITIONS[position]["center"]
    return grid[xs.index(cx)], grid[ys.index(cy)]


def example_box(ex: Example, size: int = IMAGE_SIZE) -> tuple[float, float, float, float]:
    cx, cy = _vae_grid_center(ex.position) if ex.vae_grid else POSITIONS[ex.position]["center"]
    cx, cy, h = (cx + ex.dx) * size, (cy + ex.dy) * size, ex.half_size * size
    return (cx - h, cy - h, cx + h, cy + h)


def render(ex: Example, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB uint8 image (size x size x 3)."""
    alpha = shape_mask(ex.shape, example_box(ex, size), size)[..., None]
    bg = np.asarray(COLORS[ex.background], np.float32)
    fg = np.asarray(COLORS[ex.color], np.float32)
    return np.clip(np.rint(bg * (1 - alpha) + fg * alpha), 0, 255).astype(np.uint8)


def render_batch(examples: list[Example]) -> np.ndarray:
    """Float32 NCHW batch in [-1, 1], the range the VAE sees (diffusers' image processor convention)."""
    images = np.stack([render(ex) for ex in examples]).astype(np.float32)
    return images.transpose(0, 3, 1, 2) / 127.5 - 1.0


def eval_pairs() -> list[dict]:
    """The fixed 50 prompt/seed pairs (``prompt``, ``seed``) of the evaluation."""
    return list(SPEC["eval_pairs"])


def draw_eval_pairs(n: int = 50, seed: int = 2024) -> list[dict]:
    """How the ``eval_pairs`` of dataset.json were drawn (kept for the record; the JSON is the source)."""
    rng = np.random.default_rng(seed)
    combos = all_attribute_combinations()
    picks = rng.choice(len(combos), size=n, replace=False)
    return [{"prompt": caption(*combos[i]), "seed": int(rng.integers(0, 2**31 - 1))} for i in picks]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write example images of the dataset.")
    parser.add_argument("--out", default="out/dataset_examples")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", action="store_true", help="the VAE's randomised geometry")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        ex = dataset_example(args.seed, i, args.augment)
        Image.fromarray(render(ex)).save(out / f"{i:03d}.png")
        print(f"{i:03d}.png  {ex.prompt}")
    print(f"{len(all_prompts())} prompts, vocabulary ({len(vocabulary())} words): {' '.join(vocabulary())}")
