"""Error analysis on hand-made cases: each TIDE type, its dAP computed by hand, the COCO analyze
curves against pycocotools' own precision arrays, and confusion-matrix counts."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from detkit.analysis.errors import (
    ANALYZE_TYPES,
    analyze_curves,
    analyze_errors,
    confusion_matrix,
    normalize_rows,
    tide_errors,
)
from detkit.engine.evaluator import check_predictions

CATEGORIES = [
    {"id": 1, "name": "cat", "supercategory": "animal"},
    {"id": 2, "name": "dog", "supercategory": "animal"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
]


def make_gt(objects, num_images=1):
    """objects: (image_id, category_id, [x, y, w, h]) tuples."""
    anns = [
        {
            "id": i + 1,
            "image_id": im,
            "category_id": c,
            "bbox": list(map(float, b)),
            "area": float(b[2] * b[3]),
            "iscrowd": 0,
        }
        for i, (im, c, b) in enumerate(objects)
    ]
    images = [{"id": i + 1, "width": 200, "height": 200, "file_name": f"{i + 1}.jpg"} for i in range(num_images)]
    return {"images": images, "categories": CATEGORIES, "annotations": anns}


def make_preds(gt, dets):
    """dets: (image_id, category_id, [x, y, w, h], score) tuples -> checked COCO results."""
    raw = [{"image_id": im, "category_id": c, "bbox": b, "score": s} for im, c, b, s in dets]
    return check_predictions(raw, [i["id"] for i in gt["images"]], [c["id"] for c in gt["categories"]])


BOX = [0, 0, 10, 10]


def kinds(result):
    return sorted(e.kind for e in result.errors)


def test_wrong_class_box_is_a_classification_error_worth_all_of_the_ap():
    gt = make_gt([(1, 1, BOX)])
    result = tide_errors(gt, make_preds(gt, [(1, 2, BOX, 0.9)]))
    assert kinds(result) == ["Cls"]  # the object is fixable, so it is not also a Miss
    assert result.ap == 0.0
    assert result.delta_ap["Cls"] == pytest.approx(100.0)
    assert all(result.delta_ap[k] == 0.0 for k in ("Loc", "Both", "Dupe", "Bkg", "Miss"))


def test_shifted_box_is_a_localisation_error():
    gt = make_gt([(1, 1, BOX)])
    result = tide_errors(gt, make_preds(gt, [(1, 1, [5, 0, 10, 10], 0.9)]))  # IoU 50 / 150 = 1/3
    assert kinds(result) == ["Loc"]
    assert result.delta_ap["Loc"] == pytest.approx(100.0)
    assert result.delta_ap["Cls"] == 0.0


def test_second_box_on_a_found_object_is_a_duplicate():
    # Two cats; TP (0.9), duplicate on the first cat (0.8), TP on the second (0.7).
    gt = make_gt([(1, 1, BOX), (1, 1, [50, 50, 10, 10])])
    result = tide_errors(
        gt, make_preds(gt, [(1, 1, BOX, 0.9), (1, 1, [1, 0, 10, 10], 0.8), (1, 1, [50, 50, 10, 10], 0.7)])
    )
    assert kinds(result) == ["Dupe"]
    # Precision envelope 1 up to recall .5 (51 of 101 points), then 2/3 (50 points).
    assert result.ap == pytest.approx((51 + 50 * 2 / 3) / 101 * 100)
    assert result.delta_ap["Dupe"] == pytest.approx(100 - (51 + 50 * 2 / 3) / 101 * 100)


def test_box_on_nothing_is_background_and_a_missed_object_is_miss():
    gt = make_gt([(1, 1, BOX), (1, 1, [100, 100, 20, 20])])
    # A background box above the TP; the second cat has no box at all.
    result = tide_errors(gt, make_preds(gt, [(1, 1, [50, 50, 10, 10], 0.9), (1, 1, BOX, 0.8)]))
    assert kinds(result) == ["Bkg", "Miss"]
    # FP then TP: envelope 0.5 up to recall .5 (51 points), 0 after.
    assert result.ap == pytest.approx(51 * 0.5 / 101 * 100)
    assert result.delta_ap["Bkg"] == pytest.approx(51 / 101 * 100 - 51 * 0.5 / 101 * 100)
    # Without the missed cat: one object, FP then TP -> precision 0.5 at every recall, AP 50.
    assert result.delta_ap["Miss"] == pytest.approx(50 - 51 * 0.5 / 101 * 100)
    assert result.recall == {1: 0.5}


def test_wrong_class_and_poorly_placed_is_both_and_an_empty_image_gives_background():
    gt = make_gt([(1, 1, BOX)], num_images=2)
    result = tide_errors(gt, make_preds(gt, [(1, 2, [5, 0, 10, 10], 0.9), (2, 3, BOX, 0.5)]))
    assert kinds(result) == ["Bkg", "Both", "Miss"]
    assert result.counts == {"Cls": 0, "Loc": 0, "Both": 1, "Dupe": 0, "Bkg": 1, "Miss": 1}


def test_only_the_best_scoring_fixable_error_becomes_the_true_positive():
    # Two wrong-class boxes on one dog-free cat: fixing Cls turns only the 0.9 one into a TP.
    gt = make_gt([(1, 1, BOX)])
    result = tide_errors(gt, make_preds(gt, [(1, 2, BOX, 0.9), (1, 3, BOX, 0.6)]))
    assert kinds(result) == ["Cls", "Cls"]
    assert result.delta_ap["Cls"] == pytest.approx(100.0)


def _pycocotools_precision(gt, preds):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{k: p[k] for k in ("image_id", "category_id", "bbox", "score")} for p in preds])
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"]  # (10, 101, K, 4, 3)


def _random_case(seed):
    rng = np.random.default_rng(seed)
    objects, dets = [], []
    for image_id in range(1, 7):
        for _ in range(rng.integers(0, 5)):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(4, 120, 2)
            c = int(rng.integers(1, 4))
            objects.append((image_id, c, [x, y, w, h]))
            for _ in range(rng.integers(0, 3)):
                jitter = rng.normal(0, 0.25, 4) * [w, h, w, h]
                dets.append(
                    (
                        image_id,
                        int(rng.integers(1, 4)) if rng.random() < 0.3 else c,
                        list(np.maximum([x, y, w, h] + jitter, [0, 0, 1, 1])),
                        float(rng.random()),
                    )
                )
        for _ in range(rng.integers(0, 3)):
            dets.append((image_id, int(rng.integers(1, 4)), list(rng.uniform(1, 100, 4)), float(rng.random())))
    gt = make_gt(objects, num_images=6)
    return gt, make_preds(gt, dets)


@pytest.mark.parametrize("seed", [0, 1])
def test_c75_and_c50_are_pycocotools_precision_at_those_ious(seed):
    gt, preds = _random_case(seed)
    curves = analyze_curves(gt, preds)
    reference = _pycocotools_precision(gt, preds)[:, :, :, :, -1]  # (10, R, K, A), maxDets 100
    for row, t in ((0, 5), (1, 0)):
        expected = np.where(reference[t] == -1, np.nan, reference[t])
        np.testing.assert_array_equal(curves.precision[row], expected)
    # Each further curve forgives more, so it never drops below the previous one.
    p = np.nan_to_num(curves.precision, nan=0.0)
    assert np.all(np.diff(p, axis=0) >= 0)


def test_sim_forgives_same_supercategory_confusions_and_oth_any_confusion():
    # A cat box on a dog (same supercategory) above a correct cat box, and the same on a car.
    for other, sim, oth in ((2, 100.0, 100.0), (3, 50.0, 100.0)):
        gt = make_gt([(1, 1, BOX), (1, other, [50, 50, 10, 10])])
        preds = make_preds(gt, [(1, 1, [50, 50, 10, 10], 0.9), (1, 1, BOX, 0.8)])
        areas = analyze_curves(gt, preds).areas_under(class_index=0)
        # C50: FP then TP -> precision 0.5 at every recall.
        assert areas["C50"] == pytest.approx(50.0)
        assert areas["Loc"] == pytest.approx(50.0)
        assert areas["Sim"] == pytest.approx(sim)
        assert areas["Oth"] == pytest.approx(oth)
        assert areas["BG"] == pytest.approx(100.0) and areas["FN"] == pytest.approx(100.0)
    assert ANALYZE_TYPES == ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")


def test_confusion_matrix_counts():
    gt = make_gt([(1, 1, BOX), (1, 2, [50, 50, 10, 10]), (1, 3, [100, 100, 10, 10]), (1, 3, [150, 150, 10, 10])])
    preds = make_preds(
        gt,
        [
            (1, 1, BOX, 0.9),  # cat on cat
            (1, 1, [1, 0, 10, 10], 0.8),  # a second cat box on the cat -> background row
            (1, 1, [50, 50, 10, 10], 0.7),  # cat on dog
            (1, 3, [100, 101, 10, 10], 0.6),  # car on car
            (1, 2, [30, 30, 5, 5], 0.5),  # dog on nothing
            (1, 3, [150, 150, 10, 10], 0.2),  # below the score threshold: the car counts as missed
        ],
    )
    matrix = confusion_matrix(gt, preds, [1, 2, 3], iou_threshold=0.5, score_threshold=0.3)
    expected = np.array(
        [
            [1, 0, 0, 0],  # cat: found as cat
            [1, 0, 0, 0],  # dog: found as cat
            [0, 0, 1, 1],  # car: one found, one missed
            [1, 1, 0, 0],  # background: the duplicate cat, the dog on nothing
        ]
    )
    np.testing.assert_array_equal(matrix, expected)
    np.testing.assert_allclose(normalize_rows(matrix)[2], [0, 0, 0.5, 0.5])


def test_analyze_errors_per_class_table_is_sorted_worst_first_and_matches_tide_recall():
    gt = make_gt([(1, 1, BOX), (1, 3, [100, 100, 10, 10]), (1, 3, [150, 150, 10, 10])])
    preds = make_preds(gt, [(1, 1, BOX, 0.9), (1, 3, [100, 100, 10, 10], 0.8)])
    report = analyze_errors(gt, preds)
    names = [r["name"] for r in report.per_class]
    assert names == ["car", "cat", "dog"]  # dog has no objects: AP undefined, last
    car = report.per_class[0]
    assert car["objects"] == 2 and car["detections"] == 1
    assert car["AP50"] == pytest.approx(51 / 101 * 100)
    assert car["recall@0.5"] == pytest.approx(50.0) and car["AR100"] == pytest.approx(50.0)
    assert report.per_class[1]["AP"] == pytest.approx(100.0)
    assert np.isnan(report.per_class[2]["AP"])
    assert report.class_names == ["cat", "dog", "car"]
