#!/usr/bin/env bash
# Rebuilds models/default from nothing: trains every component (train_default.py, all phases), then
# checks it with diffusers (evaluate.py exits non-zero below 90% agreement).
# Usage: server/train/make_default.sh [extra train_default.py flags]   (from anywhere)
# Intermediate outputs go to out/train_default (git-ignored). A full run starts the transformer
# afresh; `train_default.py --phases transformer,assemble --steps N` continues from its checkpoints.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
nice -n 19 "$PY" server/train/train_default.py --work out/train_default --out models/default "$@"
nice -n 19 "$PY" server/train/evaluate.py --model models/default --pairs 50
