"""tools/train.py end to end on the real detector (ResNet-18 C4) and real shapes data, on CPU.

The module runs three trainings once (a fixture) and the tests read their outputs:
  A: 20 iterations uninterrupted;
  B: the same command, SIGKILLed right after its checkpoint at iteration 10 is on disk;
  C: B's output dir continued with --resume;
  D: the same command sent SIGTERM mid-run (between checkpoints), then continued with --resume.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detkit.cli.train import main as train_main
from detkit.engine.checkpoint import checkpoint_name, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "tools" / "train.py")]

# Small enough for 2 shared cores: 64 px images, the trunk frozen (res5, RPN and box head train),
# few anchors and RoIs, a 4x4 RoIAlign.
TINY_CONFIG = """\
_base_: {base}
device: cpu
seed: 3
model:
  depth: 18
  num_classes: 3
  backbone: {{freeze_at: 4, weights: {weights}}}
  rpn: {{pre_nms_topk_train: 200, post_nms_topk_train: 32, pre_nms_topk_test: 100, post_nms_topk_test: 16,
        batch_size_per_image: 32}}
  roi_heads: {{batch_size_per_image: 8, pooler_resolution: 4}}
data:
  train: [{{type: shapes, root: {data}, split: train, num_images: 16, image_size: [64, 64], num_classes: 3, max_objects: 3}}]
  test: [{{type: shapes, root: {data}, split: val, num_images: 4, image_size: [64, 64], num_classes: 3, max_objects: 3}}]
  min_size_train: [56, 64]
  max_size_train: 64
  min_size_test: 64
  max_size_test: 64
  num_workers: 0
solver: {{ims_per_batch: 2, base_lr: 0.02, max_iter: 20, steps: [15], warmup_iters: 4, checkpoint_period: 10,
         log_period: 1}}
test: {{ims_per_batch: 4}}
"""

LOSS_KEYS = ("total_loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "lr")


def write_tiny_config(folder: Path, weights: Path) -> Path:
    """The tiny config in `folder`; `weights`: the backbone file (the standin_imagenet_r18 fixture)."""
    path = folder / "tiny.yaml"
    path.write_text(TINY_CONFIG.format(base=ROOT / "configs" / "base.yaml", data=folder / "shapes", weights=weights))
    return path


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def training_rows(run: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in rows(run) if "total_loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, standin_imagenet_r18):
    tmp = tmp_path_factory.mktemp("train")
    cfg = write_tiny_config(tmp, standin_imagenet_r18)
    # One intra-op thread: on 2 cores shared with other processes, torch's two spinning OpenMP
    # threads make a step ~10x slower than one thread does.
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    a, bc = tmp / "A", tmp / "BC"

    subprocess.run(TRAIN + [str(cfg), f"output_dir={a}"], check=True, env=env, capture_output=True, timeout=600)

    b = subprocess.Popen(
        TRAIN + [str(cfg), f"output_dir={bc}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    pointer = bc / "last_checkpoint"
    deadline = time.monotonic() + 600
    while not (pointer.is_file() and pointer.read_text().strip() == "model_0000010.pth"):
        assert b.poll() is None, b.stderr.read().decode()
        assert time.monotonic() < deadline, "run B never wrote its iteration-10 checkpoint"
        time.sleep(0.01)
    b.send_signal(signal.SIGKILL)
    assert b.wait(timeout=60) == -signal.SIGKILL
    killed_at = max(training_rows(bc))  # the last iteration B logged before it died
    assert not (bc / "model_final.pth").exists()

    c = subprocess.run(
        TRAIN + [str(cfg), f"output_dir={bc}", "--resume"], env=env, capture_output=True, text=True, timeout=600
    )
    assert c.returncode == 0, c.stderr
    return {"cfg": cfg, "A": a, "BC": bc, "killed_at": killed_at, "resume_stdout": c.stdout}


@pytest.mark.slow
def test_resumed_run_repeats_the_uninterrupted_losses_exactly(runs):
    a, bc = training_rows(runs["A"]), training_rows(runs["BC"])
    assert sorted(a) == sorted(bc) == list(range(1, 21))  # B's rows after 10 were dropped and redone
    assert 10 <= runs["killed_at"] < 20
    for it in range(11, 21):
        assert {k: bc[it][k] for k in LOSS_KEYS} == {k: a[it][k] for k in LOSS_KEYS}, f"iteration {it}"
    # The losses moved (the comparison is not between constants) and the final weights are equal.
    assert len({a[it]["total_loss"] for it in a}) > 10
    wa = load_checkpoint(runs["A"] / "model_final.pth")["model"]
    wc = load_checkpoint(runs["BC"] / "model_final.pth")["model"]
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    assert "resumed from" in (runs["BC"] / "log.txt").read_text()


@pytest.fixture(scope="module")
def preempted(runs):
    """D: run A's command sent SIGTERM after its iteration-5 row (between checkpoints), then --resume."""
    cfg, d = runs["cfg"], runs["A"].parent / "D"
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    b = subprocess.Popen(
        TRAIN + [str(cfg), f"output_dir={d}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    while not ((d / "metrics.jsonl").is_file() and 5 in training_rows_so_far(d)):
        assert b.poll() is None, b.stderr.read()
        assert time.monotonic() < deadline, "run D never logged iteration 5"
        time.sleep(0.01)
    sent = time.monotonic()
    b.send_signal(signal.SIGTERM)
    status, stderr = b.wait(timeout=120), b.stderr.read()
    stopped_s = time.monotonic() - sent
    c = subprocess.run(
        TRAIN + [str(cfg), f"output_dir={d}", "--resume"], env=env, capture_output=True, text=True, timeout=600
    )
    assert c.returncode == 0, c.stderr
    return {"D": d, "status": status, "stderr": stderr, "stopped_s": stopped_s}


def training_rows_so_far(run: Path) -> set[int]:
    """Iterations logged so far; a row being appended right now is not counted."""
    done = set()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            done.add(json.loads(line)["iteration"])
        except ValueError:
            pass
    return done


@pytest.mark.slow
def test_sigterm_saves_the_iteration_exits_75_and_resume_repeats_the_uninterrupted_run(runs, preempted):
    d = preempted["D"]
    assert preempted["status"] == 75, preempted["stderr"]
    line = [text for text in (d / "log.txt").read_text().splitlines() if "preempted at iteration" in text]
    assert len(line) == 1
    stopped_at = int(line[0].split("preempted at iteration ")[1].split(",")[0])
    assert 5 < stopped_at < 10 and f"checkpoint {d / checkpoint_name(stopped_at)} (SIGTERM)" in line[0]
    assert preempted["stopped_s"] < 30  # one step and one save, not the rest of the run
    assert load_checkpoint(d / checkpoint_name(stopped_at))["iteration"] == stopped_at
    assert f"resumed from {d / checkpoint_name(stopped_at)} at iteration {stopped_at}" in (d / "log.txt").read_text()
    a, dd = training_rows(runs["A"]), training_rows(d)
    assert sorted(dd) == list(range(1, 21))
    for it in range(1, 21):
        assert {k: dd[it][k] for k in LOSS_KEYS} == {k: a[it][k] for k in LOSS_KEYS}, f"iteration {it}"
    wa = load_checkpoint(runs["A"] / "model_final.pth")["model"]
    wd = load_checkpoint(d / "model_final.pth")["model"]
    assert all(torch.equal(wa[k], wd[k]) for k in wa)


@pytest.mark.slow
def test_output_dir_has_config_logs_metrics_checkpoints_and_summary(runs):
    a = runs["A"]
    names = {p.name for p in a.iterdir()}
    assert {
        "config.yaml",
        "log.txt",
        "metrics.jsonl",
        "model_0000010.pth",
        "model_final.pth",
        "last_checkpoint",
        "summary.json",
    } <= names
    ckpt = load_checkpoint(a / "model_final.pth")
    assert ckpt["iteration"] == 20
    assert ckpt["class_names"] == ["circle", "square", "triangle"] and ckpt["category_ids"] == [1, 2, 3]
    assert ckpt["data"]["start_iter"] == 20 and ckpt["config"]["model"]["depth"] == 18
    summary = json.loads((a / "summary.json").read_text())
    assert summary["iterations"] == 20 and 0.0 <= summary["eval"]["bbox/AP50"] <= 100.0
    eval_rows = [r for r in rows(a) if "bbox/AP" in r]
    assert len(eval_rows) == 1 and eval_rows[0]["iteration"] == 20  # the final evaluation
    log = (a / "log.txt").read_text()
    assert "iter 20/20" in log and "s/it" in log and "eta" in log and "max_mem" in log


@pytest.mark.slow
def test_eval_only_evaluates_the_given_weights(runs, tmp_path, capsys):
    out = tmp_path / "eval"
    code = train_main(
        [str(runs["cfg"]), f"output_dir={out}", "--eval-only", "--weights", str(runs["A"] / "model_final.pth")]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # Same weights, same test set as the final evaluation of run A.
    assert metrics["AP50"] == pytest.approx(json.loads((runs["A"] / "summary.json").read_text())["eval"]["bbox/AP50"])


@pytest.mark.slow
def test_plot_writes_png_curves(runs, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot.py"), str(runs["A"]), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in ("losses.png", "lr.png", "eval.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--resume",
        "--eval-only",
        "--weights",
        "torchrun",
        "key=value",
        "ims_per_batch",
        "base_lr",
        "--overwrite",
        "--accept-config-changes",
    ):
        assert flag in text


def test_errors_are_one_line_with_exit_code_2(tmp_path, standin_imagenet_r18):
    cfg = write_tiny_config(tmp_path, standin_imagenet_r18)
    result = subprocess.run(TRAIN + [str(cfg), "solver.max_itr=5"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "solver.max_iter" in result.stderr
    result = subprocess.run(TRAIN + [str(cfg), "--eval-only"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--weights" in result.stderr


def test_a_bad_test_annotation_file_stops_the_run_before_its_first_iteration(tmp_path, capsys, standin_imagenet_r18):
    train_json = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in (1, 2)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 30, 30], "area": 900, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "box"}],
    }
    import cv2
    import numpy as np

    for i in (1, 2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((64, 64, 3), 100, np.uint8))
    (tmp_path / "train.json").write_text(json.dumps(train_json))
    bad = dict(train_json, annotations=[{**train_json["annotations"][0], "category_id": 7}])
    (tmp_path / "test.json").write_text(json.dumps(bad))
    cfg = tmp_path / "coco.yaml"
    cfg.write_text(
        f"_base_: {ROOT / 'configs' / 'base.yaml'}\ndevice: cpu\nmodel: {{depth: 18, num_classes: 1, backbone: {{weights: {standin_imagenet_r18}}}}}\n"
        f"data:\n  train: [{{type: coco, ann_file: {tmp_path / 'train.json'}, image_root: {tmp_path}}}]\n"
        f"  test: [{{type: coco, ann_file: {tmp_path / 'test.json'}, image_root: {tmp_path}}}]\n"
        "  num_workers: 0\nsolver: {ims_per_batch: 2, max_iter: 5}\n"
    )
    out = tmp_path / "out"
    from detkit.cli.common import run_cli

    assert run_cli(train_main, [str(cfg), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "test.json" in err and "annotation 1 -> category_id 7" in err
    assert not (out / "metrics.jsonl").exists()  # stopped before the first iteration


@pytest.mark.slow
def test_bf16_training_and_evaluation_run_end_to_end_on_cpu_autocast(tmp_path, standin_imagenet_r18):
    """solver.amp=bf16 / test.amp=bf16 through the trainer and the evaluator (the GPU's default
    training path, with CPU autocast): finite losses and gradient norms, and a COCO evaluation."""
    cfg = write_tiny_config(tmp_path, standin_imagenet_r18)
    out = tmp_path / "bf16"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        TRAIN
        + [
            str(cfg),
            f"output_dir={out}",
            "solver.amp=bf16",
            "test.amp=bf16",
            "solver.max_iter=4",
            "solver.checkpoint_period=0",
            "model.roi_heads.smooth_l1_beta=0.1",
            "model.rpn.smooth_l1_beta=0.1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["amp"] == "bf16" and summary["iterations"] == 4
    logged = training_rows(out)
    assert sorted(logged) == [1, 2, 3, 4]
    assert all(math.isfinite(r[k]) for r in logged.values() for k in LOSS_KEYS)
    assert "bbox/AP" in summary["eval"] and math.isfinite(summary["eval"]["bbox/AP"])


# ---------------------------------------------------------------------------------------------
# The main command's initial weights (configs/frcnn_r101.yaml: model.backbone.weights=imagenet)
# ---------------------------------------------------------------------------------------------

MAIN_CONFIG = ROOT / "configs" / "frcnn_r101.yaml"


def tiny_data_overrides(tmp: Path) -> list[str]:
    """The main config's COCO paths replaced by 4 generated 32 px shapes images, no test set."""
    return [
        "device=cpu",
        f"output_dir={tmp / 'out'}",
        "solver.ims_per_batch=2",
        "solver.max_iter=3",
        "data.num_workers=0",
        f"data.train=[{{type: shapes, root: {tmp / 'shapes'}, num_images: 4, image_size: [32, 32], num_classes: 3}}]",
        "data.test=[]",
        "model.num_classes=3",
    ]


def offline_env(monkeypatch, torch_home: Path) -> dict:
    """No network for downloads (every https request goes to a closed local port) and an empty
    torchvision cache at torch_home; returns the environment for a subprocess."""
    for key in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(key, "http://127.0.0.1:9")
    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_main_config_offline_without_weights_stops_before_iteration_1_naming_the_file(tmp_path, monkeypatch):
    env = offline_env(monkeypatch, tmp_path / "torch")
    result = subprocess.run(
        TRAIN + [str(MAIN_CONFIG), *tiny_data_overrides(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    assert "ResNet101_Weights.IMAGENET1K_V1" in lines[0]
    assert f"download https://download.pytorch.org/models/resnet101-63fe2227.pth to {cached}" in lines[0]
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and "iter 1/" not in result.stdout


def test_main_config_reads_the_imagenet_weights_of_its_depth_from_the_cache_offline(
    tmp_path, monkeypatch, standin_imagenet_r18
):
    import shutil

    from detkit.config import load_config
    from detkit.engine.trainer import Trainer, unwrap

    offline_env(monkeypatch, tmp_path / "torch")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # torchvision's file name
    cached.parent.mkdir(parents=True)
    shutil.copy(standin_imagenet_r18, cached)
    cfg = load_config(MAIN_CONFIG, tiny_data_overrides(tmp_path) + ["model.depth=18"])
    assert cfg.model.backbone.weights == "imagenet" and cfg.model.backbone.norm == "FrozenBN"
    model = unwrap(Trainer(cfg).model)
    imagenet = torch.load(cached, weights_only=True)
    # Stem, res2..res4 in the trunk and res5 in the RoI head all come from the file.
    assert torch.equal(model.backbone.conv1.weight, imagenet["conv1.weight"])
    assert torch.equal(model.backbone.layer3[1].conv2.weight, imagenet["layer3.1.conv2.weight"])
    assert torch.equal(model.roi_heads.res5[0].downsample[0].weight, imagenet["layer4.0.downsample.0.weight"])


def test_frozen_bn_without_pretrained_backbone_is_refused_but_bn_from_scratch_trains(tmp_path):
    from detkit.config import load_config
    from detkit.engine.trainer import Trainer

    args = [str(MAIN_CONFIG), *tiny_data_overrides(tmp_path), "model.depth=18", "model.backbone.weights="]
    result = subprocess.run(TRAIN + args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "model.backbone.norm=FrozenBN with no pretrained weights" in err
    assert "model.backbone.weights=imagenet" in err and "model.backbone.norm=BN" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    # From scratch on purpose (BatchNorm that learns, as configs/shapes_r18.yaml): accepted.
    cfg = load_config(
        MAIN_CONFIG,
        args[1:]
        + [
            "model.backbone.norm=BN",
            "model.backbone.freeze_at=0",
            "solver.max_iter=1",
            "data.min_size_train=[32]",
            "data.max_size_train=32",
        ],
    )
    summary = Trainer(cfg).train()
    assert summary["iterations"] == 1 and math.isfinite(summary["final_losses"]["total_loss"])


# ---------------------------------------------------------------------------------------------
# An output_dir that holds a run: --resume or --overwrite
# ---------------------------------------------------------------------------------------------


def _earlier_run(folder: Path) -> dict[str, bytes]:
    """The files an earlier run left in `folder` (stand-ins: only their names and bytes matter here)."""
    folder.mkdir(parents=True)
    files = {
        "metrics.jsonl": b'{"iteration": 50, "total_loss": 0.5}\n',
        "model_0000050.pth": b"an earlier checkpoint",
        "last_checkpoint": b"model_0000050.pth\n",
        "log.txt": b"the earlier log\n",
        "notes.md": b"the user's own file",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_a_fresh_run_into_an_output_dir_holding_a_run_stops_and_changes_nothing(tmp_path, standin_imagenet_r18):
    cfg = write_tiny_config(tmp_path, standin_imagenet_r18)
    out = tmp_path / "out"
    files = _earlier_run(out)
    result = subprocess.run(TRAIN + [str(cfg), f"output_dir={out}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: output_dir {out} already holds a run (last_checkpoint, metrics.jsonl, model_0000050.pth): add --resume "
        "to continue it, --overwrite to delete it and start over, or set output_dir=... to another folder"
    ]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    both = subprocess.run(
        TRAIN + [str(cfg), f"output_dir={out}", "--resume", "--overwrite"], capture_output=True, text=True, timeout=300
    )
    assert both.returncode == 2 and "give one of them" in both.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


@pytest.mark.slow
def test_overwrite_removes_the_earlier_run_first(tmp_path, standin_imagenet_r18):
    cfg = write_tiny_config(tmp_path, standin_imagenet_r18)
    out = tmp_path / "out"
    _earlier_run(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        TRAIN + [str(cfg), f"output_dir={out}", "solver.max_iter=2", "--overwrite"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert not (out / "model_0000050.pth").exists() and (out / "notes.md").read_bytes() == b"the user's own file"
    assert (out / "last_checkpoint").read_text() == "model_final.pth\n"
    assert [r["iteration"] for r in rows(out) if "total_loss" in r] == [1, 2]  # no row of the earlier run
    log = (out / "log.txt").read_text()
    assert "the earlier log" not in log and "--overwrite: removed 4 files of the earlier run" in log
