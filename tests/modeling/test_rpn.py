"""RPN: proposals against a slow per-image reference, anchor labelling / sampling, and the losses
(normaliser, images without ground truth) on hand-computed cases."""

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, nms

from detkit.modeling.matcher import Matcher
from detkit.modeling.rpn import RPN
from detkit.structures.boxes import BoxCoder


def small_rpn(**kwargs) -> RPN:
    args = dict(
        in_channels=8,
        anchor_sizes=(32, 64),
        aspect_ratios=(0.5, 1.0, 2.0),
        anchor_stride=16,
        pre_nms_topk=(100, 60),
        post_nms_topk=(40, 25),
        nms_thresh=0.7,
    )
    args.update(kwargs)
    return RPN(**args)


def slow_proposals(anchors, logits, deltas, image_hw, pre_k, post_k, nms_thresh, min_size=0.0):
    """One image, step by step: top-k logits -> decode -> clip -> drop empty -> NMS -> top-k.

    Returns boxes (P, 4) sorted by logit, and how many boxes went into NMS.
    """
    top_logits, top_idx = logits.topk(min(pre_k, logits.numel()))
    boxes = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(deltas[top_idx], anchors[top_idx])
    h, w = image_hw
    kept_boxes, kept_scores = [], []
    for box, score in zip(boxes.tolist(), top_logits.tolist()):
        x1, y1, x2, y2 = (
            min(max(box[0], 0.0), w),
            min(max(box[1], 0.0), h),
            min(max(box[2], 0.0), w),
            min(max(box[3], 0.0), h),
        )
        if x2 - x1 > min_size and y2 - y1 > min_size:
            kept_boxes.append([x1, y1, x2, y2])
            kept_scores.append(score)
    kept_boxes, kept_scores = torch.tensor(kept_boxes), torch.tensor(kept_scores)
    keep = nms(kept_boxes, kept_scores, nms_thresh)[:post_k]
    return kept_boxes[keep], len(kept_scores)


def random_rpn_inputs(rpn: RPN, grid_hw, num_images, seed):
    g = torch.Generator().manual_seed(seed)
    anchors = rpn.anchor_generator(grid_hw)
    m = anchors.shape[0]
    logits = torch.randn(num_images, m, generator=g)
    deltas = 0.3 * torch.randn(num_images, m, 4, generator=g)
    return anchors, logits, deltas


def check_against_reference(rpn: RPN, image_sizes, seed, pre_k, post_k):
    anchors, logits, deltas = random_rpn_inputs(rpn, (8, 10), len(image_sizes), seed)  # padded 128 x 160
    proposals, valid = rpn.predict_proposals(anchors, logits, deltas, torch.tensor(image_sizes))
    assert proposals.shape == (len(image_sizes), post_k, 4) and valid.shape == (len(image_sizes), post_k)
    stats = []
    for i, hw in enumerate(image_sizes):
        expected, num_into_nms = slow_proposals(anchors, logits[i], deltas[i], hw, pre_k, post_k, rpn.nms_thresh)
        count = int(valid[i].sum())
        assert count == len(expected)
        # Valid slots first, in score order, identical boxes; invalid slots are zeros.
        assert valid[i, :count].all()
        torch.testing.assert_close(proposals[i, :count], expected, rtol=0, atol=1e-4)
        assert proposals[i, count:].eq(0).all()
        stats.append((num_into_nms, count))
    return stats


def test_test_mode_proposals_equal_per_image_reference():
    rpn = small_rpn().eval()
    stats = check_against_reference(rpn, [(128, 160), (100, 150), (64, 90)], seed=0, pre_k=60, post_k=25)
    # The case exercises every step: empty boxes dropped in the small image (60 in -> fewer into NMS),
    # and the post-NMS top-k cutting at least one image.
    assert stats[2][0] < 60
    assert any(count == 25 for _, count in stats)


def test_train_mode_uses_the_training_top_k():
    rpn = small_rpn().train()
    stats = check_against_reference(rpn, [(120, 160), (128, 100)], seed=1, pre_k=100, post_k=40)
    assert all(count <= 40 for _, count in stats)
    assert any(count == 40 for _, count in stats)


def test_nms_suppresses_and_post_nms_top_k_is_respected():
    rpn = small_rpn(post_nms_topk=(5, 5)).eval()
    anchors, logits, deltas = random_rpn_inputs(rpn, (8, 10), 2, seed=2)
    proposals, valid = rpn.predict_proposals(anchors, logits, deltas, torch.tensor([[128, 160], [128, 160]]))
    assert valid.sum(1).tolist() == [5, 5]
    for i in range(2):
        iou = box_iou(proposals[i], proposals[i])
        assert (iou.triu(diagonal=1) <= 0.7).all()  # survivors of NMS 0.7 overlap at most 0.7
        torch.testing.assert_close(
            proposals[i], slow_proposals(anchors, logits[i], deltas[i], (128, 160), 60, 5, 0.7)[0]
        )


def test_forward_returns_proposals_without_gradient():
    rpn = small_rpn().eval()
    features = torch.randn(2, 8, 4, 5, requires_grad=True)
    proposals, valid, losses = rpn(features, torch.tensor([[64, 80], [50, 70]]))
    assert losses == {}
    assert not proposals.requires_grad
    assert proposals.shape == (2, 25, 4) and valid.dtype == torch.bool
    # Proposals lie inside their own image.
    assert (proposals[1, valid[1]][:, [0, 2]] <= 70).all() and (proposals[1, valid[1]][:, [1, 3]] <= 50).all()


# ------------------------------------------------------------------------------------ training


def tiny_rpn(loss_weight=1.0) -> RPN:
    """One 32 x 32 anchor per location, stride 16; the head's outputs are just its biases when the
    features are zero: every logit 0.5, every delta (0.1, -0.2, 0.3, 0.4)."""
    rpn = RPN(in_channels=4, anchor_sizes=(32,), aspect_ratios=(1.0,), anchor_stride=16, loss_weight=loss_weight)
    with torch.no_grad():
        rpn.head.objectness_logits.bias.fill_(0.5)
        rpn.head.anchor_deltas.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.4]))
    return rpn.train()


def test_anchor_labels_by_hand():
    # 2 x 2 grid: anchors [-16,-16,16,16], [0,-16,32,16], [-16,0,16,32], [0,0,32,32].
    # GT [0,0,32,32]: IoU 1/7 (negative), 1/3, 1/3 (ignored), 1 (positive). Image 1 has no GT.
    rpn = tiny_rpn()
    anchors = rpn.anchor_generator((2, 2))
    torch.testing.assert_close(
        anchors,
        torch.tensor(
            [[-16.0, -16.0, 16.0, 16.0], [0.0, -16.0, 32.0, 16.0], [-16.0, 0.0, 16.0, 32.0], [0.0, 0.0, 32.0, 32.0]]
        ),
    )
    gt_boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0]], [[0.0, 0.0, 0.0, 0.0]]])
    gt_valid = torch.tensor([[True], [False]])
    labels, gt_deltas = rpn.label_and_sample_anchors(anchors, gt_boxes, gt_valid)
    assert labels.tolist() == [[0, -1, -1, 1], [0, 0, 0, 0]]
    assert gt_deltas[0, 3].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_losses_by_hand_normalised_by_batch_size_times_images():
    rpn = tiny_rpn()
    features = torch.zeros(2, 4, 2, 2)
    targets_boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0]], [[0.0, 0.0, 0.0, 0.0]]])
    _, _, losses = rpn(features, torch.tensor([[32, 32], [32, 32]]), targets_boxes, torch.tensor([[True], [False]]))
    normaliser = 256 * 2  # batch_size_per_image * N, not the number of sampled anchors (6)
    # Image 0: anchor 0 negative, anchor 3 positive; image 1: four negatives. BCE(x, 0) = softplus(x).
    softplus = F.softplus(torch.tensor(0.5)).item()
    softplus_neg = F.softplus(torch.tensor(-0.5)).item()
    expected_cls = (5 * softplus + softplus_neg) / normaliser
    expected_loc = (0.1 + 0.2 + 0.3 + 0.4) / normaliser  # L1 of the positive anchor; its target is 0
    torch.testing.assert_close(losses["loss_rpn_cls"], torch.tensor(expected_cls))
    torch.testing.assert_close(losses["loss_rpn_loc"], torch.tensor(expected_loc))
    # loss_weight multiplies both.
    _, _, doubled = tiny_rpn(loss_weight=2.0)(
        features, torch.tensor([[32, 32], [32, 32]]), targets_boxes, torch.tensor([[True], [False]])
    )
    torch.testing.assert_close(doubled["loss_rpn_cls"], torch.tensor(2 * expected_cls))
    torch.testing.assert_close(doubled["loss_rpn_loc"], torch.tensor(2 * expected_loc))


def test_image_without_gt_gives_zero_loc_loss_and_finite_cls_loss():
    rpn = small_rpn().train()
    features = torch.randn(1, 8, 6, 7, generator=torch.Generator().manual_seed(0))
    _, _, losses = rpn(features, torch.tensor([[96, 112]]), torch.zeros(1, 1, 4), torch.tensor([[False]]))
    assert losses["loss_rpn_loc"].item() == 0.0
    assert torch.isfinite(losses["loss_rpn_cls"]) and losses["loss_rpn_cls"].item() > 0
    (losses["loss_rpn_cls"] + losses["loss_rpn_loc"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in rpn.parameters() if p.grad is not None)
    # 6 * 7 * 6 = 252 anchors, fewer than the budget of 256: every one is a sampled negative.
    labels, _ = rpn.label_and_sample_anchors(
        rpn.anchor_generator((6, 7)), torch.zeros(1, 1, 4), torch.tensor([[False]])
    )
    assert labels.eq(0).all()


def test_anchor_sampling_budget_per_image():
    """64 anchors per image, at most half positive, on random GT: the counts follow the matcher."""
    rpn = small_rpn(anchor_sizes=(16, 32, 64), batch_size_per_image=64)
    g = torch.Generator().manual_seed(3)
    anchors = rpn.anchor_generator((10, 12))  # 10 * 12 * 9 = 1080 anchors
    xy = torch.rand(2, 4, 2, generator=g) * 120
    gt_boxes = torch.cat((xy, xy + 20 + torch.rand(2, 4, 2, generator=g) * 60), dim=-1)
    gt_valid = torch.tensor([[True, True, True, True], [True, False, False, False]])
    labels, gt_deltas = rpn.label_and_sample_anchors(anchors, gt_boxes, gt_valid)
    matcher = Matcher(low_threshold=0.3, high_threshold=0.7, allow_low_quality_matches=True)
    for i in range(2):
        valid_gt = gt_boxes[i, gt_valid[i]]
        iou = box_iou(valid_gt, anchors)[None]
        matched, match_labels = matcher(iou, torch.ones(1, valid_gt.shape[0], dtype=torch.bool))
        num_pos, num_neg = int((match_labels == 1).sum()), int((match_labels == 0).sum())
        assert int((labels[i] == 1).sum()) == min(num_pos, 32)
        assert int((labels[i] == 0).sum()) == min(num_neg, 64 - min(num_pos, 32))
        assert (match_labels[0][labels[i] == 1] == 1).all() and (match_labels[0][labels[i] == 0] == 0).all()
        # Regression targets of the positives encode their matched GT box.
        pos = labels[i] == 1
        expected = BoxCoder((1, 1, 1, 1)).encode(anchors[pos], valid_gt[matched[0][pos]])
        torch.testing.assert_close(gt_deltas[i][pos], expected)


def test_non_finite_boxes_and_logits_are_dropped():
    rpn = small_rpn().eval()
    anchors, logits, deltas = random_rpn_inputs(rpn, (8, 10), 1, seed=4)
    sizes = torch.tensor([[128, 160]])
    _, valid = rpn.predict_proposals(anchors, logits, torch.full_like(deltas, float("nan")), sizes)
    assert not valid.any()
    # Five anchors with an infinite logit take five of the 60 pre-NMS slots and are then dropped:
    # the result is the reference on the other anchors with 55 pre-NMS slots.
    logits[0, :5] = float("inf")
    proposals, valid = rpn.predict_proposals(anchors, logits, deltas, sizes)
    expected, _ = slow_proposals(anchors[5:], logits[0, 5:], deltas[0, 5:], (128, 160), 55, 25, 0.7)
    assert int(valid.sum()) == len(expected)
    torch.testing.assert_close(proposals[0, : len(expected)], expected, rtol=0, atol=1e-4)
