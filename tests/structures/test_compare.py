"""diff_detections (detkit/structures/compare.py): rank by rank, and matched by IoU and label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detkit.engine.predictor import Detections
from detkit.structures.compare import diff_detections

BOXES = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 0, 60, 30]], np.float32)
SCORES = np.array([0.9, 0.8, 0.7], np.float32)
LABELS = np.array([1, 0, 1], np.int64)


def test_the_same_detections_in_order_differ_by_the_rounding_only():
    moved = BOXES + np.float32(0.25)
    diff = diff_detections(
        {"boxes": BOXES, "scores": SCORES, "labels": LABELS},
        Detections(boxes=moved, scores=SCORES - np.float32(0.5), labels=LABELS, class_names=[]),
    )
    assert diff["same"] and diff["reference"] == diff["candidate"] == 3
    assert diff["max_box_diff_px"] == 0.25 and diff["max_score_diff"] == pytest.approx(0.5)
    # Moved by 0.25 px both ways, the IoUs are 0.906 (10 x 10), 0.951 (20 x 20), 0.936 (10 x 30).
    assert diff["matched"] == 0 and diff["matched_max_box_diff_px"] == 0.0
    loose = diff_detections(
        {"boxes": BOXES, "scores": SCORES, "labels": LABELS},
        {"boxes": moved, "scores": SCORES, "labels": LABELS},
        iou_thresh=0.9,
    )
    assert loose["matched"] == 3 and loose["matched_max_box_diff_px"] == 0.25 and loose["matched_max_score_diff"] == 0.0
    assert (
        diff_detections(
            {"boxes": BOXES, "scores": SCORES, "labels": LABELS},
            {"boxes": moved, "scores": SCORES, "labels": LABELS},
            iou_thresh=0.95,
        )["matched"]
        == 1
    )


def test_reordered_detections_are_not_the_same_but_all_match():
    order = [2, 0, 1]
    diff = diff_detections(
        {"boxes": torch.from_numpy(BOXES), "scores": torch.from_numpy(SCORES), "labels": torch.from_numpy(LABELS)},
        {"boxes": BOXES[order], "scores": SCORES[order], "labels": LABELS[order]},
    )
    assert not diff["same"] and diff["max_box_diff_px"] is None and diff["max_score_diff"] is None
    assert diff["matched"] == 3 and diff["matched_max_box_diff_px"] == 0.0 and diff["matched_max_score_diff"] == 0.0


def test_another_label_never_matches_and_empty_sets_are_the_same():
    relabelled = {"boxes": BOXES, "scores": SCORES, "labels": np.array([1, 2, 1], np.int64)}
    diff = diff_detections({"boxes": BOXES, "scores": SCORES, "labels": LABELS}, relabelled)
    assert not diff["same"] and diff["matched"] == 2
    empty = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int64)}
    diff = diff_detections(empty, empty)
    assert diff["same"] and diff["max_box_diff_px"] == 0.0 and diff["matched"] == 0
    assert diff_detections(empty, relabelled)["candidate"] == 3 and not diff_detections(empty, relabelled)["same"]
