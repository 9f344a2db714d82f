"""tools/eval.py (model and file mode) and tools/infer.py end to end, on a tiny model trained here.

A module fixture trains ResNet-18 C4 for a few iterations on 64 px shapes with tools/train.py; the
tests run the tools as a user would (subprocesses, exit codes, stdout) and check their outputs
against pycocotools and against each other.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from detkit.cli.eval import load_eval_config
from detkit.cli.infer import collect_inputs, prepare_output_dir
from detkit.errors import ConfigError, DataError

pytestmark = pytest.mark.slow  # ~1 min on 2 shared cores: one training, five tool runs

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
METRIC_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "per_class"]

# Small enough for 2 shared cores: 64 px images, stem..res3 frozen, few anchors and RoIs.
TINY_CONFIG = """\
_base_: {base}
device: cpu
seed: 0
model:
  depth: 18
  num_classes: 3
  backbone: {{freeze_at: 3, weights: {weights}}}
  rpn: {{anchor_sizes: [16, 32, 64], pre_nms_topk_train: 200, post_nms_topk_train: 32, pre_nms_topk_test: 100,
        post_nms_topk_test: 16, batch_size_per_image: 32}}
  roi_heads: {{batch_size_per_image: 16, pooler_resolution: 4}}
data:
  train: [{{type: shapes, root: {data}, split: train, num_images: 16, image_size: [64, 64], num_classes: 3, max_objects: 3}}]
  test: [{{type: shapes, root: {data}, split: val, num_images: 6, image_size: [64, 64], num_classes: 3, max_objects: 3}}]
  min_size_train: [64]
  max_size_train: 64
  min_size_test: 64
  max_size_test: 64
  num_workers: 0
solver: {{ims_per_batch: 2, base_lr: 0.02, max_iter: 8, steps: [6], warmup_iters: 2, checkpoint_period: 8, log_period: 4}}
test: {{ims_per_batch: 4}}
"""


def run_tool(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([PY, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, standin_imagenet_r18):
    """(tmp dir, config path, checkpoint path) of a tiny model trained with tools/train.py."""
    tmp = tmp_path_factory.mktemp("eval_infer")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(
        TINY_CONFIG.format(base=ROOT / "configs" / "base.yaml", data=tmp / "shapes", weights=standin_imagenet_r18)
    )
    run_tool(ROOT / "tools" / "train.py", cfg, f"output_dir={tmp / 'train'}")
    weights = tmp / "train" / "model_final.pth"
    assert weights.is_file()
    return tmp, cfg, weights


@pytest.fixture(scope="module")
def model_eval(trained):
    """tools/eval.py in model mode: (output dir, stdout)."""
    tmp, cfg, weights = trained
    out = tmp / "eval"
    proc = run_tool(ROOT / "tools" / "eval.py", cfg, "--weights", weights, f"output_dir={out}")
    return out, proc.stdout


def val_ann_file(tmp: Path) -> Path:
    (ann,) = (tmp / "shapes").glob("val_*/annotations.json")
    return ann


def pycocotools_stats(gt_file: Path, predictions: list) -> np.ndarray:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        coco_eval = COCOeval(gt, gt.loadRes(predictions), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def test_eval_model_mode_writes_predictions_and_metrics_equal_to_pycocotools(trained, model_eval):
    tmp, _, _ = trained
    out, stdout = model_eval
    predictions = json.loads((out / "predictions.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    gt = json.loads(val_ann_file(tmp).read_text())

    assert list(metrics) == METRIC_KEYS
    assert set(metrics["per_class"]) == {c["name"] for c in gt["categories"]}
    assert len(predictions) > 0
    assert {p["image_id"] for p in predictions} <= {img["id"] for img in gt["images"]}
    assert {p["category_id"] for p in predictions} <= {c["id"] for c in gt["categories"]}
    assert all(len(p["bbox"]) == 4 and p["bbox"][2] >= 0 and 0 <= p["score"] <= 1 for p in predictions)

    stats = pycocotools_stats(val_ann_file(tmp), predictions)
    for i, key in enumerate(METRIC_KEYS[:9]):
        expected = stats[i] * 100 if stats[i] > -1 else None
        assert metrics[key] == (pytest.approx(expected, abs=1e-6) if expected is not None else None), key
    assert f"{metrics['AP']:.3f}" in stdout and f"{metrics['AR100']:.3f}" in stdout  # the printed tables
    assert "Per-class AP:" in stdout and "circle" in stdout


def test_eval_file_mode_reproduces_model_mode_with_both_backends(trained, model_eval):
    tmp, _, _ = trained
    out, _ = model_eval
    metrics_file = tmp / "file_mode" / "metrics.json"
    proc = run_tool(
        ROOT / "tools" / "eval.py",
        "--gt",
        val_ann_file(tmp),
        "--predictions",
        out / "predictions.json",
        "--out",
        metrics_file,
        "--backend",
        "pycocotools",
    )
    assert "metrics written to" in proc.stdout and "Per-class AP:" in proc.stdout
    file_metrics = json.loads(metrics_file.read_text())
    model_metrics = json.loads((out / "metrics.json").read_text())
    assert list(file_metrics) == METRIC_KEYS
    for key in METRIC_KEYS[:9]:
        assert file_metrics[key] == pytest.approx(model_metrics[key], abs=1e-9, nan_ok=True), key


def test_eval_file_mode_gives_100_for_the_ground_truth_itself(trained, tmp_path):
    tmp, _, _ = trained
    gt = json.loads(val_ann_file(tmp).read_text())
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
    ]
    (tmp_path / "perfect.json").write_text(json.dumps(perfect))
    run_tool(
        ROOT / "tools" / "eval.py",
        "--gt",
        val_ann_file(tmp),
        "--predictions",
        tmp_path / "perfect.json",
        "--out",
        tmp_path / "metrics.json",
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AR100"] == pytest.approx(100.0)
    assert metrics["per_class"] == {
        "circle": pytest.approx(100.0),
        "square": pytest.approx(100.0),
        "triangle": pytest.approx(100.0),
    }


def test_eval_file_mode_reports_bad_predictions_in_one_line(trained, tmp_path):
    tmp, _, _ = trained
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 123456, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    proc = run_tool(ROOT / "tools" / "eval.py", "--gt", val_ann_file(tmp), "--predictions", bad, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "123456" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_eval_config_defaults_to_the_checkpoints(trained):
    from detkit.engine.checkpoint import load_checkpoint

    _, cfg_path, weights = trained
    state = load_checkpoint(weights)
    cfg = load_eval_config(state["config"], None, ["test.ims_per_batch=2"])
    assert cfg.model.depth == 18 and cfg.test.ims_per_batch == 2 and len(cfg.data.test) == 1
    assert load_eval_config(state["config"], str(cfg_path), []).model.num_classes == 3


def make_input_folder(tmp: Path, folder: Path) -> dict[str, str]:
    """Two val images (one in a sub-folder), a grayscale png, a corrupt jpg and a text file.

    Returns {input relative path: val file name} of the copied val images.
    """
    ann = val_ann_file(tmp)
    gt = json.loads(ann.read_text())
    image_dir = ann.parent / "images"
    names = [img["file_name"] for img in gt["images"][:3]]
    (folder / "sub").mkdir(parents=True)
    shutil.copy(image_dir / names[0], folder / "a.jpg")
    shutil.copy(image_dir / names[1], folder / "sub" / "b.jpg")
    gray = cv2.cvtColor(cv2.imread(str(image_dir / names[2])), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(folder / "gray.png"), gray)
    data = (image_dir / names[0]).read_bytes()
    (folder / "corrupt.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("not an image\n")
    return {"a.jpg": names[0], "sub/b.jpg": names[1]}


def test_infer_on_a_folder_draws_images_and_matches_eval(trained, model_eval):
    tmp, _, weights = trained
    eval_out, _ = model_eval
    inputs = tmp / "photos"
    copies = make_input_folder(tmp, inputs)
    out = tmp / "infer"
    proc = run_tool(
        ROOT / "tools" / "infer.py",
        "--weights",
        weights,
        "--input",
        inputs,
        "--output",
        out,
        "--recursive",
        "--score-thresh",
        "0.05",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--workers",
        "0",
    )

    assert "3 processed, 1 skipped, 1 non-image files ignored" in proc.stdout
    assert "images/s" in proc.stdout and "skipped:    corrupt.jpg: the JPEG is truncated" in proc.stdout
    for rel in ("a.jpg", "sub/b.jpg", "gray.png"):
        drawn = cv2.imread(str(out / rel))
        assert drawn is not None and drawn.shape == (64, 64, 3), rel
    assert not (out / "corrupt.jpg").exists() and not (out / "notes.txt").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == ["a.jpg", "gray.png", "sub/b.jpg"]
    assert summary["ignored"] == ["notes.txt"] and summary["skipped"][0]["file_name"] == "corrupt.jpg"

    predictions = json.loads((out / "predictions.json").read_text())
    assert {p["file_name"] for p in predictions} <= {"a.jpg", "gray.png", "sub/b.jpg"}
    assert all(p["score"] >= 0.05 and p["category_name"] in ("circle", "square", "triangle") for p in predictions)

    # The same images through tools/eval.py's test loader give the same detections.
    gt = json.loads(val_ann_file(tmp).read_text())
    id_of = {Path(img["file_name"]).name: img["id"] for img in gt["images"]}
    eval_predictions = json.loads((eval_out / "predictions.json").read_text())
    for rel, val_name in copies.items():
        ours = sorted((p for p in predictions if p["file_name"] == rel), key=lambda p: -p["score"])
        theirs = sorted(
            (p for p in eval_predictions if p["image_id"] == id_of[Path(val_name).name]), key=lambda p: -p["score"]
        )
        assert len(ours) == len(theirs), rel
        np.testing.assert_allclose([p["bbox"] for p in ours], [p["bbox"] for p in theirs], atol=1e-3)
        np.testing.assert_allclose([p["score"] for p in ours], [p["score"] for p in theirs], atol=1e-5)
        assert [p["category_id"] for p in ours] == [p["category_id"] for p in theirs]

    # A second run into the same folder: refused, then --overwrite replaces the first run's files.
    again = [
        ROOT / "tools" / "infer.py",
        "--weights",
        weights,
        "--input",
        inputs,
        "--output",
        out,
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    refused = run_tool(*again, check=False)
    assert refused.returncode == 2 and "is not empty" in refused.stderr and "--overwrite" in refused.stderr
    run_tool(*again, "--overwrite")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == ["a.jpg", "gray.png"]  # not recursive this time
    assert not (out / "sub").exists()  # the first run's sub/b.jpg is gone, not mixed in


def test_output_folder_rules(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for rel in ("x.jpg", "sub/y.PNG", "readme.md"):
        (photos / rel).write_bytes(b"")
    flat = collect_inputs(str(photos))
    assert [p.name for p in flat.images] == ["x.jpg"] and [p.name for p in flat.ignored] == ["readme.md"]
    deep = collect_inputs(str(photos), recursive=True)
    assert [deep.relative(p).as_posix() for p in deep.images] == ["sub/y.PNG", "x.jpg"]
    globbed = collect_inputs(str(photos / "*.jpg"))
    assert globbed.root == photos and [p.name for p in globbed.images] == ["x.jpg"]
    with pytest.raises(DataError, match=r"no image files .* add --recursive"):
        collect_inputs(str(tmp_path))  # only a sub-folder there
    with pytest.raises(DataError, match="no such file or folder"):
        collect_inputs(str(tmp_path / "nope"))

    with pytest.raises(ConfigError, match="is the input folder"):
        prepare_output_dir(photos, flat, recursive=False, overwrite=True)
    with pytest.raises(ConfigError, match=r"inside the input folder .* --recursive"):
        prepare_output_dir(photos / "out", deep, recursive=True, overwrite=False)
    prepare_output_dir(photos / "out", flat, recursive=False, overwrite=False)  # fine without --recursive

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match="not empty \\(1 entries\\)"):
        prepare_output_dir(out, flat, recursive=False, overwrite=False)
    with pytest.raises(ConfigError, match=r"holds 1 files that detkit-infer did not write \(mine\.txt\)"):
        prepare_output_dir(out, flat, recursive=False, overwrite=True)
    assert (out / "mine.txt").exists()  # --overwrite never deletes what detkit did not write
