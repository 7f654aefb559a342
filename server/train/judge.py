"""Judges images that something else generated (e.g. the Rust server) with analyse.py.

    python server/train/judge.py --manifest DIR/manifest.json [--threshold 0.9]

The manifest is a JSON list of {"image": path, "prompt": dataset prompt}. Prints one JSON object
(agreement rate and per-attribute rates) and exits 1 when the agreement is below --threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import analyse  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--threshold", type=float, default=0.0)
    args = p.parse_args()
    entries = json.loads(Path(args.manifest).read_text())
    counts = {a: 0 for a in (*analyse.ATTRIBUTES, "all")}
    for e in entries:
        image = np.asarray(Image.open(e["image"]).convert("RGB"))
        for attribute, ok in analyse.agreement(image, e["prompt"]).items():
            counts[attribute] += int(ok)
    rates = {a: c / len(entries) for a, c in counts.items()}
    print(json.dumps({"images": len(entries), "agreement": rates["all"], "per_attribute": rates}))
    return 0 if rates["all"] >= args.threshold else 1


if __name__ == "__main__":
    sys.exit(main())
