"""The shapes dataset: deterministic from a seed, cached by its parameters, sound annotations."""

import filecmp
import json
import logging
import os
import re
import runpy
from pathlib import Path

import numpy as np
import pytest

from detkit.config import DatasetConfig, load_config, replace
from detkit.data.coco import load_coco_json
from detkit.data.datasets import get_dataset_info
from detkit.data.image_io import read_image
from detkit.data.synthetic import SHAPE_NAMES, ShapesParams, ensure_shapes_dataset, generate_shapes, shapes_dir
from detkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SMALL = ShapesParams(
    split="train",
    num_images=6,
    image_size=(96, 128),
    num_classes=6,
    max_objects=5,
    min_object_size=12,
    max_object_size=48,
    seed=0,
)


def same_files(a: Path, b: Path) -> bool:
    names = sorted(os.listdir(a / "images"))
    if names != sorted(os.listdir(b / "images")):
        return False
    _match, mismatch, errors = filecmp.cmpfiles(a / "images", b / "images", names, shallow=False)
    return (
        not mismatch and not errors and (a / "annotations.json").read_bytes() == (b / "annotations.json").read_bytes()
    )


def test_generation_is_deterministic_from_the_seed(tmp_path):
    generate_shapes(SMALL, tmp_path / "a")
    generate_shapes(SMALL, tmp_path / "b")
    generate_shapes(replace(SMALL, seed=1), tmp_path / "c")
    generate_shapes(replace(SMALL, split="val"), tmp_path / "d")
    assert same_files(tmp_path / "a", tmp_path / "b")
    assert not same_files(tmp_path / "a", tmp_path / "c")
    assert not same_files(tmp_path / "a", tmp_path / "d")  # the split is part of the seed


@pytest.mark.slow
def test_parallel_generation_writes_the_same_files(tmp_path):
    params = replace(SMALL, num_images=130)  # three chunks of 64
    generate_shapes(params, tmp_path / "serial", workers=1)
    generate_shapes(params, tmp_path / "parallel", workers=2)
    assert same_files(tmp_path / "serial", tmp_path / "parallel")


def test_annotations_are_valid_coco_with_tight_boxes_of_the_requested_sizes(tmp_path):
    params = replace(SMALL, num_images=20, num_classes=8, max_objects=6)
    ann_file = generate_shapes(params, tmp_path)
    coco = json.loads(ann_file.read_text())
    assert [c["name"] for c in coco["categories"]] == list(SHAPE_NAMES)
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=21)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 6
    boxes = np.array([a["bbox"] for a in coco["annotations"]])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 128 + 0.01).all() and (boxes[:, 1] + boxes[:, 3] <= 96 + 0.01).all()
    longer = boxes[:, 2:].max(axis=1)
    assert longer.min() >= 12 - 0.02 and longer.max() <= 48 + 0.02
    assert len({a["category_id"] for a in coco["annotations"]}) >= 6
    # the files load through the normal validation without any warning-worthy box
    ds = load_coco_json(ann_file, tmp_path / "images")
    assert ds.report.num_boxes == len(coco["annotations"]) and ds.report.num_clipped == 0
    image = read_image(ds.records[0].file_name)
    assert image.shape == (96, 128, 3)


def test_shapes_are_drawn_inside_their_boxes(tmp_path):
    """An object's pixels differ from the background inside its box, and the box is tight."""
    params = replace(SMALL, num_images=4, max_objects=1, min_object_size=30, max_object_size=40)
    ann_file = generate_shapes(params, tmp_path)
    coco = json.loads(ann_file.read_text())
    for ann in coco["annotations"]:
        image = read_image(tmp_path / "images" / f"{ann['image_id']:06d}.jpg").astype(np.float32)
        x, y, w, h = ann["bbox"]
        inner = image[int(y + h * 0.4) : int(y + h * 0.6), int(x + w * 0.4) : int(x + w * 0.6)].reshape(-1, 3)
        if SHAPE_NAMES[ann["category_id"] - 1] == "ring":
            continue  # hollow centre
        centre_colour = np.median(inner, axis=0)
        # the object's colour reaches (nearly) each of the four box edges
        for edge in (
            image[int(y) : int(y + h), int(x) + 1],
            image[int(y) : int(y + h), int(x + w) - 2],
            image[int(y) + 1, int(x) : int(x + w)],
            image[int(y + h) - 2, int(x) : int(x + w)],
        ):
            assert np.abs(edge - centre_colour).sum(axis=1).min() < 60


def test_ensure_generates_once_then_reuses_the_cache(tmp_path):
    ann_file, image_root = ensure_shapes_dataset(SMALL, tmp_path)
    assert Path(ann_file).parent == shapes_dir(SMALL, tmp_path)
    mtime = os.stat(ann_file).st_mtime_ns
    assert ensure_shapes_dataset(SMALL, tmp_path) == (ann_file, image_root)
    assert os.stat(ann_file).st_mtime_ns == mtime  # not regenerated
    other, _ = ensure_shapes_dataset(replace(SMALL, num_images=7), tmp_path)
    assert Path(other).parent != Path(ann_file).parent  # another parameter set, another folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [Path(ann_file).parent.name, Path(other).parent.name]
    )  # no temp folders left


def test_invalid_parameters_are_config_errors():
    with pytest.raises(ConfigError, match=re.escape("num_classes=9 must be 1..8")):
        replace(SMALL, num_classes=9).validated()
    with pytest.raises(ConfigError, match="min_object_size"):
        replace(SMALL, min_object_size=60).validated()


def test_shapes_entry_in_a_config_gives_dataset_info(tmp_path):
    shapes = DatasetConfig(
        type="shapes", root=str(tmp_path), split="val", num_images=3, image_size=(64, 64), num_classes=4
    )
    cfg = replace(load_config(None), **{"model.num_classes": 4, "data.test": (shapes,)})
    info = get_dataset_info(cfg, "test")
    assert info.class_names == ["circle", "square", "triangle", "star"] and info.category_ids == [1, 2, 3, 4]
    assert Path(info.ann_file).is_file() and str(tmp_path) in info.ann_file


def test_shapes_configs_agree_with_their_model(tmp_path):
    for name in ("shapes_r18", "shapes_r101"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        for ds in cfg.data.train + cfg.data.test:
            assert ds.type == "shapes" and ds.num_classes == cfg.model.num_classes
    assert load_config(REPO / "configs" / "shapes_r18.yaml").model.depth == 18


@pytest.fixture
def restore_logging():
    """The scripts call setup_logging(), which stops 'detkit' records reaching the root logger
    (and pytest's caplog); put the logger back as it was for the tests that follow."""
    logger = logging.getLogger("detkit")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


def test_prepare_shapes_script_writes_a_standalone_set(tmp_path, capsys, restore_logging):
    script = runpy.run_path(str(REPO / "datasets" / "prepare_shapes.py"))
    out = tmp_path / "standalone"
    assert script["main"](["--out", str(out), "--num-images", "3", "--image-size", "64", "64", "--seed", "5"]) == 0
    assert (out / "annotations.json").is_file() and len(os.listdir(out / "images")) == 3
    assert "3 images" in capsys.readouterr().out


def test_bench_loader_tool_prints_a_table(tmp_path, capsys, restore_logging):
    from benchmarks.loader import main

    argv = [
        "--root",
        str(tmp_path),
        "--num-images",
        "4",
        "--image-size",
        "48",
        "64",
        "--workers",
        "0",
        "--batches",
        "2",
        "--warmup",
        "1",
        "data.min_size_train=[48]",
        "data.max_size_train=100",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| workers | images/s |" in out and "| 0 |" in out and "48 x 64" in out
