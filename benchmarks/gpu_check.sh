#!/usr/bin/env bash
# The whole GPU check as one command (GPU time comes in short leases): the CUDA tests, the GPU
# benchmark rows of BENCHMARKS.md, and a short shapes training evaluated in fp32 and bf16.
# Writes JSON (a status per step, and the numbers) and logs to $OUT (default output/gpu_check).
# Exits non-zero when any step failed or was skipped. Budget: under 8 minutes on one H200.
#
#   make gpu-check            # or: bash benchmarks/gpu_check.sh
#
# The steps live in benchmarks/gpu_check.py. On a machine without registry access, ship
# pycocotools/albumentations as wheels in .whl/ (see README "GPU check"); they are installed into
# .site/ and put on PYTHONPATH with the project.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: benchmarks/..
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
  export PYTHONPATH=$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
PYTHON=$PY exec $PY benchmarks/gpu_check.py
