"""Matcher: IoU thresholds, the low-quality rule, padding slots, and batched == per-image loop."""

import pytest
import torch

from detkit.modeling.matcher import Matcher


def rpn_matcher(allow_low_quality_matches: bool = True) -> Matcher:
    return Matcher(low_threshold=0.3, high_threshold=0.7, allow_low_quality_matches=allow_low_quality_matches)


def test_thresholds_below_between_above():
    # One GT, seven predictions; below 0.3 -> 0, [0.3, 0.7) -> -1, >= 0.7 -> 1.
    iou = torch.tensor([[[0.1, 0.2999, 0.3, 0.5, 0.6999, 0.7, 0.9]]])
    matched, labels = rpn_matcher(allow_low_quality_matches=False)(iou, torch.tensor([[True]]))
    assert labels.tolist() == [[0, 0, -1, -1, -1, 1, 1]]
    assert labels.dtype == torch.int8
    assert matched.tolist() == [[0] * 7]


def test_each_prediction_takes_its_best_gt():
    iou = torch.tensor([[[0.8, 0.1, 0.4], [0.2, 0.75, 0.5]]])  # (1, G=2, M=3)
    matched, labels = rpn_matcher(allow_low_quality_matches=False)(iou, torch.tensor([[True, True]]))
    assert matched.tolist() == [[0, 1, 1]]
    assert labels.tolist() == [[1, 1, -1]]


def test_best_prediction_of_each_gt_is_positive_including_ties():
    # GT 0's best IoU is 0.4, reached by predictions 1 and 3 (a tie): both become positive although
    # 0.4 < 0.7. GT 1's best is 0.9 (prediction 4), already positive. Prediction 2 (0.35) stays ignored.
    iou = torch.tensor([[[0.1, 0.4, 0.35, 0.4, 0.0], [0.0, 0.2, 0.0, 0.1, 0.9]]])
    matched, labels = rpn_matcher()(iou, torch.tensor([[True, True]]))
    assert labels.tolist() == [[0, 1, -1, 1, 1]]
    assert matched.tolist() == [[0, 0, 0, 0, 1]]
    # Without the rule the tie is just "ignored".
    _, labels = rpn_matcher(allow_low_quality_matches=False)(iou, torch.tensor([[True, True]]))
    assert labels.tolist() == [[0, -1, -1, -1, 1]]


def test_low_quality_rule_keeps_the_matched_index_of_the_best_gt():
    # Prediction 1 is GT 0's best (0.25) but overlaps GT 1 more (0.28): positive, matched to GT 1
    # (as in Detectron2, the rule changes the label, not the index).
    iou = torch.tensor([[[0.1, 0.25, 0.0], [0.0, 0.28, 0.6]]])
    matched, labels = rpn_matcher()(iou, torch.tensor([[True, True]]))
    assert labels.tolist() == [[0, 1, 1]]
    assert matched.tolist() == [[0, 1, 1]]


def test_gt_without_any_overlap_makes_nothing_positive():
    # A GT box that overlaps no prediction (best IoU 0) must not turn every IoU-0 prediction positive.
    iou = torch.tensor([[[0.0, 0.0, 0.0], [0.1, 0.8, 0.0]]])
    _, labels = rpn_matcher()(iou, torch.tensor([[True, True]]))
    assert labels.tolist() == [[0, 1, 0]]


def test_padding_slots_never_match():
    # Slot 1 is padding with (garbage) high IoU: it must neither win the argmax nor make anything positive.
    iou = torch.tensor([[[0.5, 0.1, 0.0], [0.95, 0.99, 0.9]]])
    matched, labels = rpn_matcher()(iou, torch.tensor([[True, False]]))
    assert matched.tolist() == [[0, 0, 0]]
    assert labels.tolist() == [[1, 0, 0]]  # prediction 0 is the valid GT's best (low-quality rule)


def test_image_without_gt_is_all_background():
    iou = torch.rand(2, 3, 6, generator=torch.Generator().manual_seed(0))  # garbage in padding slots
    valid = torch.tensor([[False, False, False], [True, False, False]])
    _, labels = rpn_matcher()(iou, valid)
    assert labels[0].tolist() == [0] * 6
    assert (labels[1] != 0).any()


def test_roi_head_matcher_single_threshold():
    # low = high = 0.5: IoU >= 0.5 foreground, below background, nothing ignored.
    matcher = Matcher(low_threshold=0.5, high_threshold=0.5, allow_low_quality_matches=False)
    _, labels = matcher(torch.tensor([[[0.0, 0.4999, 0.5, 1.0]]]), torch.tensor([[True]]))
    assert labels.tolist() == [[0, 0, 1, 1]]


def test_bad_thresholds_raise():
    with pytest.raises(ValueError, match="low_threshold <= high_threshold"):
        Matcher(low_threshold=0.7, high_threshold=0.3, allow_low_quality_matches=True)


def slow_match(iou, valid, low, high, allow_low_quality):
    """Per image, per prediction, per GT: the textbook rules. Returns best IoU and labels (lists)."""
    best_vals, all_labels = [], []
    for n in range(iou.shape[0]):
        gts = [g for g in range(iou.shape[1]) if valid[n, g]]
        num_pred = iou.shape[2]
        vals, labels = [], []
        for m in range(num_pred):
            best = max((iou[n, g, m].item() for g in gts), default=-1.0)
            vals.append(best)
            labels.append(1 if best >= high else (0 if best < low else -1))
        if allow_low_quality:
            for g in gts:
                gt_best = max(iou[n, g, m].item() for m in range(num_pred))
                if gt_best > 0:
                    for m in range(num_pred):
                        if iou[n, g, m].item() == gt_best:
                            labels[m] = 1
        best_vals.append(vals)
        all_labels.append(labels)
    return best_vals, all_labels


@pytest.mark.parametrize("allow_low_quality", [True, False])
def test_batched_equals_per_image_reference_on_random_data(allow_low_quality):
    g = torch.Generator().manual_seed(1)
    num_images, max_gt, num_pred = 4, 5, 60
    # IoUs on a 0.05 grid so that ties (per GT and per prediction) are common.
    iou = torch.randint(0, 21, (num_images, max_gt, num_pred), generator=g).float() / 20 * 0.8
    num_gt = [5, 0, 2, 1]
    valid = torch.arange(max_gt)[None, :] < torch.tensor(num_gt)[:, None]
    matcher = rpn_matcher(allow_low_quality)
    matched, labels = matcher(iou, valid)
    best_vals, expected_labels = slow_match(iou, valid, 0.3, 0.7, allow_low_quality)
    assert labels.tolist() == expected_labels
    for n in range(num_images):
        if num_gt[n] == 0:
            continue
        # The matched slot is a valid one holding the best IoU (any of several tied slots).
        assert (matched[n] < num_gt[n]).all()
        got_vals = iou[n].gather(0, matched[n][None]).squeeze(0)
        assert got_vals.tolist() == best_vals[n]
    assert (labels == 1).any() and (labels == 0).any() and (labels == -1).any()
