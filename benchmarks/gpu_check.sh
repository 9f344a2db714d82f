#!/usr/bin/env bash
# The whole GPU check as one command (GPU time comes in short leases): the CUDA tests, the GPU
# benchmark rows of BENCHMARKS.md, and a short shapes training evaluated in fp32 and bf16.
# Writes JSON (and logs) to $OUT (default output/gpu_check). Budget: under 8 minutes on one H200.
#
#   make gpu-check            # or: bash benchmarks/gpu_check.sh
#
# On a machine without registry access, ship pycocotools/albumentations as wheels in .whl/ (see
# README "GPU check"); they are installed into .site/ and put on PYTHONPATH with the project.
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root: benchmarks/..
OUT=${OUT:-output/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
  export PYTHONPATH=$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
start=$(date +%s)
stamp() { echo "[gpu-check $(( $(date +%s) - start )) s] $*"; }

stamp "environment"
$PY - <<'PYEOF' > "$OUT/env.json"
import json, platform, subprocess, torch, torchvision
info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    info["commit"] = None
print(json.dumps(info, indent=2))
PYEOF
cat "$OUT/env.json"

stamp "1/4 CUDA tests (pytest -m cuda)"
$PY -m pytest -q -m cuda -p no:cacheprovider tests --junitxml="$OUT/cuda_tests.xml" 2>&1 | tail -n 25 | tee "$OUT/cuda_tests.txt"

stamp "2/4 inference rows: R101-C4 800x1333, batch 1 and 8, fp32 (TF32) and bf16, detkit vs torchvision"
timeout 150 $PY -m detkit benchmark --device cuda --image-size 800 1333 --step infer --batch-size 1 8 \
  --precision fp32 bf16 --iters 10 --warmup 3 --json "$OUT/bench_infer.json" 2>&1 | tail -n 30

stamp "3/4 training rows: batch 8, fp32 (TF32) and bf16"
timeout 150 $PY -m detkit benchmark --device cuda --image-size 800 1333 --step train --batch-size 8 \
  --precision fp32 bf16 --iters 10 --warmup 3 --no-flops --json "$OUT/bench_train.json" 2>&1 | tail -n 20

stamp "4/4 shapes R18 training (configs/shapes_r18.yaml) on the GPU, then COCO eval in fp32 and bf16"
timeout 150 $PY -m detkit train configs/shapes_r18.yaml device=cuda output_dir="$OUT/shapes" data.num_workers=4 \
  test.eval_period=0 2>&1 | tail -n 5
for amp in off bf16; do
  timeout 60 $PY -m detkit eval "$OUT/shapes/config.yaml" --weights "$OUT/shapes/model_final.pth" \
    output_dir="$OUT/shapes_eval_$amp" test.amp=$amp device=cuda 2>&1 | tail -n 3
done
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"env": json.loads((out / "env.json").read_text())}
for name in ("bench_infer", "bench_train"):
    path = out / f"{name}.json"
    summary[name] = json.loads(path.read_text()) if path.is_file() else None
for amp in ("off", "bf16"):
    path = out / f"shapes_eval_{amp}" / "metrics.json"
    summary[f"shapes_ap_{amp}"] = json.loads(path.read_text()) if path.is_file() else None
train_summary = out / "shapes" / "summary.json"
summary["shapes_train"] = json.loads(train_summary.read_text()) if train_summary.is_file() else None
summary["cuda_tests"] = (out / "cuda_tests.txt").read_text().strip().splitlines()[-1:] if (out / "cuda_tests.txt").is_file() else None
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print("wrote", out / "gpu_check.json")
PYEOF
stamp "done"
