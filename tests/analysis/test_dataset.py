"""Dataset statistics and anchor coverage on boxes whose best anchor IoU is computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from detkit.analysis.dataset import anchor_coverage, best_anchor_iou, box_statistics, size_name
from detkit.modeling.anchors import AnchorGenerator

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}]


def make_gt(objects, image_hw=(100, 200), num_images=2):
    anns = [
        {
            "id": i + 1,
            "image_id": im,
            "category_id": c,
            "bbox": list(map(float, b)),
            "area": float(b[2] * b[3]),
            "iscrowd": crowd,
        }
        for i, (im, c, b, crowd) in enumerate(objects)
    ]
    images = [
        {"id": i + 1, "height": image_hw[0], "width": image_hw[1], "file_name": f"{i}.jpg"} for i in range(num_images)
    ]
    return {"images": images, "categories": CATEGORIES, "annotations": anns}


def test_box_statistics_counts_classes_sizes_and_skips_crowd():
    gt = make_gt(
        [(1, 1, [0, 0, 10, 20], 0), (1, 5, [0, 0, 40, 40], 0), (1, 5, [0, 0, 100, 100], 0), (1, 1, [0, 0, 50, 50], 1)]
    )
    stats = box_statistics(gt)
    np.testing.assert_array_equal(stats.boxes_per_image, [3, 0])
    np.testing.assert_array_equal(stats.class_counts, [1, 2])
    summary = stats.summary()
    assert summary["size_counts"] == {"small": 1, "medium": 1, "large": 1}
    assert summary["images_without_boxes"] == 1 and summary["class_counts"] == {"cat": 1, "dog": 2}
    assert size_name(32 * 32 - 1) == "small" and size_name(32 * 32) == "medium" and size_name(96 * 96) == "large"


def test_best_anchor_iou_by_hand():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 32.0, 32.0],  # a 32 anchor centred at (16, 16) is this box: IoU 1
            [8.0, 8.0, 40.0, 40.0],  # centre (24, 24) halfway between grid points: 24 x 24 overlap
            [16.0, 16.0, 80.0, 80.0],  # 64 x 64: the 32 anchor inside it covers a quarter
        ]
    )
    sizes_hw = torch.tensor([[96.0, 96.0]] * 3)
    best, which = best_anchor_iou(boxes, sizes_hw, sizes=[32], aspect_ratios=[1.0], stride=16)
    np.testing.assert_allclose(best.numpy(), [1.0, 576 / (1024 + 1024 - 576), 1024 / 4096])
    best, which = best_anchor_iou(boxes, sizes_hw, sizes=[32, 64], aspect_ratios=[1.0], stride=16)
    np.testing.assert_allclose(best.numpy()[2], 1.0)
    assert which.tolist() == [0, 0, 1]


def test_best_anchor_iou_equals_a_search_over_every_anchor_of_the_grid():
    gen = AnchorGenerator(sizes=[16, 32, 64], aspect_ratios=[0.5, 1.0, 2.0], stride=16)
    height, width = 80, 112
    all_anchors = gen((int(np.ceil(height / 16)), int(np.ceil(width / 16)))).double()  # (M, 4)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [width - 4, height - 4], (200, 2))
    wh = rng.uniform(4, 70, (200, 2))
    boxes = torch.tensor(np.concatenate([xy, np.minimum(xy + wh, [width, height])], axis=1))
    best, _ = best_anchor_iou(
        boxes,
        torch.tensor([[height, width]] * 200, dtype=torch.float64),
        sizes=[16, 32, 64],
        aspect_ratios=[0.5, 1.0, 2.0],
        stride=16,
    )
    exhaustive = box_iou(boxes, all_anchors).max(dim=1).values
    torch.testing.assert_close(best, exhaustive)


def test_anchor_coverage_resizes_like_the_test_transform_and_groups_by_class_and_size():
    # 100 x 200 images, short side 50: everything halves. A 64 x 64 box becomes 32 x 32 (covered by
    # the 32 anchor at IoU 1); a 20 x 20 box becomes 10 x 10 (IoU 100 / 1024 with the 32 anchor).
    gt = make_gt([(1, 1, [0, 0, 64, 64], 0), (2, 5, [100, 40, 20, 20], 0)])
    cov = anchor_coverage(gt, sizes=[32], aspect_ratios=[1.0], stride=16, min_size=50, max_size=1000)
    np.testing.assert_allclose(cov.boxes_xyxy, [[0, 0, 32, 32], [50, 20, 60, 30]])
    np.testing.assert_allclose(cov.best_iou, [1.0, 100 / 1024])
    assert cov.share_at(0.7) == 0.5 and cov.share_at(0.05) == 1.0
    rows = {r["group"]: r for r in cov.table()}
    assert rows["all"]["IoU>=0.7"] == pytest.approx(50.0)
    assert rows["cat"]["IoU>=0.3"] == 100.0 and rows["dog"]["IoU>=0.3"] == 0.0
    assert rows["size small"]["boxes"] == 1 and rows["size medium"]["boxes"] == 1
    assert np.isnan(rows["size large"]["IoU>=0.5"])
    np.testing.assert_allclose(cov.anchor_wh, [[32, 32]])
