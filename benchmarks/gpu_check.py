"""The GPU check's steps, run one after another; exits non-zero when any step failed or was skipped.

    python benchmarks/gpu_check.py            # usually through `make gpu-check` / benchmarks/gpu_check.sh

Each step is a shell command with a time limit; its whole output goes to $OUT/<step>.log and its
last lines to the console. A step whose prerequisite did not pass is skipped, with the reason.
$OUT/gpu_check.json holds a status per step ("passed", "failed" with the exit status, "skipped"
with why) next to the numbers the steps wrote (environment, benchmark rows, shapes AP).

GPU_CHECK_CMD_<STEP> (e.g. GPU_CHECK_CMD_CUDA_TESTS='exit 3') replaces a step's command: the
driver's own test uses it to run the check without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    title: str
    command: str  # run with bash -c in the repository root; $PY and $OUT are set
    timeout_s: int
    needs: tuple[str, ...] = ("environment",)  # steps that must have passed first
    tail_lines: int = 20


ENV_SCRIPT = r"""
import json, platform, subprocess, sys, torch, torchvision
info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    info["commit"] = None
open(sys.argv[1], "w").write(json.dumps(info, indent=2))
print(json.dumps(info, indent=2))
sys.exit(0 if info["device"] else "no CUDA device: torch.cuda.is_available() is False")
"""

STEPS = [
    Step("environment", "versions and the CUDA device", f"$PY -c '{ENV_SCRIPT}' \"$OUT/env.json\"", 120, needs=()),
    Step(
        "cuda_tests",
        "CUDA tests (pytest -m cuda)",
        '$PY -m pytest -q -m cuda -p no:cacheprovider tests --junitxml="$OUT/cuda_tests.xml"',
        300,
        tail_lines=25,
    ),
    Step(
        "bench_infer",
        "inference rows: R101-C4 800x1333, batch 1 and 8, fp32 (TF32) and bf16, detkit vs torchvision",
        "$PY -m detkit benchmark --device cuda --image-size 800 1333 --step infer --batch-size 1 8 "
        '--precision fp32 bf16 --iters 10 --warmup 3 --json "$OUT/bench_infer.json"',
        150,
        tail_lines=30,
    ),
    Step(
        "bench_train",
        "training rows: batch 8, fp32 (TF32) and bf16",
        "$PY -m detkit benchmark --device cuda --image-size 800 1333 --step train --batch-size 8 "
        '--precision fp32 bf16 --iters 10 --warmup 3 --no-flops --json "$OUT/bench_train.json"',
        150,
    ),
    Step(
        "shapes_train",
        "shapes R18 training (configs/shapes_r18.yaml) on the GPU",
        '$PY -m detkit train configs/shapes_r18.yaml device=cuda output_dir="$OUT/shapes" data.num_workers=4 '
        "test.eval_period=0 --overwrite",
        150,
        tail_lines=5,
    ),
] + [
    Step(
        f"shapes_eval_{amp}",
        f"COCO eval of the shapes model, test.amp={amp}",
        f'$PY -m detkit eval "$OUT/shapes/config.yaml" --weights "$OUT/shapes/model_final.pth" '
        f'output_dir="$OUT/shapes_eval_{amp}" test.amp={amp} device=cuda',
        60,
        needs=("environment", "shapes_train"),
        tail_lines=3,
    )
    for amp in ("off", "bf16")
]
STEPS.append(
    Step(
        "batch_invariance",
        "batch-invariant inference: R101-C4, 8 mixed-size COCO-like images, batch 1 vs 8 (fails if detections differ)",
        '$PY -m benchmarks.batch_invariance --device cuda --rounds 10 --json "$OUT/batch_invariance.json"',
        150,
        tail_lines=8,
    )
)


def run_step(step: Step, out: Path, env: dict, results: dict, start: float) -> None:
    """Run `step` (or skip it) and put {"status", ...} into results[step.name]."""
    print(f"[gpu-check {time.monotonic() - start:.0f} s] {step.name}: {step.title}", flush=True)
    not_passed = [n for n in step.needs if results.get(n, {}).get("status") != "passed"]
    if not_passed:
        why = ", ".join(f"{n} {results.get(n, {}).get('status', 'not run')}" for n in not_passed)
        results[step.name] = {"status": "skipped", "reason": f"needs {', '.join(not_passed)} ({why})"}
        print(f"  skipped: {results[step.name]['reason']}", flush=True)
        return
    command = env.get(f"GPU_CHECK_CMD_{step.name.upper()}", step.command)
    log = out / f"{step.name}.log"
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            ["bash", "-c", command],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=step.timeout_s,
        )
        output, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        code = None
    log.write_text(output)
    seconds = round(time.monotonic() - t0, 1)
    tail = output.rstrip().splitlines()[-step.tail_lines :]
    print("\n".join("  " + line for line in tail), flush=True)
    entry = {"status": "passed" if code == 0 else "failed", "seconds": seconds, "log": str(log), "command": command}
    if code is None:
        entry["reason"] = f"timed out after {step.timeout_s} s"
    elif code != 0:
        entry["reason"] = f"exit status {code}" + (f": {tail[-1].strip()}" if tail else "")
    results[step.name] = entry
    print(f"  {entry['status']} in {seconds} s" + (f" ({entry['reason']})" if "reason" in entry else ""), flush=True)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main() -> int:
    out = Path(os.environ.get("OUT", "output/gpu_check"))
    out = out if out.is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OUT": str(out), "PY": os.environ.get("PYTHON", sys.executable)}
    start = time.monotonic()
    results: dict[str, dict] = {}
    for step in STEPS:
        run_step(step, out, env, results, start)

    summary = {
        "ok": all(r["status"] == "passed" for r in results.values()),
        "steps": results,
        "env": read_json(out / "env.json"),
        "bench_infer": read_json(out / "bench_infer.json"),
        "bench_train": read_json(out / "bench_train.json"),
        "shapes_train": read_json(out / "shapes" / "summary.json"),
        **{f"shapes_ap_{amp}": read_json(out / f"shapes_eval_{amp}" / "metrics.json") for amp in ("off", "bf16")},
        "batch_invariance": read_json(out / "batch_invariance.json"),
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    bad = [f"{n} {r['status']}" for n, r in results.items() if r["status"] != "passed"]
    verdict = "all steps passed" if not bad else "FAILED: " + ", ".join(bad)
    print(f"[gpu-check {time.monotonic() - start:.0f} s] {verdict}; wrote {out / 'gpu_check.json'}", flush=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
