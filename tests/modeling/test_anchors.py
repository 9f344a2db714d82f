"""Anchor values and layout, and that the RPN head's flattened outputs follow the same order."""

import math

import torch

from detkit.modeling.anchors import AnchorGenerator, cell_anchors
from detkit.modeling.rpn import RPNHead

SQRT2 = math.sqrt(2.0)


def test_cell_anchors_by_hand():
    anchors = cell_anchors([32], [0.5, 1.0, 2.0])
    # ratio = h / w and area 32**2: ratio 0.5 -> w = 32 * sqrt(2), h = 32 / sqrt(2); ratio 2 the other way.
    expected = torch.tensor(
        [
            [-16 * SQRT2, -8 * SQRT2, 16 * SQRT2, 8 * SQRT2],
            [-16.0, -16.0, 16.0, 16.0],
            [-8 * SQRT2, -16 * SQRT2, 8 * SQRT2, 16 * SQRT2],
        ]
    )
    torch.testing.assert_close(anchors, expected)
    # Detectron2's printed values for size 32, ratio 0.5.
    torch.testing.assert_close(anchors[0], torch.tensor([-22.6274, -11.3137, 22.6274, 11.3137]), atol=1e-4, rtol=0)


def test_cell_anchors_are_size_major_ratio_minor():
    sizes, ratios = [32, 64, 128, 256, 512], [0.5, 1.0, 2.0]
    anchors = cell_anchors(sizes, ratios)
    assert anchors.shape == (15, 4)
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    for a in range(15):
        size, ratio = sizes[a // 3], ratios[a % 3]
        assert math.isclose(widths[a].item() * heights[a].item(), size**2, rel_tol=1e-5)
        assert math.isclose(heights[a].item() / widths[a].item(), ratio, rel_tol=1e-5)
    # Centred at 0.
    torch.testing.assert_close(anchors[:, :2], -anchors[:, 2:])


def test_grid_anchor_count_is_h_w_a():
    gen = AnchorGenerator(sizes=[32, 64, 128, 256, 512], aspect_ratios=[0.5, 1.0, 2.0], stride=16)
    assert gen.num_anchors_per_location == 15
    assert gen((30, 40)).shape == (30 * 40 * 15, 4)
    assert gen((3, 5)).shape == (3 * 5 * 15, 4)


def test_grid_anchors_are_location_major():
    """Anchor (i * W + j) * A + a is cell anchor a shifted by (j * stride, i * stride)."""
    stride, height, width = 16, 3, 5
    gen = AnchorGenerator(sizes=[32, 64], aspect_ratios=[0.5, 1.0, 2.0], stride=stride)
    anchors = gen((height, width))
    cells = cell_anchors([32, 64], [0.5, 1.0, 2.0])
    num_a = cells.shape[0]
    for i in range(height):
        for j in range(width):
            for a in range(num_a):
                shift = torch.tensor([j * stride, i * stride, j * stride, i * stride], dtype=torch.float32)
                torch.testing.assert_close(anchors[(i * width + j) * num_a + a], cells[a] + shift)
    # The anchor of cell (0, 0) with size 32 ratio 1 is centred at (0, 0): offset 0, as in Detectron2.
    torch.testing.assert_close(anchors[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))


def test_grid_anchors_are_cached_per_size():
    gen = AnchorGenerator(sizes=[32], aspect_ratios=[1.0], stride=16)
    first = gen((4, 6))
    assert gen((4, 6)) is first
    assert gen((6, 4)).shape == (24, 4) and not torch.equal(gen((6, 4)), first)


def _identity_hidden_head(num_anchors: int, channels: int) -> RPNHead:
    """An RPN head whose 3x3 conv copies its input (ReLU keeps it: inputs are >= 0)."""
    head = RPNHead(channels, num_anchors)
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.bias.zero_()
        for c in range(channels):
            head.conv.weight[c, c, 1, 1] = 1.0
    return head


def test_rpn_head_flattened_outputs_follow_anchor_order():
    """Logit of anchor a at grid cell (i, j) = 100 i + 10 j + a; delta c of it = 1000 i + 100 j + 10 a + c.

    The flattened (N, M) logits and (N, M, 4) deltas must have them at index (i * W + j) * A + a.
    """
    num_a, height, width = 3, 4, 5
    head = _identity_hidden_head(num_a, channels=2)
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    features = torch.stack((rows, cols))[None]  # (1, 2, H, W): channel 0 = i, channel 1 = j
    with torch.no_grad():
        head.objectness_logits.weight.copy_(torch.tensor([[100.0, 10.0]] * num_a)[:, :, None, None])
        head.objectness_logits.bias.copy_(torch.arange(num_a, dtype=torch.float32))
        # Output channel a * 4 + c holds coordinate c of anchor a (Detectron2's layout).
        head.anchor_deltas.weight.copy_(torch.tensor([[1000.0, 100.0]] * (4 * num_a))[:, :, None, None])
        head.anchor_deltas.bias.copy_(torch.tensor([10.0 * a + c for a in range(num_a) for c in range(4)]))
        logits, deltas = head(features)
    assert logits.shape == (1, height * width * num_a)
    assert deltas.shape == (1, height * width * num_a, 4)
    for i in range(height):
        for j in range(width):
            for a in range(num_a):
                index = (i * width + j) * num_a + a
                assert logits[0, index].item() == 100 * i + 10 * j + a
                assert deltas[0, index].tolist() == [1000 * i + 100 * j + 10 * a + c for c in range(4)]


def test_rpn_head_logit_index_points_at_the_matching_anchor():
    """Light up one (cell, anchor) pair through the head and find it in the anchors by its index."""
    sizes, ratios, stride = [32, 64], [0.5, 1.0, 2.0], 16
    gen = AnchorGenerator(sizes=sizes, aspect_ratios=ratios, stride=stride)
    num_a, height, width = gen.num_anchors_per_location, 3, 4
    head = _identity_hidden_head(num_a, channels=1)
    target_i, target_j, target_a = 2, 1, 4  # size 64, ratio 1
    features = torch.zeros(1, 1, height, width)
    features[0, 0, target_i, target_j] = 1.0
    with torch.no_grad():
        head.objectness_logits.weight.zero_()
        head.objectness_logits.weight[target_a, 0, 0, 0] = 1.0
        head.objectness_logits.bias.zero_()
        logits, _ = head(features)
    best = int(logits[0].argmax())
    assert logits[0, best].item() == 1.0 and (logits[0] > 0).sum().item() == 1
    anchor = gen((height, width))[best]
    centre = ((anchor[0] + anchor[2]) / 2).item(), ((anchor[1] + anchor[3]) / 2).item()
    assert centre == (target_j * stride, target_i * stride)
    assert (anchor[2] - anchor[0]).item() == 64.0 and (anchor[3] - anchor[1]).item() == 64.0
