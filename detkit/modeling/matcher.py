"""Assign each prediction (anchor or proposal) to a ground-truth box, for all images at once.

Shapes: N images, G padded ground-truth slots per image (invalid slots marked by a mask), M
predictions per image.

Labels: 1 = foreground (IoU >= high threshold), 0 = background (IoU < low threshold), -1 = ignored
(in between). With `allow_low_quality_matches`, every ground-truth box's best-overlapping
predictions (all ties) are foreground too, even below the high threshold (Faster R-CNN's RPN rule).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Matcher:
    def __init__(self, *, low_threshold: float, high_threshold: float, allow_low_quality_matches: bool):
        if not 0.0 <= low_threshold <= high_threshold:
            raise ValueError(f"need 0 <= low_threshold <= high_threshold, got {low_threshold}, {high_threshold}")
        self.low_threshold = low_threshold
        self.high_threshold = high_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    @torch.no_grad()
    def __call__(self, iou: Tensor, gt_valid: Tensor) -> tuple[Tensor, Tensor]:
        """Match predictions to ground truth.

        iou: (N, G, M) IoU of every ground-truth slot with every prediction.
        gt_valid: (N, G) bool, False for padding slots.
        Returns matched_idxs (N, M) int64, the best ground-truth slot of each prediction (0 when
        the image has no valid box: then the label is 0 and the index is meaningless), and
        labels (N, M) int8 in {1, 0, -1}.
        """
        # Padding slots can never match: IoU -1 is below every threshold and below any real IoU.
        iou = torch.where(gt_valid[:, :, None], iou, torch.full_like(iou, -1.0))
        matched_vals, matched_idxs = iou.max(dim=1)  # (N, M) each

        labels = torch.ones_like(matched_idxs, dtype=torch.int8)
        labels[matched_vals < self.high_threshold] = -1
        labels[matched_vals < self.low_threshold] = 0

        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=2, keepdim=True).values  # (N, G, 1)
            # A prediction that ties the best IoU of some valid GT box with a positive IoU.
            is_best = (iou == best_per_gt) & gt_valid[:, :, None] & (best_per_gt > 0)  # (N, G, M)
            labels[is_best.any(dim=1)] = 1
        return matched_idxs, labels
