"""The `detkit` command (detkit/cli/main.py): version, help, task dispatch, errors, a real run.

Every run here is the real entry point in a fresh process (`python -m detkit ...` from the
repository root, which is what the `detkit` console script calls), as a user would type it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from detkit.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
# Written out, not read from detkit.cli.main.TASKS: dropping a task from the command must fail here.
TASKS = [
    "train",
    "eval",
    "infer",
    "serve",
    "export",
    "check-data",
    "analyze",
    "benchmark",
    "convert-weights",
    "convert-data",
    "plot",
    "demo",
]


def detkit(*args, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "detkit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)


def test_version_is_pyprojects():
    proc = detkit("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"detkit {pyproject_version()}"
    assert detkit("-V").stdout == proc.stdout


def test_console_script_is_the_same_main(capsys):
    # pyproject's `detkit` script names detkit.cli.main:main, the function `python -m detkit` runs.
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^detkit = "detkit\.cli\.main:main"', scripts, re.M)
    for alias in (
        "train",
        "eval",
        "infer",
        "export",
        "analyze",
        "benchmark",
        "convert-weights",
        "convert-data",
        "check-data",
        "serve",
    ):
        assert re.search(rf'^detkit-{alias} = "detkit\.cli\.{alias.replace("-", "_")}:entry_point"', scripts, re.M)
    assert cli_main.main(["--version"]) == 0
    assert capsys.readouterr().out == f"detkit {pyproject_version()}\n"


def test_help_lists_every_task_with_one_line():
    proc = detkit("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    first = lines.index("tasks:") + 1
    block = lines[first : lines.index("", first)]
    assert [line.split()[0] for line in block] == TASKS
    for line in block:
        assert len(line.split(None, 1)[1]) > 20  # a real one-line description
    assert "detkit <task> --help" in proc.stdout and "--version" in proc.stdout
    # No task at all: the same help, on stderr, and a usage error.
    bare = detkit()
    assert bare.returncode == 2 and bare.stdout == "" and "tasks:" in bare.stderr


@pytest.mark.parametrize("task", TASKS)
def test_each_task_help_ends_with_copyable_examples(task):
    proc = detkit(task, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: detkit {task} ")
    text = proc.stdout.rstrip()
    examples = text.rsplit("\nexamples:\n", 1)
    assert len(examples) == 2, f"`detkit {task} --help` has no examples section"
    lines = examples[1].splitlines()
    assert lines[0].startswith(f"  detkit {task} ") and lines[-1].lstrip().startswith(("detkit ", "--"))
    for line in lines:  # each line an example command or the continuation of one
        assert line.startswith((f"  detkit {task}", "      "))
    # `detkit help TASK` shows the same.
    assert detkit("help", task).stdout == proc.stdout


def test_unknown_task_is_one_line_and_exit_2():
    proc = detkit("trian", "configs/shapes_r18.yaml")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: unknown task 'trian': did you mean 'train'?")
    assert all(name in proc.stderr for name in TASKS) and "detkit --help" in proc.stderr


def test_a_task_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    proc = detkit("plot", tmp_path / "no_run")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'no_run'} not found: give a training output dir or its metrics.jsonl"
    ]
    for args in (("plot", tmp_path / "no_run", "--debug"), ("--debug", "plot", tmp_path / "no_run")):
        debug = detkit(*args)
        assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
        assert "detkit.errors.DetkitError" in debug.stderr


def test_tools_launchers_still_run_their_task():
    for tool, usage in (
        ("plot.py", "usage: detkit plot "),
        ("demo.py", "usage: detkit demo "),
        ("check_data.py", "usage: detkit check-data "),
    ):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / tool), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.returncode == 0 and proc.stdout.startswith(usage), proc.stderr


def test_demo_config_is_the_current_directorys_else_the_checkouts(tmp_path, monkeypatch):
    from detkit.cli.demo import AP50_TARGET, DEMO_CONFIG, default_config

    assert AP50_TARGET == 70.0  # the target the docs state for the demo
    monkeypatch.chdir(tmp_path)  # no configs/ here: the checkout's (tools/demo.py passes it; so does the package)
    assert default_config(ROOT) == ROOT / "configs" / "shapes_r18.yaml"
    assert default_config() == ROOT / "configs" / "shapes_r18.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / DEMO_CONFIG).write_text("_base_: base.yaml\n")
    assert default_config(ROOT) == DEMO_CONFIG and DEMO_CONFIG.resolve() == tmp_path / "configs" / "shapes_r18.yaml"


@pytest.mark.slow  # a fresh Python importing torch and running a tiny ResNet-18: ~10 s on 2 busy cores
def test_detkit_infer_end_to_end(tiny_checkpoint, tmp_path):
    from detkit.data import read_image
    from detkit.engine.predictor import Predictor

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):  # smooth random colours, 64 x 96: the tiny model finds dozens of boxes at 0.05
        small = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
        cv2.imwrite(str(photos / f"img{k}.png"), cv2.resize(small, (96, 64), interpolation=cv2.INTER_CUBIC))
    out = tmp_path / "out"
    proc = detkit(
        "infer",
        "--weights",
        tiny_checkpoint,
        "--input",
        photos,
        "--output",
        out,
        "--device",
        "cpu",
        "--score-thresh",
        "0.05",
        "--batch-size",
        "1",
        "--workers",
        "0",
    )
    assert proc.returncode == 0, proc.stderr
    assert "images:     2 processed, 0 skipped" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert summary["images"] == 2 and summary["detections"] == len(predictions) > 0
    for k in range(2):
        drawn = cv2.imread(str(out / f"img{k}.png"))
        assert drawn.shape == (64, 96, 3)
    # The same detections as the Predictor in this process, image by image.
    predictor = Predictor(tiny_checkpoint, device="cpu", score_thresh=0.05, batch_size=1)
    for k in range(2):
        dets = predictor(read_image(photos / f"img{k}.png"))
        mine = [p for p in predictions if p["file_name"] == f"img{k}.png"]
        assert len(mine) == len(dets) > 0
        assert [p["category_name"] for p in mine] == list(dets.class_names)
        np.testing.assert_allclose([p["score"] for p in mine], dets.scores, atol=1e-4)
        assert {p["image_id"] for p in mine} == {k + 1}


def test_tools_holds_the_user_tools_and_benchmarks_is_a_package_not_shipped():
    import importlib

    assert sorted(p.name for p in (ROOT / "tools").iterdir() if p.name != "__pycache__") == [
        "analyze.py",
        "benchmark.py",
        "check_data.py",
        "convert_data.py",
        "convert_weights.py",
        "demo.py",
        "eval.py",
        "export.py",
        "infer.py",
        "plot.py",
        "serve.py",
        "train.py",
    ]
    for name in ("frozen_bn", "gemm_conv", "int8", "loader", "matching", "video", "trace_export_parity", "load_test"):
        module = importlib.import_module(f"benchmarks.{name}")
        assert callable(module.main), name
        assert f"`python -m benchmarks.{name} " in (ROOT / "benchmarks" / "README.md").read_text(), name
    find = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.packages.find]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^include = \["detkit\*"\]$', find, re.M)  # the wheel holds detkit/ only
