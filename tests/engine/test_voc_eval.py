"""Pascal VOC AP (detkit.engine.voc_evaluator) against Detectron2's PascalVOCDetectionEvaluator.

The reference numbers below were computed by running Detectron2's own `voc_eval` (from
detectron2/evaluation/pascal_voc_evaluation.py, facebookresearch/detectron2 at commit 02b5c4e2, with
numpy 2.4.6) outside this repository on the cases built here: VOC XML files holding the ground truth
integers, and per-class result files written the way its `process` writes them (float32 boxes,
xmin + 1, ymin + 1, "{score:.3f} {xmin:.1f} {ymin:.1f} {xmax:.1f} {ymax:.1f}"), then its `evaluate`
loop (IoU thresholds range(50, 100, 5) / 100, mean over classes, then over thresholds).

Score ties: Detectron2 sorts with np.argsort's default kind, which on numpy 2 with the x86 SIMD sort
does not keep tied detections in order. The pinned numbers were computed with that one call made
stable (np.argsort(..., kind="stable")), which is detkit's documented tie rule. With the default
sort on the machine that made them (AVX2), the hand case gave the same numbers and the random cases
differed, e.g. random0 voc07 AP50 61.712 instead of 61.161: Detectron2's own result depends on the
machine when ties mix true and false positives.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from detkit.engine.evaluator import build_evaluator, detections_to_coco, dump_metrics, evaluate_files, format_metrics
from detkit.engine.voc_evaluator import (
    VOCEvaluator,
    prediction_voc_boxes,
    voc_average_precision,
    voc_iou,
)
from detkit.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------------
# Cases (the reference script read the same lists)
# --------------------------------------------------------------------------------------------

# Hand case: cat has a difficult box (one detection on it: ignored), a duplicate, two overlapping
# boxes in one image, tied scores after rounding to 0.001 (0.7004, 0.7001, 0.7, 0.7) and a false
# positive in an image without boxes; dog has boxes and no detection; bird has detections and no
# box; cow has only a difficult box (and a detection on it); sheep has a detection of IoU exactly
# 0.5 (not a match: the rule is IoU > 0.5) and a true positive.
CLASSES = ["cat", "dog", "bird", "cow", "sheep"]
IMAGES = ["000001", "000002", "000003", "000004"]
# (image, class index, xmin, ymin, xmax, ymax, difficult): VOC XML integers, 1-based inclusive.
GT = [
    ("000001", 0, 11, 11, 60, 60, 0),
    ("000001", 0, 101, 21, 140, 90, 1),
    ("000001", 1, 31, 71, 120, 140, 0),
    ("000001", 4, 1, 1, 40, 20, 0),
    ("000002", 0, 21, 31, 80, 100, 0),
    ("000002", 0, 24, 34, 83, 103, 0),
    ("000002", 3, 5, 5, 50, 50, 1),
    ("000002", 4, 101, 51, 140, 90, 0),
    ("000003", 0, 51, 41, 150, 130, 0),
    ("000003", 1, 1, 1, 30, 30, 0),
]
# (image, class index, score, x1, y1, x2, y2): model output (0-based continuous), per image best first.
DETS = [
    ("000001", 0, 0.9, 10, 10, 60, 60),
    ("000001", 0, 0.8, 10.25, 10.35, 59.5, 61),
    ("000001", 4, 0.8, 0, 0, 20, 20),
    ("000001", 0, 0.7004, 100, 20, 140, 90),
    ("000001", 2, 0.6, 30, 70, 120, 140),
    ("000001", 0, 0.35, 0, 0, 30, 30),
    ("000002", 0, 0.7001, 20, 30, 80, 100),
    ("000002", 0, 0.7, 23, 33, 83, 103),
    ("000002", 0, 0.65, 22, 32, 81.5, 101.5),
    ("000002", 3, 0.5, 4, 4, 50, 50),
    ("000002", 4, 0.4, 100, 50, 140, 90),
    ("000003", 0, 0.9, 55, 45, 150, 130),
    ("000003", 0, 0.3, 50, 40, 100, 85),
    ("000004", 0, 0.7, 0, 0, 50, 50),
    ("000004", 2, 0.55, 10, 10, 40, 40),
]


def random_case(seed: int, num_images: int = 30):
    """Ground truth and detections with many score ties (scores on a 0.05 grid), duplicates,
    difficult boxes, empty images and false positives of every kind."""
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c"]
    images = [f"{i:06d}" for i in range(1, num_images + 1)]
    gt, dets = [], []
    for name in images:
        boxes = []
        for _ in range(int(rng.integers(0, 5))):
            w, h = int(rng.integers(8, 80)), int(rng.integers(8, 60))
            xmin, ymin = int(rng.integers(1, 160 - w)), int(rng.integers(1, 120 - h))
            cls = int(rng.integers(0, 3))
            gt.append((name, cls, xmin, ymin, xmin + w - 1, ymin + h - 1, int(rng.random() < 0.15)))
            boxes.append((cls, xmin - 1.0, ymin - 1.0, xmin + w - 1.0, ymin + h - 1.0))
        image_dets = []
        for cls, x1, y1, x2, y2 in boxes:
            for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):  # missed, found, found twice
                j = rng.normal(0.0, 3.0, 4)
                bx1, by1 = x1 + j[0], y1 + j[1]
                bx2, by2 = max(x2 + j[2], bx1 + 2.0), max(y2 + j[3], by1 + 2.0)  # jitter keeps x2 > x1
                image_dets.append((cls, float(rng.integers(1, 21)) / 20, bx1, by1, bx2, by2))
        for _ in range(int(rng.integers(0, 3))):  # background false positives
            x1, y1 = rng.uniform(0, 120), rng.uniform(0, 90)
            image_dets.append(
                (
                    int(rng.integers(0, 3)),
                    float(rng.integers(1, 21)) / 20,
                    x1,
                    y1,
                    x1 + rng.uniform(5, 40),
                    y1 + rng.uniform(5, 30),
                )
            )
        # The model writes its detections best first; a stable sort keeps generation order in ties.
        image_dets.sort(key=lambda d: -d[1])
        for cls, score, x1, y1, x2, y2 in image_dets:
            b = np.array([x1, y1, x2, y2], dtype=np.float32).tolist()
            dets.append((name, cls, score, *b))
    return classes, images, gt, dets


# Detectron2's numbers (see the module docstring), stable tie order: metric -> AP, AP50, AP75,
# per-class AP at IoU > 0.5, per-class mean of the 10 thresholds' APs.
DETECTRON2 = {
    "hand": {
        "voc07": dict(
            AP=22.18181818181819,
            AP50=23.636363636363644,
            AP75=23.636363636363644,
            per_class_AP50=[90.90909090909093, 0.0, 0.0, 0.0, 27.272727272727277],
            per_class_AP=[83.63636363636365, 0.0, 0.0, 0.0, 27.272727272727273],
        ),
        # bird and cow (no box that is not difficult) are NaN in Detectron2's voc12, and so is its mean.
        "voc12": dict(
            AP=math.nan,
            AP50=math.nan,
            AP75=math.nan,
            per_class_AP50=[89.99999999999999, 0.0, math.nan, math.nan, 25.0],
            per_class_AP=[82.99999999999999, 0.0, math.nan, math.nan, 25.0],
        ),
    },
    "random0": {
        "voc07": dict(
            AP=31.139765118186624,
            AP50=61.16118694348359,
            AP75=27.010506954243095,
            per_class_AP50=[60.07807742496737, 56.363636363636374, 67.04184704184703],
            per_class_AP=[34.257871749982215, 29.233379426533492, 29.92804417804418],
        ),
        "voc12": dict(
            AP=30.689110070212717,
            AP50=61.6250378211009,
            AP75=26.406682498363683,
            per_class_AP50=[60.62316083039768, 58.04761904761905, 66.20433358528595],
            per_class_AP=[33.96834989397204, 29.294454859759718, 28.80452545690641],
        ),
    },
    "random1": {
        "voc07": dict(
            AP=26.767196108178005,
            AP50=48.99208535572172,
            AP75=28.617034261303036,
            per_class_AP50=[50.22694477239932, 47.38292011019284, 49.366391184573],
            per_class_AP=[25.110527351436442, 28.20208025684414, 26.988980716253444],
        ),
        "voc12": dict(
            AP=27.09951421082237,
            AP50=50.524537191203855,
            AP75=28.345211953907604,
            per_class_AP50=[51.874699374699375, 50.27972027972027, 49.41919191919192],
            per_class_AP=[25.407335257335255, 28.916459900384382, 26.974747474747478],
        ),
    },
}


def case(name: str):
    if name == "hand":
        return CLASSES, IMAGES, GT, DETS
    return random_case(int(name.removeprefix("random")))


def voc_dataset(classes, images, gt) -> dict:
    """The COCO-format dict the VOC reader returns: box [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]."""
    image_id = {name: i for i, name in enumerate(images, start=1)}
    return {
        "images": [
            {"id": i, "file_name": f"JPEGImages/{n}.jpg", "width": 200, "height": 150} for n, i in image_id.items()
        ],
        "annotations": [
            {
                "id": j,
                "image_id": image_id[name],
                "category_id": cls + 1,
                "bbox": [xmin - 1.0, ymin - 1.0, float(xmax - xmin + 1), float(ymax - ymin + 1)],
                "area": float((xmax - xmin + 1) * (ymax - ymin + 1)),
                "iscrowd": 0,
                "difficult": difficult,
            }
            for j, (name, cls, xmin, ymin, xmax, ymax, difficult) in enumerate(gt, start=1)
        ],
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)],
    }


def model_predictions(images, dets) -> list[dict]:
    """COCO results as detkit's inference loop writes them (float32 model outputs -> detections_to_coco)."""
    image_id = {name: i for i, name in enumerate(images, start=1)}
    out: list[dict] = []
    for name in images:
        mine = [d for d in dets if d[0] == name]
        detections = {
            "boxes": torch.tensor([d[3:] for d in mine], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor([d[2] for d in mine], dtype=torch.float32),
            "labels": torch.tensor([d[1] for d in mine], dtype=torch.int64),
        }
        out += detections_to_coco(detections, image_id[name], category_ids=list(range(1, 100)))
    return out


def run_case(name: str, metric: str):
    classes, images, gt, dets = case(name)
    return VOCEvaluator(voc_dataset(classes, images, gt), metric=metric).run(model_predictions(images, dets))


# --------------------------------------------------------------------------------------------
# Equality with Detectron2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
@pytest.mark.parametrize("name", ["random0", "random1"])
def test_random_cases_with_many_ties_equal_detectron2(name, metric):
    result = run_case(name, metric)
    expected = DETECTRON2[name][metric]
    for key in ("AP", "AP50", "AP75"):
        assert result.metrics[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    assert list(result.metrics["per_class"].values()) == pytest.approx(expected["per_class_AP50"], rel=1e-12)
    assert list(result.metrics["per_class"]) == ["a", "b", "c"]
    # All 10 thresholds: each class's mean over them.
    assert (result.ap * 100).mean(axis=0).tolist() == pytest.approx(expected["per_class_AP"], rel=1e-12)


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
def test_hand_case_equals_detectron2_on_every_class_with_ground_truth(metric):
    result = run_case("hand", metric)
    expected = DETECTRON2["hand"][metric]
    per_class = result.metrics["per_class"]
    assert list(per_class) == CLASSES
    with_gt = ["cat", "dog", "sheep"]  # bird: no box; cow: only a difficult one
    for name in with_gt:
        k = CLASSES.index(name)
        assert per_class[name] == pytest.approx(expected["per_class_AP50"][k], rel=1e-12), name
        assert (result.ap[:, k] * 100).mean() == pytest.approx(expected["per_class_AP"][k], rel=1e-12), name
    # detkit: undefined, left out of the means; Detectron2: 0 (voc07) or NaN (voc12).
    assert math.isnan(per_class["bird"]) and math.isnan(per_class["cow"])
    assert result.num_positives.tolist() == [4, 2, 0, 0, 2]
    assert result.num_detections.tolist() == [10, 0, 2, 1, 2]
    mean_with_gt = np.mean([expected["per_class_AP50"][CLASSES.index(n)] for n in with_gt])
    assert result.metrics["AP50"] == pytest.approx(mean_with_gt, rel=1e-12)
    ap_with_gt = np.mean([expected["per_class_AP"][CLASSES.index(n)] for n in with_gt])
    assert result.metrics["AP"] == pytest.approx(ap_with_gt, rel=1e-12)
    if metric == "voc07":
        # Counting the two classes as 0, as Detectron2 does, gives its mean exactly.
        as_detectron2 = [0.0 if math.isnan(v) else v for v in per_class.values()]
        assert np.mean(as_detectron2) == pytest.approx(expected["AP50"], rel=1e-12)
        assert result.metrics["AP50"] == pytest.approx((90.90909090909093 + 0.0 + 27.272727272727277) / 3)
    else:
        assert math.isnan(expected["AP50"])  # Detectron2's voc12 mean is NaN here; detkit's is not
        assert result.metrics["AP50"] == pytest.approx((90.0 + 0.0 + 25.0) / 3)


def test_hand_case_cat_by_hand():
    """cat at IoU > 0.5, detections in order: TP (0.9), TP (0.9), duplicate FP (0.8), difficult
    (ignored, 0.700), TP, TP, FP (0.700 ties), FP, FP, FP: recall .25 .5 .5 .5 .75 1 ..., precision
    1 1 2/3 2/3 3/4 4/5 ...; 11-point: 6 points at precision 1 and 5 at 4/5; area: .5 * 1 + .5 * .8."""
    assert run_case("hand", "voc07").metrics["per_class"]["cat"] == pytest.approx(100 * (6 + 5 * 0.8) / 11)
    assert run_case("hand", "voc12").metrics["per_class"]["cat"] == pytest.approx(90.0)


# --------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------


def test_average_precision_11_point_and_area():
    recall = np.array([0.25, 0.5, 0.5, 0.75, 1.0])
    precision = np.array([1.0, 1.0, 2 / 3, 0.75, 0.8])
    # 11-point: t = 0 .. 0.5 -> 1 (6 points), t = 0.6 .. 1.0 -> 0.8 (5 points).
    assert voc_average_precision(recall, precision, True) == pytest.approx((6 + 5 * 0.8) / 11, rel=1e-15)
    assert voc_average_precision(recall, precision, False) == pytest.approx(0.5 * 1.0 + 0.5 * 0.8, rel=1e-15)
    # np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004: a recall of exactly 0.3 does not reach it.
    assert voc_average_precision(np.array([0.3]), np.array([1.0]), True) == pytest.approx(3 / 11)
    assert voc_average_precision(np.zeros(0), np.zeros(0), True) == 0.0
    assert voc_average_precision(np.zeros(0), np.zeros(0), False) == 0.0


def test_predicted_boxes_are_rounded_as_detectron2_writes_them():
    # x1 = 0.35 in float32 is 0.3499999940: x1 + 1 = 1.35 (float32 1.35000002) -> "1.4"; x2 = 10.25
    # -> "10.2" (half to even on an exact binary value); y1 = 0.05: 0.05 + 1 -> 1.05 (float32 1.04999995)
    # -> "1.0"; y2 = 0.05 + 20 -> 20.05 (float32 20.0499992) -> "20.0".
    boxes = prediction_voc_boxes(np.array([[0.35, 0.05, np.float32(10.25) - np.float32(0.35), 20.0]]))
    assert boxes.tolist() == [[1.4, 1.0, 10.2, 20.0]]
    # The IoU of the shifted boxes with VOC's +1 widths is the continuous IoU of the COCO boxes.
    det = np.array([[1.0, 1.0, 20.0, 20.0]])  # model box [0, 0, 20, 20]
    gt = np.array([[[1.0, 1.0, 40.0, 20.0]]])  # XML box of COCO [0, 0, 40, 20]
    assert voc_iou(det, gt).tolist() == [[0.5]]


def test_scores_are_rounded_to_three_decimals_before_sorting():
    """0.9004 (image 2) and 0.9001 (image 1) both read 0.900: image 1's, arriving first, goes first.
    Image 1's detection is a false positive and image 2's a true positive (1 box): precision at full
    recall is 1/2 after the rounding (1 without it)."""
    dataset = voc_dataset(["a"], ["1", "2"], [("2", 0, 1, 1, 10, 10, 0)])
    predictions = [
        {"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.9001},
        {"image_id": 2, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.9004},
    ]
    assert VOCEvaluator(dataset, "voc12").evaluate(predictions)["AP50"] == pytest.approx(50.0)
    predictions[0]["score"] = 0.8994  # reads 0.899: now behind
    assert VOCEvaluator(dataset, "voc12").evaluate(predictions)["AP50"] == pytest.approx(100.0)


def test_duplicate_on_the_best_box_is_false_even_when_another_box_is_free():
    """Two boxes overlap; both detections' best box is the first one: the second detection is a
    duplicate (VOC's rule), although it would match the second box (COCO would take it)."""
    dataset = voc_dataset(["a"], ["1"], [("1", 0, 1, 1, 40, 40, 0), ("1", 0, 5, 1, 44, 40, 0)])
    predictions = [
        {"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 40.0, 40.0], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [1.0, 0.0, 40.0, 40.0], "score": 0.8},
    ]
    result = VOCEvaluator(dataset, "voc12").run(predictions)
    assert result.metrics["AP50"] == pytest.approx(50.0)  # recall 1/2 at precision 1, then 1/2 at 1/2


def test_crowd_boxes_are_ignored_like_difficult_ones():
    dataset = voc_dataset(["a"], ["1"], [("1", 0, 1, 1, 40, 40, 0), ("1", 0, 61, 61, 100, 100, 0)])
    dataset["annotations"][1]["iscrowd"] = 1
    predictions = [
        {"image_id": 1, "category_id": 1, "bbox": [60.0, 60.0, 40.0, 40.0], "score": 0.9},  # on the crowd box
        {"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 40.0, 40.0], "score": 0.8},
    ]
    result = VOCEvaluator(dataset, "voc07").run(predictions)
    assert result.num_positives.tolist() == [1]
    assert result.metrics["AP50"] == pytest.approx(100.0)


def test_no_predictions_give_zero_where_there_is_ground_truth(caplog):
    classes, images, gt, _ = case("hand")
    with caplog.at_level(logging.WARNING, logger="detkit.engine.voc_evaluator"):
        metrics = VOCEvaluator(voc_dataset(classes, images, gt), "voc07").evaluate([])
    assert metrics["AP50"] == 0.0 and metrics["AP"] == 0.0
    assert [metrics["per_class"][c] for c in ("cat", "dog", "sheep")] == [0.0, 0.0, 0.0]
    assert "no predictions" in caplog.text and "bird, cow" in caplog.text


def test_the_ground_truth_dict_is_not_changed():
    classes, images, gt, dets = case("hand")
    dataset = voc_dataset(classes, images, gt)
    for ann in dataset["annotations"]:
        del ann["area"]
    before = json.dumps(dataset, sort_keys=True)
    VOCEvaluator(dataset, "voc07").evaluate(model_predictions(images, dets))
    assert json.dumps(dataset, sort_keys=True) == before


# --------------------------------------------------------------------------------------------
# Bad input, configuration, files and tables
# --------------------------------------------------------------------------------------------


def test_bad_difficult_values_and_unknown_ids_are_data_errors():
    classes, images, gt, _ = case("hand")
    dataset = voc_dataset(classes, images, gt)
    dataset["annotations"][2]["difficult"] = "yes"
    with pytest.raises(DataError, match=r"annotations have a 'difficult' value .*annotation 3 difficult='yes'"):
        VOCEvaluator(dataset, "voc07", source="voc_test.json")
    evaluator = VOCEvaluator(voc_dataset(classes, images, gt), "voc07")
    with pytest.raises(DataError, match="category ids that are not in the ground truth"):
        evaluator.evaluate([{"image_id": 1, "category_id": 9, "bbox": [0, 0, 5, 5], "score": 0.5}])
    with pytest.raises(DataError, match="image ids that are not in the ground truth"):
        evaluator.evaluate([{"image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])


def test_metric_names_are_checked(tmp_path):
    from detkit.config import load_config

    assert load_config(None, ["test.metric=voc12"]).test.metric == "voc12"
    with pytest.raises(ConfigError, match="voc13"):
        load_config(None, ["test.metric=voc13"])
    classes, images, gt, _ = case("hand")
    with pytest.raises(ConfigError, match="is not a metric; use coco, voc07, voc12"):
        build_evaluator(voc_dataset(classes, images, gt), "voc13")
    with pytest.raises(ConfigError, match="detkit-convert-data"):
        build_evaluator(voc_dataset(classes, images, gt), "coco")


def test_file_mode_with_the_voc_metric(tmp_path, capsys):
    """`detkit eval --gt --predictions --metric voc07`: the same numbers as the pinned case, the VOC tables."""
    from detkit.cli.eval import main

    classes, images, gt, dets = case("random0")
    (tmp_path / "gt.json").write_text(json.dumps(voc_dataset(classes, images, gt)))
    (tmp_path / "predictions.json").write_text(json.dumps(model_predictions(images, dets)))
    assert evaluate_files(tmp_path / "gt.json", tmp_path / "predictions.json", metric="voc12")["AP50"] == (
        pytest.approx(DETECTRON2["random0"]["voc12"]["AP50"], rel=1e-12)
    )
    args = ["--gt", tmp_path / "gt.json", "--predictions", tmp_path / "predictions.json", "--metric", "voc07"]
    assert main([*map(str, args), "--out", str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == ["AP", "AP50", "AP75", "per_class"]
    assert metrics["AP50"] == pytest.approx(DETECTRON2["random0"]["voc07"]["AP50"], rel=1e-12)
    stdout = capsys.readouterr().out
    assert "Pascal VOC metric voc07, 11-point" in stdout and "Per-class AP50 (VOC):" in stdout
    assert f"{metrics['AP50']:.3f}" in stdout and f"{metrics['per_class']['a']:.3f}" in stdout


def test_metric_flag_is_for_file_mode_only(tmp_path):
    from detkit.cli.eval import main

    with pytest.raises(ConfigError, match=r"in model mode set test\.metric=voc07"):
        main(["configs/frcnn_r101_voc.yaml", "--weights", str(tmp_path / "model.pth"), "--metric", "voc07"])


def test_undefined_classes_are_null_in_metrics_json_and_nan_in_the_table(tmp_path):
    classes, images, gt, dets = case("hand")
    metrics = VOCEvaluator(voc_dataset(classes, images, gt), "voc12").evaluate(model_predictions(images, dets))
    dump_metrics(metrics, tmp_path / "metrics.json")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["per_class"]["bird"] is None and written["per_class"]["cat"] == pytest.approx(90.0)
    table = format_metrics(metrics)
    assert re.search(r"\|\s+bird\s+\|\s+nan\s+\|", table) and re.search(r"\|\s+cat\s+\|\s+90\.000\s+\|", table)
    assert "Per-class AP50 (VOC):" in table and "| 36.000 | 38.333 | 38.333 |" in table and "APs" not in table


def test_fast_rounding_equals_python_formatting():
    """The rounding of float32 values by np.round equals f"{v:.1f}" / f"{v:.3f}" (exact halves,
    near-halves, large and negative values), and float64 values go through the text itself."""
    from detkit.engine.voc_evaluator import _round_text

    rng = np.random.default_rng(0)
    halves = np.arange(-2000, 2000) * np.float32(0.05)  # many exact or near .x5 values in float32
    thousandths = np.arange(0, 2000) * np.float32(0.0005)
    spread = rng.uniform(-5000, 5000, 20000).astype(np.float32)
    for digits in (1, 3):
        for values in (halves, thousandths, spread):
            as_float = values.astype(np.float64)
            expected = [float(f"{v:.{digits}f}") for v in as_float.tolist()]
            assert _round_text(as_float, digits).tolist() == expected
    doubles = np.array([0.35, 0.0005, 0.8995, 2.675])  # not float32 values: 0.35 -> "0.3" (np.round: 0.4)
    assert _round_text(doubles, 1).tolist() == [0.3, 0.0, 0.9, 2.7]
    assert _round_text(doubles, 3).tolist() == [0.35, 0.001, 0.899, 2.675]
    assert np.round(0.35, 1) == 0.4  # why the text route is kept for them


# --------------------------------------------------------------------------------------------
# The trainer's evaluation (periodic and final) with test.metric: voc07
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # two model builds and three inference passes of a tiny R18: a few seconds
def test_trainer_evaluation_and_eval_command_report_voc_metrics(tmp_path, capsys):
    """test.metric=voc07 on a random tiny model: evaluate_model (the trainer's periodic and final
    evaluation) reports VOCEvaluator's numbers on the same model's predictions under the trainer's
    "bbox/" keys, with per-class "bbox/AP50-<name>"; `detkit eval --weights` writes the same numbers
    to metrics.json and prints the VOC tables. The ground truth is made from the model's own
    detections (some marked difficult) so that the AP is far from 0."""
    from detkit.config import load_config
    from detkit.data.synthetic import ShapesParams, ensure_shapes_dataset
    from detkit.engine.trainer import evaluate_model
    from detkit.modeling import build_model
    from tests.conftest import TINY_MODEL as tiny_model  # a random ResNet-18 C4 on 64 px inputs

    ann_file, image_root = ensure_shapes_dataset(
        ShapesParams(split="val", num_images=3, image_size=(64, 64), num_classes=3, max_objects=2), tmp_path
    )
    shapes = json.loads(Path(ann_file).read_text())
    entry = f"[{{type: coco, ann_file: {tmp_path / 'gt.json'}, image_root: {image_root}}}]"
    (tmp_path / "gt.json").write_text(json.dumps(shapes))
    cfg = load_config(None, [*tiny_model, f"data.test={entry}", "data.num_workers=0", "test.metric=voc07"])
    torch.manual_seed(0)
    model = build_model(cfg, load_weights=False)
    from detkit.data import build_test_loader
    from detkit.engine.evaluator import inference_on_dataset

    predictions = inference_on_dataset(model, build_test_loader(cfg), [1, 2, 3], "cpu")
    assert len(predictions) > 20
    # Ground truth: the 4 best detections of each image, boxes rounded out to whole pixels, the 2nd difficult.
    annotations = []
    for image in shapes["images"]:
        best = sorted((p for p in predictions if p["image_id"] == image["id"]), key=lambda p: -p["score"])[:4]
        for rank, p in enumerate(best):
            x, y, w, h = p["bbox"]
            x1, y1 = math.floor(x), math.floor(y)
            box = [x1, y1, math.ceil(x + w) - x1, math.ceil(y + h) - y1]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image["id"], "category_id": p["category_id"],
                 "bbox": box, "area": box[2] * box[3], "iscrowd": 0, "difficult": int(rank == 1)}
            )  # fmt: skip
    (tmp_path / "gt.json").write_text(json.dumps({**shapes, "annotations": annotations}))

    results = evaluate_model(cfg, model, torch.device("cpu"))
    expected = VOCEvaluator(tmp_path / "gt.json", "voc07").evaluate(predictions)
    assert 30.0 < expected["AP50"] < 100.0
    assert {k: v for k, v in results.items() if k != "per_class"} == pytest.approx(
        {
            "bbox/AP": expected["AP"],
            "bbox/AP50": expected["AP50"],
            "bbox/AP75": expected["AP75"],
            **{f"bbox/AP50-{name}": ap for name, ap in expected["per_class"].items()},
        },
        rel=1e-12,
        nan_ok=True,
    )
    assert results["per_class"] == pytest.approx(expected["per_class"], rel=1e-12, nan_ok=True)

    # The eval command in model mode, on a checkpoint of the same model.
    from detkit.cli.eval import main
    from detkit.config import config_to_dict
    from detkit.engine.checkpoint import save_checkpoint

    checkpoint = tmp_path / "model.pth"
    state = {
        "model": model.state_dict(),
        "config": config_to_dict(cfg),
        "class_names": ["circle", "square", "triangle"],
    }
    save_checkpoint(state, checkpoint)
    assert main(["--weights", str(checkpoint), f"output_dir={tmp_path / 'eval'}"]) == 0
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(written) == ["AP", "AP50", "AP75", "per_class"]
    assert [written[k] for k in ("AP", "AP50", "AP75")] == pytest.approx(
        [expected["AP"], expected["AP50"], expected["AP75"]], rel=1e-12
    )
    # A class without a box that is not difficult is null in metrics.json.
    assert written["per_class"] == {
        name: None if math.isnan(ap) else pytest.approx(ap, rel=1e-12) for name, ap in expected["per_class"].items()
    }
    assert "Pascal VOC metric voc07, 11-point" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The VOC reader and the VOC metric together: `difficult` travels from the XML to the evaluator


def test_voc_files_read_by_the_reader_score_their_own_boxes_100_and_difficult_ones_are_ignored(tmp_path):
    from detkit.data.formats import read_dataset
    from tests.data.format_samples import read_options, write_voc

    write_voc(tmp_path)
    path, options = read_options("voc", tmp_path, "val")
    gt = read_dataset("voc", path, **options)
    difficult = [a for a in gt["annotations"] if a["difficult"]]
    plain = [a for a in gt["annotations"] if not a["difficult"]]
    assert difficult and plain  # the sample marks the first object of each val image difficult

    def results(anns, score):
        return [
            {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score}
            for a in anns
        ]

    evaluator = VOCEvaluator(gt, metric="voc07")
    # Every non-difficult box found: 100; a detection on a difficult box is neither TP nor FP, even
    # ranked first; missing the difficult boxes costs nothing.
    assert evaluator.evaluate(results(plain, 0.5))["AP50"] == pytest.approx(100.0)
    assert evaluator.evaluate(results(difficult, 0.9) + results(plain, 0.5))["AP50"] == pytest.approx(100.0)
    # Only the difficult ones found: nothing counts, AP 0 where a class has non-difficult boxes.
    assert evaluator.evaluate(results(difficult, 0.9))["AP50"] == pytest.approx(0.0)
