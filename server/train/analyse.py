"""Deterministic analyser of generated images: background colour, shape colour, shape kind, position.

Reads the dataset definition (``dataset.json`` through ``dataset.py``), so it judges exactly the
colours, shapes and positions the model was trained on. It works on any square-ish RGB image
(positions are fractions of the image side), e.g. from diffusers or from the Rust server:

    python server/train/analyse.py image.png ["a red circle at the top left on a blue background"]

Method, chosen to be robust to blurry or slightly off-colour generations:
  * every pixel gets its nearest palette colour; the background is the most common one on the border;
  * the shape colour is the most common other palette colour among pixels that are close to it;
  * each pixel's coverage is its projection onto the background -> shape colour segment; the largest
    4-connected region with coverage >= 0.5 is the shape;
  * the position is the grid cell nearest to the shape's bounding-box centre (every shape fills its
    box, so the box centre is where the renderer put it);
  * the kind is the dataset shape whose template, drawn by the dataset renderer into the same box,
    overlaps the measured coverage best (soft IoU).
"""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset  # noqa: E402

ATTRIBUTES = ("background", "color", "shape", "position")
_NAMES = list(dataset.COLORS)
_PALETTE = np.asarray([dataset.COLORS[n] for n in _NAMES], np.float32)
# A pixel counts for the shape colour only when this close (RGB distance) to it: anti-aliased edges
# mix two palette colours and may land near a third one (red + yellow edges look orange).
_COLOR_TOLERANCE = 70.0
_MIN_SHAPE_PIXELS = 6


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected True region of a 2-D mask (first found wins ties: deterministic)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        region, queue = [], deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def analyse(image) -> dict:
    """Attributes of an RGB image (PIL image or HxWx3 uint8 array): background, color, shape,
    position (None where no shape is found), plus diagnostics (box, shape scores)."""
    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)[..., :3]
    h, w, _ = rgb.shape
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)  # h, w, colours
    nearest = dist.argmin(-1)

    border = np.concatenate([nearest[:2].ravel(), nearest[-2:].ravel(),
                             nearest[:, :2].ravel(), nearest[:, -2:].ravel()])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    result = {"background": _NAMES[bg], "color": None, "shape": None, "position": None, "box": None, "scores": None}

    close = (nearest != bg) & (dist.min(-1) < _COLOR_TOLERANCE)
    counts = np.bincount(nearest[close], minlength=len(_NAMES))
    if counts.max() < _MIN_SHAPE_PIXELS:
        return result
    fg = int(counts.argmax())
    result["color"] = _NAMES[fg]

    # Coverage: where each pixel lies between the background and the shape colour.
    seg = _PALETTE[fg] - _PALETTE[bg]
    coverage = np.clip(((rgb - _PALETTE[bg]) @ seg) / float(seg @ seg), 0.0, 1.0)
    region = _largest_component(coverage >= 0.5)
    if region.sum() < _MIN_SHAPE_PIXELS:
        return result
    ys, xs = np.nonzero(region)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    result["box"] = box

    cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
    centers = {name: p["center"] for name, p in dataset.POSITIONS.items()}
    result["position"] = min(centers, key=lambda n: (centers[n][0] - cx) ** 2 + (centers[n][1] - cy) ** 2)

    # Soft IoU against each template, only around the measured shape (other blobs do not count).
    near = np.zeros_like(region)
    x0, y0, x1, y1 = (int(v) for v in box)
    near[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = True
    measured = np.where(near, coverage, 0.0)
    scores = {}
    for shape in dataset.SHAPES:
        template = dataset.shape_mask(shape, box, size=max(h, w))[:h, :w]
        scores[shape] = float(np.minimum(measured, template).sum() / max(np.maximum(measured, template).sum(), 1e-6))
    result["scores"] = scores
    result["shape"] = max(dataset.SHAPES, key=lambda s: scores[s])
    return result


def agreement(image, prompt: str) -> dict[str, bool]:
    """Per-attribute agreement of the image with a dataset prompt, plus ``all``."""
    expected = dataset.parse_prompt(prompt)
    if expected is None:
        raise ValueError(f"not a dataset prompt: {prompt!r}")
    found = analyse(image)
    out = {a: found[a] == expected[a] for a in ATTRIBUTES}
    out["all"] = all(out.values())
    return out


def self_test(n: int = 400, seed: int = 12345) -> float:
    """Fraction of rendered images the analyser reads correctly (should be 1.0): every prompt's
    training image, plus ``n`` with the VAE's randomised sizes and offsets."""
    examples = dataset.prompt_examples() + [dataset.dataset_example(seed, i, augment=True) for i in range(n)]
    ok = sum(agreement(dataset.render(ex), ex.prompt)["all"] for ex in examples)
    return ok / len(examples)


if __name__ == "__main__":
    import argparse

    from PIL import Image

    parser = argparse.ArgumentParser(description="Analyse a generated image (or --self-test on rendered ones).")
    parser.add_argument("image", nargs="?")
    parser.add_argument("prompt", nargs="?")
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    if args.self_test or not args.image:
        rate = self_test()
        print(f"self-test on rendered dataset images: {rate:.1%} correct")
        sys.exit(0 if rate == 1.0 else 1)
    img = Image.open(args.image)
    found = analyse(img)
    print({k: found[k] for k in ATTRIBUTES})
    if args.prompt:
        verdict = agreement(img, args.prompt)
        print(verdict)
        sys.exit(0 if verdict["all"] else 1)
