#!/usr/bin/env bash
# The GPU check as one command on a lent GPU machine (its image has torch, timm, transformers, scikit-image; the rest
# travels as wheels made here by `make gpu-wheels` into .whl/, carried with the working tree):
#   device run: bash benchmarks/gpu_check.sh        (carry: .whl)
# Part 3 times the whole protocol suite per protocol on the synthetic set, and on the SUIM sample with the shared DINOv2
# where shared/ (data/suim_sample, models/dinov2-small-imgfocus) is in the checkout or `--shared DIR` names it.
# Part 5 trains linear-dinov2's head for 300 iterations (batch 16, 512 crops) and prints it/s and peak GPU memory.
# A CPU smoke test of every part at toy sizes: bash benchmarks/gpu_check.sh --quick --device cpu
# Output goes to the terminal and, where $OUT is set, to $OUT/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/gpu_check.log
"$PY" benchmarks/gpu_check.py "$@" 2>&1 | grep --line-buffered -v -E '^\s*$|it/s|━' | tee "$log"
