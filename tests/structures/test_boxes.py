"""Box coder, clipping, IoU and the padded-target helpers of detkit.structures.boxes.

Each batched helper is compared with a slow per-image / per-element loop or with torchvision, and
the coder with values worked out by hand.
"""

import math

import pytest
import torch
from torchvision.ops import box_iou

from detkit.structures.boxes import (
    DEFAULT_SCALE_CLAMP,
    BoxCoder,
    batched_box_iou,
    box_area,
    clip_boxes,
    nonempty_mask,
    pad_targets,
    rank_within_groups,
)


def random_boxes(n: int, generator: torch.Generator, max_xy: float = 200.0, min_side: float = 1.0) -> torch.Tensor:
    """(n, 4) xyxy boxes with both sides at least `min_side`."""
    xy = torch.rand(n, 2, generator=generator) * max_xy
    wh = min_side + torch.rand(n, 2, generator=generator) * max_xy / 2
    return torch.cat((xy, xy + wh), dim=1)


# ------------------------------------------------------------------------------------ BoxCoder


def test_default_scale_clamp_is_log_1000_over_16():
    assert DEFAULT_SCALE_CLAMP == pytest.approx(math.log(1000.0 / 16))
    assert BoxCoder((1, 1, 1, 1)).scale_clamp == DEFAULT_SCALE_CLAMP


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_inverts_encode_on_random_boxes(weights):
    g = torch.Generator().manual_seed(0)
    # Sides 5..105: size ratios stay below the 1000/16 clamp, so decoding inverts encoding exactly.
    reference = random_boxes(500, g, min_side=5.0)
    target = random_boxes(500, g, min_side=5.0)
    coder = BoxCoder(weights)
    deltas = coder.encode(reference, target)
    assert deltas.shape == (500, 4)
    torch.testing.assert_close(coder.decode(deltas, reference), target, rtol=0, atol=1e-3)


def test_encode_by_hand():
    # reference: centre (5, 10), size 10 x 20; target: centre (6, 14), size 20 x 20.
    reference = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    target = torch.tensor([[-4.0, 4.0, 16.0, 24.0]])
    expected = torch.tensor([[1.0 / 10, 4.0 / 20, math.log(2.0), 0.0]])
    torch.testing.assert_close(BoxCoder((1, 1, 1, 1)).encode(reference, target), expected)
    # Weights multiply each component: (10, 10, 5, 5).
    torch.testing.assert_close(
        BoxCoder((10, 10, 5, 5)).encode(reference, target), expected * torch.tensor([10.0, 10.0, 5.0, 5.0])
    )


def test_decode_by_hand():
    # box centre (5, 10), size 10 x 20; dx 0.1 -> centre x + 1; dy 0.2 -> centre y + 4;
    # dw log 2 -> width 20; dh 0 -> height 20.  Result centre (6, 14), 20 x 20.
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    expected = torch.tensor([[-4.0, 4.0, 16.0, 24.0]])
    got = BoxCoder((1, 1, 1, 1)).decode(torch.tensor([[0.1, 0.2, math.log(2.0), 0.0]]), box)
    torch.testing.assert_close(got, expected)
    # The same box from deltas scaled by the second-stage weights (10, 10, 5, 5).
    got = BoxCoder((10, 10, 5, 5)).decode(torch.tensor([[1.0, 2.0, 5 * math.log(2.0), 0.0]]), box)
    torch.testing.assert_close(got, expected)


def test_decode_clamps_dw_dh_at_log_1000_over_16():
    # A 16 x 16 box can grow to at most 1000 x 1000, however large dw / dh are.
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    deltas = torch.tensor([[0.0, 0.0, 10.0, 50.0]])
    got = BoxCoder((1, 1, 1, 1)).decode(deltas, box)
    torch.testing.assert_close(got, torch.tensor([[8.0 - 500.0, 8.0 - 500.0, 8.0 + 500.0, 8.0 + 500.0]]))
    # The clamp applies after dividing by the weights: dw 5 * 10 / ww 5 = 10 -> clamped too.
    got = BoxCoder((10, 10, 5, 5)).decode(torch.tensor([[0.0, 0.0, 50.0, 1e4]]), box)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]))
    # Below the clamp nothing changes: dw = log(2) doubles the width.
    got = BoxCoder((1, 1, 1, 1)).decode(torch.tensor([[0.0, 0.0, math.log(2.0), -math.log(2.0)]]), box)
    torch.testing.assert_close(got, torch.tensor([[-8.0, 4.0, 24.0, 12.0]]))


def test_decode_multiclass_layout_is_class_major_xyxy():
    """(R, 4k) deltas: columns 4c..4c+3 are class c's (dx, dy, dw, dh) and give class c's xyxy box."""
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(7, g)
    deltas = torch.randn(7, 4 * 3, generator=g)
    coder = BoxCoder((10, 10, 5, 5))
    decoded = coder.decode(deltas, boxes)
    assert decoded.shape == (7, 12)
    for c in range(3):
        torch.testing.assert_close(decoded[:, 4 * c : 4 * c + 4], coder.decode(deltas[:, 4 * c : 4 * c + 4], boxes))
    # By hand: class 0 zero deltas -> the box itself, class 1 shifts x by one width.
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    two_classes = torch.tensor([[0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(
        coder.decode(two_classes, box), torch.tensor([[0.0, 0.0, 10.0, 20.0, 10.0, 0.0, 20.0, 20.0]])
    )


def test_decode_returns_fp32_for_half_deltas():
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    got = BoxCoder((1, 1, 1, 1)).decode(torch.zeros(1, 4, dtype=torch.float16), box)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, box)


def test_box_coder_needs_four_weights():
    with pytest.raises(ValueError, match="4 weights"):
        BoxCoder((1.0, 1.0))


# ------------------------------------------------------------------------------------ helpers


def test_clip_boxes_by_hand():
    boxes = torch.tensor([[-5.0, -3.0, 120.0, 50.0], [10.0, 5.0, 20.0, 30.0], [150.0, 60.0, 160.0, 70.0]])
    sizes_hw = torch.tensor([[40, 100]]).expand(3, 2)
    expected = torch.tensor([[0.0, 0.0, 100.0, 40.0], [10.0, 5.0, 20.0, 30.0], [100.0, 40.0, 100.0, 40.0]])
    torch.testing.assert_close(clip_boxes(boxes, sizes_hw), expected)


def test_clip_boxes_batched_equals_per_image_loop():
    g = torch.Generator().manual_seed(2)
    boxes = torch.randn(3, 20, 4, generator=g) * 150 + 50  # many outside, some inverted
    sizes_hw = torch.tensor([[64, 80], [100, 30], [200, 200]])
    got = clip_boxes(boxes, sizes_hw[:, None, :])
    for i in range(3):
        h, w = sizes_hw[i].tolist()
        for m in range(20):
            x1, y1, x2, y2 = boxes[i, m].tolist()
            expected = [min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)]
            torch.testing.assert_close(got[i, m], torch.tensor(expected, dtype=torch.float32))


def test_box_area_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 5.0, 9.0]])
    torch.testing.assert_close(box_area(boxes), torch.tensor([200.0, 0.0]))


def test_nonempty_mask_by_hand():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],  # 1 x 1: kept
            [0.0, 0.0, 0.0, 1.0],  # zero width
            [0.0, 0.0, 1.0, 0.0],  # zero height
            [5.0, 5.0, 4.0, 9.0],  # inverted
            [0.0, 0.0, 2.5, 2.5],
        ]
    )
    assert nonempty_mask(boxes).tolist() == [True, False, False, False, True]
    # Sides must be strictly larger than the threshold.
    assert nonempty_mask(boxes, threshold=1.0).tolist() == [False, False, False, False, True]


def test_batched_box_iou_by_hand():
    a = torch.tensor([[[0.0, 0.0, 2.0, 2.0]]])
    b = torch.tensor([[[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(batched_box_iou(a, b), torch.tensor([[[1.0 / 7.0, 1.0, 0.0, 0.0]]]))
    # Two empty boxes: union 0 -> IoU 0, not nan.
    empty = torch.zeros(1, 1, 4)
    assert batched_box_iou(empty, empty).tolist() == [[[0.0]]]


def test_batched_box_iou_equals_torchvision_per_image():
    g = torch.Generator().manual_seed(3)
    boxes_a = random_boxes(3 * 6, g).view(3, 6, 4)
    boxes_b = random_boxes(3 * 40, g).view(3, 40, 4)
    got = batched_box_iou(boxes_a, boxes_b)
    assert got.shape == (3, 6, 40)
    assert (got > 0).any()
    for i in range(3):
        torch.testing.assert_close(got[i], box_iou(boxes_a[i], boxes_b[i]))


def test_rank_within_groups_equals_loop():
    g = torch.Generator().manual_seed(4)
    group_ids = torch.randint(0, 5, (300,), generator=g)
    expected, seen = [], {}
    for gid in group_ids.tolist():
        expected.append(seen.get(gid, 0))
        seen[gid] = seen.get(gid, 0) + 1
    assert rank_within_groups(group_ids).tolist() == expected
    assert rank_within_groups(torch.tensor([2, 0, 2, 2, 1, 0])).tolist() == [0, 0, 1, 2, 0, 1]
    assert rank_within_groups(torch.zeros(0, dtype=torch.int64)).tolist() == []


def test_pad_targets_with_empty_images():
    boxes = [
        torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]),
        torch.zeros(0, 4),
        torch.tensor([[0.0, 0.0, 9.0, 9.0]]),
    ]
    labels = [torch.tensor([3, 1]), torch.zeros(0, dtype=torch.int64), torch.tensor([2])]
    pad_boxes, pad_labels, valid = pad_targets(boxes, labels, torch.device("cpu"))
    assert pad_boxes.shape == (3, 2, 4) and pad_boxes.dtype == torch.float32
    assert pad_labels.shape == (3, 2) and pad_labels.dtype == torch.int64
    assert valid.tolist() == [[True, True], [False, False], [True, False]]
    torch.testing.assert_close(pad_boxes[0], boxes[0])
    torch.testing.assert_close(pad_boxes[2, 0], boxes[2][0])
    assert pad_labels.tolist() == [[3, 1], [0, 0], [2, 0]]
    assert (pad_boxes[1] == 0).all() and (pad_boxes[2, 1] == 0).all()


def test_pad_targets_all_images_empty_keeps_one_invalid_slot():
    pad_boxes, pad_labels, valid = pad_targets(
        [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.int64)] * 2, torch.device("cpu")
    )
    assert pad_boxes.shape == (2, 1, 4) and pad_labels.shape == (2, 1)
    assert not valid.any()
