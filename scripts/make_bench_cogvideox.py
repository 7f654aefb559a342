"""A random-weight CogVideoX pipeline as large as a CPU benchmark of a few minutes allows.

Writes a diffusers ``CogVideoXPipeline`` folder (2b architecture: sin-cos positions, DDIM with the
2b scheduler config, T5 text encoder, causal 3D VAE) to ``--out``, built with the same builders as
the parity references (``tests/parity/make_cogvideox_pipeline_reference.py``), only larger:
8 blocks of 8 heads x 64 (width 512), 32 text tokens, defaults 17 frames at 96x160 pixels
(5 latent frames of 12x20, 300 video tokens). Its outputs mean nothing (random weights), but every
module does the work a real one does, so cache speed-ups and their effect on the output (PSNR
against no cache) can be measured::

    python scripts/make_bench_cogvideox.py --out /tmp/cogvideox-bench
    cargo run --release -p denoised-server --example cache_bench -- /tmp/cogvideox-bench 50
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "parity"))
import make_cogvideox_pipeline_reference as ref  # noqa: E402
import tiny_components as tc  # noqa: E402

SPEC = dict(
    name="cogvideox-bench",
    seed=51,
    transformer=dict(num_attention_heads=8, attention_head_dim=64, in_channels=4, out_channels=4,
                     time_embed_dim=128, text_embed_dim=64, num_layers=8, sample_height=12, sample_width=20,
                     sample_frames=17, patch_size=2, max_text_seq_length=32, attention_bias=True,
                     use_rotary_positional_embeddings=False),
    t5=dict(d_model=64, layers=2, heads=4, d_kv=16, d_ff=128),
    vae=dict(ref.VAE_4_LEVELS, scaling_factor=1.15258426),
    scheduler=(ref.CogVideoXDDIMScheduler, ref.COGVIDEOX_2B),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    root = args.out.parent
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = root / f"{args.out.name}-tokenizer"
    if tokenizer_dir.exists():
        shutil.rmtree(tokenizer_dir)
    tc.make_t5_tokenizer(tokenizer_dir)
    built = ref.build_model(dict(SPEC, name=args.out.name), root, tokenizer_dir)
    shutil.rmtree(tokenizer_dir)
    # Serving defaults (diffusers ignores the file): the benchmark's size and step count.
    with open(built / "denoised.json", "w", encoding="utf-8") as f:
        json.dump({"width": 160, "height": 96, "steps": 50}, f)
    print(f"wrote {built}")


if __name__ == "__main__":
    main()
