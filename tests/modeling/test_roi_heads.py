"""Res5ROIHeads: RoIAlign crops, proposal labelling and sampling, losses by hand, and inference
post-processing (thresholds, class-wise NMS, top-k, clipping, rescaling) against a slow reference."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, roi_align

from detkit.modeling.backbone import build_res5
from detkit.modeling.roi_heads import Res5ROIHeads
from detkit.structures.boxes import BoxCoder


def tiny_heads(num_classes=3, res5=None, res5_out_channels=8, **kwargs) -> Res5ROIHeads:
    """Heads with a one-conv 'res5' (C4 = 4 -> C5 = 8, stride 2) unless one is given."""
    if res5 is None:
        res5 = nn.Sequential(nn.Conv2d(4, res5_out_channels, 3, stride=2, padding=1))
    return Res5ROIHeads(res5=res5, res5_out_channels=res5_out_channels, num_classes=num_classes, **kwargs)


def logits_from_probs(probs) -> torch.Tensor:
    """Class logits whose softmax is `probs` (rows summing to 1, background last)."""
    return torch.tensor(probs, dtype=torch.float32).log()


# ------------------------------------------------------------------------------------ features


def test_box_features_crop_14x14_then_res5_7x7():
    res5, c5 = build_res5(depth=18)
    heads = tiny_heads(res5=res5.eval(), res5_out_channels=c5)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 256, 8, 10, generator=g)
    rois = torch.tensor([[0.0, 0.0, 64.0, 64.0], [16.0, 8.0, 100.0, 120.0], [5.0, 5.0, 30.0, 20.0]])
    roi_image_idx = torch.tensor([0, 1, 1])
    seen = {}
    heads.res5.register_forward_hook(lambda module, inputs, output: seen.update(crops=inputs[0], out=output))
    with torch.no_grad():
        pooled = heads.box_features(features, rois, roi_image_idx)
    assert seen["crops"].shape == (3, 256, 14, 14)
    assert seen["out"].shape == (3, 512, 7, 7)
    assert pooled.shape == (3, 512)
    expected_crops = roi_align(
        features,
        torch.cat((roi_image_idx[:, None].float(), rois), 1),
        output_size=14,
        spatial_scale=1 / 16,
        sampling_ratio=0,
        aligned=True,
    )
    torch.testing.assert_close(seen["crops"], expected_crops)
    torch.testing.assert_close(pooled, seen["out"].mean(dim=(2, 3)))


def test_roi_align_by_hand_aligned_stride_16():
    """Channel 0 of the map = column index, channel 1 = row index (+ 100 in image 1). With
    aligned=True and scale 1/16, the RoI [0, 0, 224, 224] covers map coordinates -0.5 .. 13.5, so
    bin (i, j) has its centre on map cell (i, j) and, the map being linear, the crop is exact."""
    heads = tiny_heads(res5=nn.Identity(), res5_out_channels=4)
    cols = torch.arange(16, dtype=torch.float32)[None, :].expand(16, 16)
    rows = torch.arange(16, dtype=torch.float32)[:, None].expand(16, 16)
    features = torch.stack([torch.stack((cols, rows, cols, rows)), torch.stack((cols, rows + 100, cols, rows))])
    seen = {}
    heads.res5.register_forward_hook(lambda module, inputs, output: seen.update(crops=inputs[0]))
    heads.box_features(features, torch.tensor([[0.0, 0.0, 224.0, 224.0]] * 2), torch.tensor([0, 1]))
    crops = seen["crops"]
    grid = torch.arange(14, dtype=torch.float32)
    torch.testing.assert_close(crops[0, 0], grid[None, :].expand(14, 14))
    torch.testing.assert_close(crops[0, 1], grid[:, None].expand(14, 14))
    torch.testing.assert_close(crops[1, 1], grid[:, None].expand(14, 14) + 100)  # image index respected


# ------------------------------------------------------------------------------------ sampling


def test_label_and_sample_proposals_by_hand():
    heads = tiny_heads(num_classes=3)
    # Image 0: GT [0,0,100,100] of class 2. Proposals: IoU exactly 0.5 (foreground), 0.49
    # (background), 0 (background), and an invalid slot that overlaps perfectly but must be ignored.
    proposals = torch.tensor(
        [
            [[0.0, 0.0, 50.0, 100.0], [0.0, 0.0, 49.0, 100.0], [200.0, 200.0, 300.0, 300.0], [0.0, 0.0, 100.0, 100.0]],
            [[10.0, 10.0, 40.0, 40.0], [50.0, 50.0, 90.0, 90.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    proposals_valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    gt_boxes = torch.tensor([[[0.0, 0.0, 100.0, 100.0]], [[0.0, 0.0, 0.0, 0.0]]])
    gt_labels = torch.tensor([[2], [0]])
    gt_valid = torch.tensor([[True], [False]])  # image 1 has no GT
    rois, roi_image_idx, roi_classes, roi_gt_boxes = heads.label_and_sample_proposals(
        proposals, proposals_valid, gt_boxes, gt_labels, gt_valid
    )
    # Everything fits the budgets, so every valid candidate is sampled, in (image, slot) order; the
    # GT box is appended after image 0's proposals.
    assert roi_image_idx.tolist() == [0, 0, 0, 0, 1, 1]
    torch.testing.assert_close(
        rois,
        torch.tensor(
            [
                [0.0, 0.0, 50.0, 100.0],
                [0.0, 0.0, 49.0, 100.0],
                [200.0, 200.0, 300.0, 300.0],
                [0.0, 0.0, 100.0, 100.0],  # the appended GT box
                [10.0, 10.0, 40.0, 40.0],
                [50.0, 50.0, 90.0, 90.0],
            ]
        ),
    )
    assert roi_classes.tolist() == [2, 3, 3, 2, 3, 3]  # background = K = 3; no-GT image all background
    torch.testing.assert_close(roi_gt_boxes[[0, 3]], torch.tensor([[0.0, 0.0, 100.0, 100.0]] * 2))


def test_sampling_budgets_512_with_25_percent_foreground():
    heads = tiny_heads(num_classes=3)
    g = torch.Generator().manual_seed(1)
    gt = torch.tensor([20.0, 20.0, 120.0, 120.0])
    # 600 foreground proposals (GT shifted by < 10 px: IoU > 0.6) and 1400 far-away background ones.
    fg = gt + (torch.rand(600, 4, generator=g) - 0.5) * 10
    corner = 300 + torch.rand(1400, 2, generator=g) * 200
    bg = torch.cat((corner, corner + 50), dim=1)
    image0 = torch.cat((fg, bg))
    # Image 1: 50 foreground + 1400 background proposals, then 550 invalid (zero) slots.
    image1 = torch.cat((fg[:50], bg, torch.zeros(550, 4)))
    proposals = torch.stack((image0, image1))
    valid = torch.ones(2, 2000, dtype=torch.bool)
    valid[1, 1450:] = False
    gt_boxes = gt.expand(2, 1, 4).clone()
    rois, roi_image_idx, roi_classes, _ = heads.label_and_sample_proposals(
        proposals, valid, gt_boxes, torch.tensor([[1], [1]]), torch.ones(2, 1, dtype=torch.bool)
    )
    for image, (want_fg, want_bg) in enumerate([(128, 384), (51, 461)]):  # image 1: 50 + the GT box
        classes = roi_classes[roi_image_idx == image]
        assert int((classes == 1).sum()) == want_fg
        assert int((classes == 3).sum()) == want_bg
        assert classes.numel() == 512
    # Invalid proposal slots are never sampled.
    assert not (rois[roi_image_idx == 1] == 0).all(dim=1).any()


# ------------------------------------------------------------------------------------ losses


def test_losses_by_hand():
    heads = tiny_heads(num_classes=2)
    rois = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 70.0]])
    roi_classes = torch.tensor([1, 2])  # a class-1 foreground RoI and a background one
    roi_gt_boxes = torch.tensor([[1.0, 1.0, 11.0, 11.0], [0.0, 0.0, 0.0, 0.0]])
    cls_logits = torch.tensor([[0.2, 1.0, -0.5], [0.3, 0.1, 2.0]])
    # Target of RoI 0 with weights (10, 10, 5, 5): dx = 10 * 1/10 = 1, dy = 1, dw = dh = 0.
    # Its class-1 deltas (columns 4..7) are (0.5, 1.5, 0.2, -0.1): L1 = 0.5 + 0.5 + 0.2 + 0.1 = 1.3.
    # Class-0 deltas and the background RoI's deltas must not count, however large.
    box_deltas = torch.tensor(
        [[9.0, 9.0, 9.0, 9.0, 0.5, 1.5, 0.2, -0.1], [50.0, -50.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0]]
    )
    losses = heads.losses(cls_logits, box_deltas, rois, roi_classes, roi_gt_boxes)

    def cross_entropy(row, label):
        return -row[label] + math.log(sum(math.exp(v) for v in row))

    expected_cls = (cross_entropy([0.2, 1.0, -0.5], 1) + cross_entropy([0.3, 0.1, 2.0], 2)) / 2
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(expected_cls))
    torch.testing.assert_close(losses["loss_box_reg"], torch.tensor(1.3 / 2))  # sum over fg / all R


def test_losses_class_agnostic_regression():
    heads = tiny_heads(num_classes=2, cls_agnostic_bbox_reg=True)
    assert heads.box_predictor.bbox_pred.out_features == 4
    losses = heads.losses(
        torch.zeros(2, 3),
        torch.tensor([[0.5, 1.5, 0.2, -0.1], [7.0, 7.0, 7.0, 7.0]]),
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 70.0]]),
        torch.tensor([0, 2]),
        torch.tensor([[1.0, 1.0, 11.0, 11.0], [0.0, 0.0, 0.0, 0.0]]),
    )
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(math.log(3.0)))
    torch.testing.assert_close(losses["loss_box_reg"], torch.tensor(1.3 / 2))


def test_training_forward_without_gt_has_zero_box_loss():
    heads = tiny_heads(num_classes=3, batch_size_per_image=16).train()
    g = torch.Generator().manual_seed(2)
    features = torch.randn(1, 4, 6, 6, generator=g)
    xy = torch.rand(1, 20, 2, generator=g) * 60
    proposals = torch.cat((xy, xy + 10 + torch.rand(1, 20, 2, generator=g) * 20), dim=-1)
    losses = heads(
        features,
        proposals,
        torch.ones(1, 20, dtype=torch.bool),
        torch.tensor([[96, 96]]),
        gt_boxes=torch.zeros(1, 1, 4),
        gt_labels=torch.zeros(1, 1, dtype=torch.int64),
        gt_valid=torch.zeros(1, 1, dtype=torch.bool),
    )
    assert losses["loss_box_reg"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in heads.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------ inference


def run_inference(heads, cls_logits, box_deltas, rois, roi_image_idx, image_sizes, original_sizes):
    return heads.inference(
        cls_logits,
        box_deltas,
        rois,
        torch.tensor(roi_image_idx),
        torch.tensor(image_sizes),
        torch.tensor(original_sizes),
    )


def test_inference_threshold_classwise_nms_and_background():
    heads = tiny_heads(num_classes=3)
    rois = torch.tensor(
        [[10.0, 10.0, 50.0, 50.0], [12.0, 12.0, 52.0, 52.0], [100.0, 100.0, 150.0, 150.0], [60.0, 0.0, 90.0, 30.0]]
    )
    probs = [
        [0.90, 0.02, 0.02, 0.06],  # class 0 at 0.9
        [0.50, 0.40, 0.04, 0.06],  # overlaps RoI 0 (IoU 0.82): class 0 suppressed, class 1 kept; 0.04 < 0.05
        [0.01, 0.01, 0.01, 0.97],  # background: nothing (and never label K)
        [0.06, 0.04, 0.03, 0.87],  # just above / below the 0.05 threshold
    ]
    (det,) = run_inference(
        heads, logits_from_probs(probs), torch.zeros(4, 12), rois, [0, 0, 0, 0], [[200, 200]], [[200, 200]]
    )
    assert det["labels"].dtype == torch.int64
    assert det["labels"].tolist() == [0, 1, 0]
    torch.testing.assert_close(det["scores"], torch.tensor([0.90, 0.40, 0.06]))
    torch.testing.assert_close(det["boxes"], rois[[0, 1, 3]])


def test_inference_keeps_top_k_per_image():
    heads = tiny_heads(num_classes=2, detections_per_image=100)
    # 300 disjoint 10 x 10 RoIs on a 20 x 15 grid, each scored for class 1 only, scores all distinct.
    ys, xs = torch.meshgrid(torch.arange(15) * 20.0, torch.arange(20) * 20.0, indexing="ij")
    rois = torch.stack((xs, ys, xs + 10, ys + 10), dim=-1).reshape(-1, 4)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(3))
    score = 0.1 + 0.8 * perm.float() / 300
    probs = torch.stack((torch.full((300,), 0.001), score, 0.999 - score), dim=1)
    (det,) = run_inference(heads, probs.log(), torch.zeros(300, 8), rois, [0] * 300, [[400, 600]], [[400, 600]])
    assert det["scores"].shape == (100,)
    top = score.argsort(descending=True)[:100]
    torch.testing.assert_close(det["scores"], score[top])
    torch.testing.assert_close(det["boxes"], rois[top])
    assert det["labels"].eq(1).all()


def test_inference_clips_to_the_image_then_rescales_to_the_original_size():
    heads = tiny_heads(num_classes=1)
    rois = torch.tensor([[550.0, 350.0, 600.0, 400.0], [100.0, 50.0, 200.0, 150.0]])
    # RoI 0 moves right by half its width (dx = 10 * 0.5 = 5) and leaves the 400 x 600 image:
    # [575, 350, 625, 400] is clipped to [575, 350, 600, 400]. RoI 1 stays.
    deltas = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    probs = [[0.8, 0.2], [0.7, 0.3]]
    (det,) = run_inference(heads, logits_from_probs(probs), deltas, rois, [0, 0], [[400, 600]], [[800, 1200]])
    # image 400 x 600 -> original 800 x 1200: every coordinate doubles.
    torch.testing.assert_close(
        det["boxes"], torch.tensor([[1150.0, 700.0, 1200.0, 800.0], [200.0, 100.0, 400.0, 300.0]])
    )
    torch.testing.assert_close(det["scores"], torch.tensor([0.8, 0.7]))


def test_inference_drops_boxes_left_empty_after_clipping():
    heads = tiny_heads(num_classes=1)
    rois = torch.tensor([[550.0, 350.0, 600.0, 400.0]])
    deltas = torch.tensor([[10.0, 0.0, 0.0, 0.0]])  # moves one full width right: entirely outside
    (det,) = run_inference(heads, logits_from_probs([[0.9, 0.1]]), deltas, rois, [0], [[400, 600]], [[400, 600]])
    assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,) and det["labels"].shape == (0,)


def slow_inference(
    cls_logits,
    box_deltas,
    rois,
    roi_image_idx,
    image_sizes,
    original_sizes,
    num_classes,
    score_thresh,
    nms_thresh,
    top_k,
):
    """Per image, per class, per RoI: the textbook post-processing."""
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    results = []
    for image in range(len(image_sizes)):
        h, w = image_sizes[image]
        oh, ow = original_sizes[image]
        candidates = []  # (score, class, box)
        for c in range(num_classes):
            boxes, scores = [], []
            for r in range(rois.shape[0]):
                if roi_image_idx[r] != image:
                    continue
                prob = F.softmax(cls_logits[r], dim=0)[c].item()
                if prob <= score_thresh:
                    continue
                x1, y1, x2, y2 = coder.decode(box_deltas[r : r + 1, 4 * c : 4 * c + 4], rois[r : r + 1])[0].tolist()
                boxes.append([min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)])
                scores.append(prob)
            if boxes:
                for k in nms(torch.tensor(boxes), torch.tensor(scores), nms_thresh).tolist():
                    candidates.append((scores[k], c, boxes[k]))
        candidates.sort(key=lambda item: -item[0])
        kept = []
        for score, c, (x1, y1, x2, y2) in candidates[:top_k]:
            sx, sy = ow / w, oh / h
            box = [
                min(max(x1 * sx, 0), ow),
                min(max(y1 * sy, 0), oh),
                min(max(x2 * sx, 0), ow),
                min(max(y2 * sy, 0), oh),
            ]
            if box[2] > box[0] and box[3] > box[1]:
                kept.append((score, c, box))
        results.append(kept)
    return results


def test_inference_equals_slow_per_image_reference():
    num_classes, top_k = 4, 12
    heads = tiny_heads(num_classes=num_classes, detections_per_image=top_k)
    g = torch.Generator().manual_seed(4)
    image_sizes = [[120, 160], [100, 100], [90, 140]]
    original_sizes = [[240, 320], [150, 150], [90, 140]]
    counts = [30, 0, 25]  # image 1 has no RoI at all
    roi_image_idx = [i for i, n in enumerate(counts) for _ in range(n)]
    num_rois = len(roi_image_idx)
    xy = torch.rand(num_rois, 2, generator=g) * 100
    rois = torch.cat((xy, xy + 10 + torch.rand(num_rois, 2, generator=g) * 40), dim=1)
    cls_logits = 2.0 * torch.randn(num_rois, num_classes + 1, generator=g)
    box_deltas = torch.randn(num_rois, 4 * num_classes, generator=g)
    got = run_inference(heads, cls_logits, box_deltas, rois, roi_image_idx, image_sizes, original_sizes)
    expected = slow_inference(
        cls_logits, box_deltas, rois, roi_image_idx, image_sizes, original_sizes, num_classes, 0.05, 0.5, top_k
    )
    assert len(got) == 3
    for image in range(3):
        want = expected[image]
        assert got[image]["boxes"].shape == (len(want), 4)
        if not want:
            continue
        torch.testing.assert_close(got[image]["scores"], torch.tensor([s for s, _, _ in want]))
        assert got[image]["labels"].tolist() == [c for _, c, _ in want]
        torch.testing.assert_close(got[image]["boxes"], torch.tensor([b for _, _, b in want]), rtol=0, atol=1e-3)
    assert len(expected[0]) == top_k and len(expected[1]) == 0 and len(expected[2]) > 0


def test_inference_without_any_proposal_gives_empty_detections():
    """No valid proposal in any image (R = 0) must give empty, well-typed results, not a reshape error."""
    heads = tiny_heads(num_classes=3).eval()
    features = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = heads(
            features, torch.zeros(2, 5, 4), torch.zeros(2, 5, dtype=torch.bool), torch.tensor([[96, 96], [80, 90]])
        )
    assert len(out) == 2
    for det in out:
        assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,) and det["labels"].shape == (0,)
        assert det["labels"].dtype == torch.int64


def test_training_without_any_roi_gives_zero_losses():
    """No valid proposal and no GT (R = 0): both losses 0, and backward still works."""
    heads = tiny_heads(num_classes=3).train()
    features = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    losses = heads(
        features,
        torch.zeros(1, 5, 4),
        torch.zeros(1, 5, dtype=torch.bool),
        torch.tensor([[96, 96]]),
        gt_boxes=torch.zeros(1, 1, 4),
        gt_labels=torch.zeros(1, 1, dtype=torch.int64),
        gt_valid=torch.zeros(1, 1, dtype=torch.bool),
    )
    assert losses["loss_cls"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    sum(losses.values()).backward()
