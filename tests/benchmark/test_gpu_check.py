"""benchmarks/gpu_check.sh fails when a step fails, and says which, without a GPU.

Each step's command is replaced (GPU_CHECK_CMD_<STEP>) by a shell command that passes or fails, so
the driver, its exit status and its JSON are what is tested, in well under a second per run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = [
    "environment",
    "cuda_tests",
    "bench_infer",
    "bench_train",
    "shapes_train",
    "shapes_eval_off",
    "shapes_eval_bf16",
    "batch_invariance",
]


def run_check(tmp_path: Path, commands: dict[str, str], **extra_env: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_CMD_")}
    env.update({f"GPU_CHECK_CMD_{name.upper()}": cmd for name, cmd in commands.items()})
    env.update(OUT=str(tmp_path / "out"), PYTHON=sys.executable, **extra_env)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    return proc, json.loads((tmp_path / "out" / "gpu_check.json").read_text())


def test_a_failing_step_fails_the_check_and_its_dependents_are_skipped(tmp_path):
    commands = dict.fromkeys(STEPS, "echo fine")
    commands["cuda_tests"] = "echo '3 failed, 40 passed'; exit 3"
    commands["shapes_train"] = "echo 'CUDA error: out of memory'; exit 2"
    proc, summary = run_check(tmp_path, commands)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    steps = summary["steps"]
    assert list(steps) == STEPS and summary["ok"] is False
    assert [steps[n]["status"] for n in STEPS] == [
        "passed",
        "failed",
        "passed",
        "passed",
        "failed",
        "skipped",
        "skipped",
        "passed",
    ]
    assert steps["cuda_tests"]["reason"] == "exit status 3: 3 failed, 40 passed"
    assert steps["shapes_train"]["reason"] == "exit status 2: CUDA error: out of memory"
    assert steps["shapes_eval_off"]["reason"] == "needs shapes_train (shapes_train failed)"
    assert (tmp_path / "out" / "cuda_tests.log").read_text() == "3 failed, 40 passed\n"
    assert (
        "FAILED: cuda_tests failed, shapes_train failed, shapes_eval_off skipped, shapes_eval_bf16 skipped"
        in proc.stdout
    )


def test_no_cuda_device_skips_every_gpu_step(tmp_path):
    # The real environment step, with every GPU hidden: it records the versions and fails.
    commands = {name: "echo fine" for name in STEPS if name != "environment"}
    proc, summary = run_check(tmp_path, commands, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 1
    steps = summary["steps"]
    assert steps["environment"]["status"] == "failed" and "no CUDA device" in steps["environment"]["reason"]
    assert summary["env"]["device"] is None and summary["env"]["torch"]
    assert all(
        steps[n]["status"] == "skipped" and steps[n]["reason"].startswith("needs environment") for n in STEPS[1:]
    )


def test_all_steps_passing_exits_zero(tmp_path):
    proc, summary = run_check(tmp_path, dict.fromkeys(STEPS, "echo fine"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["ok"] is True and all(summary["steps"][n]["status"] == "passed" for n in STEPS)
    assert "all steps passed" in proc.stdout
