"""COCOEvaluator against pycocotools' own COCOeval, hand-computed APs, bad input, the inference loop.

The reference numbers come from pycocotools run the way its README shows (COCO(file),
loadRes(file), COCOeval(...).evaluate/accumulate/summarize) on the same json files.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from detkit.engine import evaluator as ev
from detkit.engine.evaluator import (
    METRIC_KEYS,
    COCOEvaluator,
    dump_metrics,
    evaluate_files,
    format_metrics,
    inference_on_dataset,
    resolve_backend,
)
from detkit.errors import ConfigError, DataError
from detkit.structures.image_batch import ImageBatch

HAVE_FASTER = "faster_coco_eval" in ev.available_backends()
BACKENDS = [
    "pycocotools",
    pytest.param(
        "faster_coco_eval",
        marks=pytest.mark.skipif(
            not HAVE_FASTER, reason="faster-coco-eval is not installed (pip install faster-coco-eval)"
        ),
    ),
]


# --------------------------------------------------------------------------------------------
# Hand-made data
# --------------------------------------------------------------------------------------------


def make_dataset(seed: int) -> tuple[dict, list[dict]]:
    """Ground truth and predictions exercising what COCOeval treats specially.

    12 images (ids 1, 4, 7, ... so ids are not 0..N-1), 4 categories with odd ids, one category
    without any ground truth, empty images (no GT, some with predictions), crowd regions (with
    detections on them), objects of all three area ranges (GT "area" != w*h, as for COCO masks),
    jittered true positives, wrong-class and random false positives, score ties, and one image
    with 250 detections (> maxDets 100).
    """
    rng = random.Random(seed)
    images = [{"id": 3 * i + 1, "file_name": f"{i}.jpg", "height": 480, "width": 640} for i in range(12)]
    categories = [{"id": 2 * c + 1, "name": f"class{c}"} for c in range(4)]
    cat_ids = [c["id"] for c in categories[:3]]  # category 7 has no ground truth
    annotations: list[dict] = []
    predictions: list[dict] = []
    for img in images:
        if img["id"] in (4, 13):
            continue  # empty images
        for _ in range(rng.randint(1, 10)):
            side = rng.choice([12, 24, 48, 80, 150, 300])  # small, medium and large
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = rng.choice(cat_ids)
            crowd = int(rng.random() < 0.12)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img["id"],
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h * rng.uniform(0.55, 0.95),
                    "iscrowd": crowd,
                }
            )
            for _ in range(rng.randint(0, 3)):
                jitter = [rng.gauss(0, side * 0.08) for _ in range(4)]
                label = cat if rng.random() < 0.85 else rng.choice(cat_ids)
                box = [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]
                predictions.append(
                    {"image_id": img["id"], "category_id": label, "bbox": box, "score": round(rng.random(), 2)}
                )  # rounding makes ties
    for image_id in (4, 19):  # false positives on an empty image and on a busy one
        for _ in range(4):
            predictions.append(
                {
                    "image_id": image_id,
                    "category_id": rng.choice(cat_ids),
                    "bbox": [rng.uniform(0, 500), rng.uniform(0, 400), 40.0, 30.0],
                    "score": rng.random(),
                }
            )
    predictions.append({"image_id": 1, "category_id": 7, "bbox": [5.0, 5.0, 50.0, 50.0], "score": 0.9})
    busy = images[1]["id"]
    for _ in range(250):
        w, h = rng.uniform(4, 250), rng.uniform(4, 250)
        predictions.append(
            {
                "image_id": busy,
                "category_id": rng.choice(cat_ids),
                "bbox": [rng.uniform(0, 380), rng.uniform(0, 220), w, h],
                "score": rng.random(),
            }
        )
    gt = {"images": images, "categories": categories, "annotations": annotations}
    return gt, predictions


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def pycocotools_reference(gt_file: str, dt_file: str):
    """pycocotools on files, exactly as its own README runs it (prints swallowed)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_file)
        coco_dt = coco_gt.loadRes(dt_file)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def box(x, y, w, h):
    return [float(x), float(y), float(w), float(h)]


def tiny_gt(annotations, categories=({"id": 1, "name": "cat"},), n_images=1) -> dict:
    images = [{"id": i + 1, "file_name": f"{i}.jpg", "height": 600, "width": 800} for i in range(n_images)]
    anns = [{"id": i + 1, "iscrowd": 0, **a} for i, a in enumerate(annotations)]
    for a in anns:
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    return {"images": images, "categories": list(categories), "annotations": anns}


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


# --------------------------------------------------------------------------------------------
# Equality with pycocotools
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_12_stats_equal_pycocotools_on_the_same_files(tmp_path, backend, seed):
    gt, predictions = make_dataset(seed)
    gt_file = write_json(tmp_path / "gt.json", gt)
    dt_file = write_json(tmp_path / "dt.json", predictions)
    reference = pycocotools_reference(gt_file, dt_file)
    assert len([s for s in reference.stats if s > 0]) >= 9  # the data is not degenerate

    result = COCOEvaluator(gt_file, backend=backend).run(json.loads(Path(dt_file).read_text()))

    np.testing.assert_allclose(result.stats, reference.stats, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.precision, reference.eval["precision"], rtol=0, atol=1e-6)
    for i, name in enumerate(METRIC_KEYS):
        assert result.metrics[name] == pytest.approx(reference.stats[i] * 100, abs=1e-6)


def test_backends_agree_and_the_tolerance_needed_is_float_rounding(tmp_path):
    """faster-coco-eval equals pycocotools to ~1e-16 (floating-point summation order); 1e-9 is asserted."""
    if not HAVE_FASTER:
        pytest.skip("faster-coco-eval is not installed")
    worst = 0.0
    for seed in range(3, 8):
        gt, predictions = make_dataset(seed)
        gt_file = write_json(tmp_path / f"gt{seed}.json", gt)
        a = COCOEvaluator(gt_file, backend="pycocotools").run(predictions)
        b = COCOEvaluator(gt_file, backend="faster_coco_eval").run(predictions)
        worst = max(worst, float(np.abs(a.stats - b.stats).max()))
        assert a.metrics["per_class"].keys() == b.metrics["per_class"].keys()
        for name, ap in a.metrics["per_class"].items():
            assert b.metrics["per_class"][name] == pytest.approx(ap, abs=1e-7, nan_ok=True)
    assert worst < 1e-9


def test_per_class_ap_is_detectron2s_mean_over_valid_precisions(tmp_path):
    gt, predictions = make_dataset(0)
    gt_file = write_json(tmp_path / "gt.json", gt)
    reference = pycocotools_reference(gt_file, write_json(tmp_path / "dt.json", predictions))
    per_class = COCOEvaluator(gt_file, backend="pycocotools").evaluate(predictions)["per_class"]

    assert list(per_class) == ["class0", "class1", "class2", "class3"]
    for k, name in enumerate(per_class):
        precision = reference.eval["precision"][:, :, k, 0, -1]
        valid = precision[precision > -1]
        if valid.size:
            assert per_class[name] == pytest.approx(valid.mean() * 100, abs=1e-9)
    assert math.isnan(per_class["class3"])  # no ground truth of that class: undefined, not 0


# --------------------------------------------------------------------------------------------
# Numbers computed by hand
# --------------------------------------------------------------------------------------------


def test_perfect_detections_give_100_and_empty_area_ranges_give_nan(tmp_path):
    # One medium object (40x40 = 1600 px^2), one large one (200x100).
    gt = tiny_gt(
        [
            {"image_id": 1, "category_id": 1, "bbox": box(10, 10, 40, 40)},
            {"image_id": 1, "category_id": 1, "bbox": box(300, 200, 200, 100)},
        ]
    )
    metrics = COCOEvaluator(write_json(tmp_path / "gt.json", gt), backend="pycocotools").evaluate(
        [det(1, 1, box(10, 10, 40, 40), 0.9), det(1, 1, box(300, 200, 200, 100), 0.8)]
    )
    for key in ("AP", "AP50", "AP75", "APm", "APl", "AR10", "AR100"):
        assert metrics[key] == pytest.approx(100.0)
    assert metrics["AR1"] == pytest.approx(50.0)  # one detection per image finds one of the two
    assert math.isnan(metrics["APs"])  # no small ground truth: COCOeval's -1
    assert metrics["per_class"] == {"cat": pytest.approx(100.0)}


def test_a_false_positive_between_two_hits_gives_the_interpolated_ap(tmp_path):
    """Hits at ranks 1 and 3, a miss at rank 2: precision 1 up to recall 0.5 (51 of the 101 recall
    thresholds), then 2/3 up to recall 1 (50 thresholds): AP = (51 + 50 * 2/3) / 101."""
    gt = tiny_gt(
        [
            {"image_id": 1, "category_id": 1, "bbox": box(10, 10, 100, 100)},
            {"image_id": 1, "category_id": 1, "bbox": box(400, 300, 100, 100)},
        ]
    )
    predictions = [
        det(1, 1, box(10, 10, 100, 100), 0.9),
        det(1, 1, box(200, 10, 100, 100), 0.8),
        det(1, 1, box(400, 300, 100, 100), 0.7),
    ]
    metrics = COCOEvaluator(write_json(tmp_path / "gt.json", gt), backend="pycocotools").evaluate(predictions)
    expected = (51 + 50 * 2 / 3) / 101 * 100
    assert metrics["AP"] == pytest.approx(expected, abs=1e-9)
    assert metrics["AP50"] == pytest.approx(expected, abs=1e-9)
    assert metrics["AR100"] == pytest.approx(100.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_detection_on_a_crowd_region_is_ignored_not_a_false_positive(tmp_path, backend):
    crowd = {"image_id": 1, "category_id": 1, "bbox": box(400, 300, 200, 200), "iscrowd": 1}
    person = {"image_id": 1, "category_id": 1, "bbox": box(10, 10, 100, 100)}
    predictions = [det(1, 1, box(450, 350, 60, 60), 0.95), det(1, 1, box(10, 10, 100, 100), 0.9)]
    with_crowd = COCOEvaluator(write_json(tmp_path / "a.json", tiny_gt([person, crowd])), backend=backend)
    assert with_crowd.evaluate(predictions)["AP"] == pytest.approx(100.0)
    # The same region as a normal object: the 0.95 detection is a false positive ranked first.
    not_crowd = COCOEvaluator(
        write_json(tmp_path / "b.json", tiny_gt([person, {**crowd, "iscrowd": 0}])), backend=backend
    )
    assert not_crowd.evaluate(predictions)["AP50"] == pytest.approx(51 * 0.5 / 101 * 100, abs=1e-9)


def test_only_the_100_best_detections_of_an_image_count(tmp_path):
    gt_file = write_json(
        tmp_path / "gt.json", tiny_gt([{"image_id": 1, "category_id": 1, "bbox": box(10, 10, 50, 50)}])
    )
    decoys = [det(1, 1, box(500, 400, 30, 30), 0.9) for _ in range(100)]
    hit = det(1, 1, box(10, 10, 50, 50), 0.5)  # the 101st by score
    evaluator = COCOEvaluator(gt_file, backend="pycocotools")
    assert evaluator.evaluate(decoys + [hit])["AR100"] == 0.0
    assert evaluator.evaluate(decoys[:99] + [hit])["AR100"] == pytest.approx(100.0)


def test_predictions_on_an_image_without_ground_truth_lower_precision(tmp_path):
    gt = tiny_gt([{"image_id": 1, "category_id": 1, "bbox": box(10, 10, 50, 50)}], n_images=2)
    evaluator = COCOEvaluator(write_json(tmp_path / "gt.json", gt), backend="pycocotools")
    hit = det(1, 1, box(10, 10, 50, 50), 0.5)
    assert evaluator.evaluate([hit])["AP"] == pytest.approx(100.0)
    # A higher-scored detection on the empty image 2: precision 1/2 at recall 1.
    assert evaluator.evaluate([hit, det(2, 1, box(10, 10, 50, 50), 0.9)])["AP"] == pytest.approx(50.0)


# --------------------------------------------------------------------------------------------
# Bad input: clear errors or a documented zero result
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small_evaluator(tmp_path):
    gt = tiny_gt(
        [
            {"image_id": 1, "category_id": 3, "bbox": box(10, 10, 50, 50)},
            {"image_id": 2, "category_id": 5, "bbox": box(100, 100, 150, 120)},
        ],
        categories=({"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}),
        n_images=3,
    )
    return COCOEvaluator(write_json(tmp_path / "gt.json", gt), backend="pycocotools")


def test_an_empty_prediction_list_gives_zeros_where_there_is_ground_truth(small_evaluator, caplog):
    with caplog.at_level(logging.WARNING, logger="detkit"):
        metrics = small_evaluator.evaluate([])
    assert "no predictions" in caplog.text
    assert {k: metrics[k] for k in ("AP", "AP50", "AP75", "APm", "APl", "AR1", "AR10", "AR100")} == dict.fromkeys(
        ("AP", "AP50", "AP75", "APm", "APl", "AR1", "AR10", "AR100"), 0.0
    )
    assert math.isnan(metrics["APs"])  # no small ground truth
    assert metrics["per_class"] == {"cat": 0.0, "dog": 0.0}


def test_unknown_image_ids_are_a_clear_error(small_evaluator):
    with pytest.raises(
        DataError, match=r"2 predictions name 1 image ids that are not in the ground truth \(e\.g\. 42\)"
    ):
        small_evaluator.evaluate(
            [det(1, 3, box(1, 1, 5, 5), 0.5), det(42, 3, box(1, 1, 5, 5), 0.5), det(42, 3, box(1, 1, 5, 5), 0.4)]
        )


def test_unknown_category_ids_are_a_clear_error_with_a_hint_for_contiguous_labels(small_evaluator):
    with pytest.raises(
        DataError,
        match=r"category ids that are not in the ground truth \(e\.g\. 0, 1; valid: 3, 5\)"
        r".*contiguous labels",
    ):
        small_evaluator.evaluate([det(1, 0, box(1, 1, 5, 5), 0.5), det(1, 1, box(1, 1, 5, 5), 0.5)])
    with pytest.raises(DataError, match=r"e\.g\. 90;") as info:
        small_evaluator.evaluate([det(1, 90, box(1, 1, 5, 5), 0.5)])
    assert "contiguous" not in str(info.value)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("not a dict", "is a str, not a dict"),
        ({"image_id": 1, "bbox": [1, 2, 3, 4]}, "lacks category_id, score"),
        ({"image_id": "1", "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.5}, "image_id must be an integer"),
        ({"image_id": True, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.5}, "image_id must be an integer"),
        ({"image_id": 1, "category_id": 3.0, "bbox": [1, 2, 3, 4], "score": 0.5}, "category_id must be an integer"),
        ({"image_id": 1, "category_id": 3, "bbox": [1, 2, 3], "score": 0.5}, "list of 4 numbers"),
        ({"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, None], "score": 0.5}, "finite numbers"),
        ({"image_id": 1, "category_id": 3, "bbox": [10, 10, 5, -5], "score": 0.5}, "not \\[x1, y1, x2, y2\\]"),
        ({"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": float("nan")}, "score must be a finite"),
        ({"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": "high"}, "score must be a finite"),
    ],
)
def test_malformed_entries_are_named_by_index(small_evaluator, entry, message):
    good = det(1, 3, box(10, 10, 50, 50), 0.5)
    with pytest.raises(DataError, match=r"1 of 3 entries are malformed: \[1\] [^;]*" + message):
        small_evaluator.evaluate([good, entry, good])


def test_extra_keys_such_as_file_name_are_ignored(small_evaluator):
    metrics = small_evaluator.evaluate(
        [{**det(1, 3, box(10, 10, 50, 50), 0.5), "file_name": "a.jpg", "category_name": "cat", "segmentation": []}]
    )
    assert metrics["per_class"]["cat"] == pytest.approx(100.0)


def test_files_that_are_not_coco_give_clear_errors(tmp_path):
    gt_file = write_json(tmp_path / "gt.json", tiny_gt([{"image_id": 1, "category_id": 1, "bbox": box(1, 1, 9, 9)}]))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match=re.escape("broken.json is not valid JSON")):
        evaluate_files(gt_file, tmp_path / "broken.json")
    with pytest.raises(DataError, match="is a COCO dataset dict; a results file is a plain JSON list"):
        evaluate_files(gt_file, gt_file)
    with pytest.raises(DataError, match="predictions file not found"):
        evaluate_files(gt_file, tmp_path / "missing.json")
    with pytest.raises(DataError, match="the COCO key 'categories' is missing or not a list"):
        COCOEvaluator(write_json(tmp_path / "nocats.json", {"images": [{"id": 1}], "annotations": []}))
    bad_ann = tiny_gt([{"image_id": 9, "category_id": 1, "bbox": box(1, 1, 9, 9)}])
    with pytest.raises(
        DataError, match=r"annotations of image ids that are not in 'images' \(first: annotation 1 -> image_id 9\)"
    ):
        COCOEvaluator(write_json(tmp_path / "badann.json", bad_ann))


def test_ground_truth_follows_the_training_loaders_rules(tmp_path, caplog):
    """The same file gives the same errors and the same dropped boxes to training and evaluation."""
    from detkit.data.coco import load_coco_json

    gt = tiny_gt(
        [
            {"image_id": 1, "category_id": 1, "bbox": box(10, 10, 50, 50)},
            {"image_id": 1, "category_id": 1, "bbox": [5, 5, -3, 10]},  # negative width
            {"image_id": 1, "category_id": 1, "bbox": [5, 5, float("nan"), 10]},
        ],
        n_images=2,
    )
    path = write_json(tmp_path / "gt.json", gt)
    with caplog.at_level(logging.WARNING, logger="detkit"):
        evaluator = COCOEvaluator(path, backend="pycocotools")
        train_view = load_coco_json(path, tmp_path, check_image_files=False)
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 2 and all("2 boxes with w or h <= 0 or non-finite values dropped" in m for m in drops)
    assert len(evaluator._gt_dataset["annotations"]) == 1 == train_view.report.num_boxes
    assert evaluator.evaluate([det(1, 1, box(10, 10, 50, 50), 0.9)])["AP"] == pytest.approx(100.0)

    gt["images"][1]["id"] = 1  # duplicate image id: an error for both, with the same text
    gt["annotations"][0]["category_id"] = 5
    path = write_json(tmp_path / "dup.json", gt)
    messages = []
    for load in (lambda: COCOEvaluator(path), lambda: load_coco_json(path, tmp_path, check_image_files=False)):
        with pytest.raises(DataError) as err:
            load()
        messages.append(str(err.value).split(": 2 problem(s)")[1])
    assert messages[0] == messages[1]
    assert "1 duplicate image ids (first: 1)" in messages[0] and "annotation 1 -> category_id 5" in messages[0]


def test_ground_truth_without_area_or_with_annotation_id_0_is_repaired(tmp_path, caplog):
    """pycocotools needs "area", and reads a match with annotation id 0 as "unmatched"."""
    gt = tiny_gt([{"image_id": 1, "category_id": 1, "bbox": box(10, 10, 50, 50)}])
    gt["annotations"][0]["id"] = 0
    del gt["annotations"][0]["area"]
    with caplog.at_level(logging.WARNING, logger="detkit"):
        evaluator = COCOEvaluator(write_json(tmp_path / "gt.json", gt), backend="pycocotools")
    assert "had no 'area'" in caplog.text and "renumbering" in caplog.text
    metrics = evaluator.evaluate([det(1, 1, box(10, 10, 50, 50), 0.5)])
    assert metrics["AP"] == pytest.approx(100.0) and metrics["APm"] == pytest.approx(100.0)


def test_backend_choice(monkeypatch):
    assert resolve_backend("pycocotools") == "pycocotools"
    assert resolve_backend("auto") == ("faster_coco_eval" if HAVE_FASTER else "pycocotools")
    with pytest.raises(ConfigError, match="not a backend"):
        resolve_backend("detectron2")
    monkeypatch.setattr(ev, "_backend_importable", lambda name: name == "pycocotools")
    assert resolve_backend("auto") == "pycocotools"
    with pytest.raises(ConfigError, match="faster-coco-eval does not import here"):
        resolve_backend("faster_coco_eval")


def test_pycocotools_prints_nothing(small_evaluator, capsys):
    small_evaluator.evaluate([det(1, 3, box(10, 10, 50, 50), 0.5)])
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------------------------
# Writing and printing
# --------------------------------------------------------------------------------------------


def test_metrics_json_has_the_documented_keys_and_null_for_undefined(small_evaluator, tmp_path):
    metrics = small_evaluator.evaluate([det(1, 3, box(10, 10, 50, 50), 0.5)])
    dump_metrics(metrics, tmp_path / "metrics.json")
    text = (tmp_path / "metrics.json").read_text()
    loaded = json.loads(text)
    assert list(loaded) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "per_class"]
    assert loaded["APs"] is None and "NaN" not in text
    assert loaded["per_class"] == {"cat": pytest.approx(100.0), "dog": 0.0}
    assert loaded["AP"] == pytest.approx(50.0)  # mean of cat 100 and dog 0


def test_format_metrics_shows_every_number_and_class():
    metrics = dict(zip(METRIC_KEYS, [41.123, 61.0, 44.5, 22.25, 45.0, float("nan"), 33.3, 52.1, 54.0]))
    metrics["per_class"] = {"person": 55.5, "bicycle": 30.25, "car": 40.0, "bus": float("nan")}
    text = format_metrics(metrics)
    for expected in ("41.123", "61.000", "22.250", "nan", "54.000", "person", "55.500", "bicycle", "30.250", "bus"):
        assert expected in text
    assert text.count("category") == 3  # one header row of 3 name/AP pairs
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[-2:]]
    assert rows == [["person", "55.500", "bicycle", "30.250", "car", "40.000"], ["bus", "nan", "", "", "", ""]]


# --------------------------------------------------------------------------------------------
# inference_on_dataset
# --------------------------------------------------------------------------------------------


class FixedDetector(torch.nn.Module):
    """Returns, for each image, detections derived from its padded size so they are checkable."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, images: ImageBatch):
        assert not self.training
        self.calls += 1
        out = []
        for h, w in images.original_sizes.tolist():
            out.append(
                {
                    "boxes": torch.tensor([[1.0, 2.0, w - 1.0, h - 2.0], [0.0, 0.0, 10.0, 5.0]]),
                    "scores": torch.tensor([0.9, 0.3]),
                    "labels": torch.tensor([1, 0]),
                }
            )
        return out


def fake_loader(image_ids, sizes, batch_size=2):
    for start in range(0, len(image_ids), batch_size):
        ids, hw = image_ids[start : start + batch_size], sizes[start : start + batch_size]
        tensors = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in hw]
        metas = [{"image_id": i, "file_name": f"{i}.jpg", "height": h, "width": w} for i, (h, w) in zip(ids, hw)]
        yield ImageBatch.from_tensors(tensors, 32, hw), [{}] * len(ids), metas


def test_inference_on_dataset_gives_coco_results_with_original_ids():
    model = FixedDetector().train()
    results = inference_on_dataset(
        model, fake_loader([30, 10, 20], [(40, 60), (50, 30), (64, 64)]), category_ids=[7, 11], device="cpu"
    )
    assert model.training  # mode restored
    assert [r["image_id"] for r in results] == [10, 10, 20, 20, 30, 30]  # sorted by image id
    assert results[0] == {
        "image_id": 10,
        "category_id": 11,
        "bbox": [1.0, 2.0, 28.0, 46.0],
        "score": pytest.approx(0.9),
    }
    assert results[1]["category_id"] == 7 and results[1]["bbox"] == [0.0, 0.0, 10.0, 5.0]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # Rank 0 sees images 1, 3 and 5; rank 1 sees 2, 4 and 5 again (a padded sampler would).
        shard = [[1, 3, 5], [2, 4, 5]][rank]
        results = inference_on_dataset(FixedDetector(), fake_loader(shard, [(32, 32)] * 3), [1, 2], "cpu")
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes import torch: ~10 s, more on busy cores
def test_inference_on_dataset_gathers_all_shards_to_rank_0(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1 == []
    assert [r["image_id"] for r in rank0] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # image 5 counted once
