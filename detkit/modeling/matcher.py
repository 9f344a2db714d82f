"""Assign each prediction (anchor or proposal) to a ground-truth box, for all images at once.

Shapes: N images, G padded ground-truth slots per image (invalid slots marked by a mask), M
predictions per image.

Labels: 1 = foreground (IoU >= high threshold), 0 = background (IoU < low threshold), -1 = ignored
(in between). With `allow_low_quality_matches`, every ground-truth box's best-overlapping
predictions (all ties) are foreground too, even below the high threshold (Faster R-CNN's RPN rule).

`Matcher(iou, gt_valid)` matches a given (N, G, M) IoU matrix. `match_boxes` is what the RPN and
the RoI heads call: it computes the IoU itself, in tiles of at most `MATCH_MAX_ELEMENTS` IoU
values, so that the matching never holds the whole (N, G, M) matrix (batch 16 x 300 GT boxes x
63,000 anchors at 800x1333 is 302M values: 1.2 GB for ONE fp32 copy), with the same results bit
for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detkit.structures.boxes import batched_box_iou

# IoU values per tile of `match_boxes`. A tile costs ~12 bytes a value at its peak (3 fp32 copies
# inside batched_box_iou), so at most ~200 MB. Measured (BENCHMARKS.md, "Matching memory", CPU,
# python -m benchmarks.matching): the RPN's matching at batch 16, 300 GT boxes per image, 800x1333
# (63,000 anchors: tiles of 1 image x 150 GT slots) peaks at 121 MiB instead of 12,822 MiB for the
# whole-matrix code before, and is no slower. Smaller tiles save little more on the CPU; on a GPU
# larger tiles mean fewer kernel launches (~15 per tile).
MATCH_MAX_ELEMENTS = 1 << 24


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
        labels = self.threshold_labels(matched_vals)
        if self.allow_low_quality_matches:
            labels.masked_fill_(best_prediction_of_each_gt(iou, gt_valid).any(dim=1), 1)
        return matched_idxs, labels

    def threshold_labels(self, matched_vals: Tensor) -> Tensor:
        """matched_vals (N, M): each prediction's best IoU -> labels (N, M) int8 in {1, 0, -1}.

        masked_fill_, not `labels[mask] = v`: a boolean index is a host-device sync on CUDA.
        """
        labels = torch.ones_like(matched_vals, dtype=torch.int8)
        labels.masked_fill_(matched_vals < self.high_threshold, -1)
        return labels.masked_fill_(matched_vals < self.low_threshold, 0)


def best_prediction_of_each_gt(iou: Tensor, gt_valid: Tensor, best_per_gt: Tensor | None = None) -> Tensor:
    """The low-quality rule: which predictions tie the best IoU of a valid GT box (if positive).

    iou: (N, G, M) with -1 in padding slots; gt_valid: (N, G); best_per_gt: (N, G), each GT's best
    IoU over ALL predictions of its image (default: the max over this `iou`, when it holds them all).
    Returns (N, G, M) bool.
    """
    if best_per_gt is None:
        best_per_gt = iou.max(dim=2).values  # (N, G)
    use_gt = gt_valid & (best_per_gt > 0)  # (N, G): a GT overlapping nothing makes nothing positive
    is_best = iou == best_per_gt[:, :, None]  # (N, G, M)
    return is_best.logical_and_(use_gt[:, :, None])


def match_tile_sizes(num_images: int, num_gt: int, num_boxes: int, max_elements: int) -> tuple[int, int, int]:
    """(images, GT slots, boxes) per tile so that a tile holds at most `max_elements` IoU values
    (but at least one of each, also along an empty axis): whole images while one fits, else slices of GT slots of one image,
    else slices of its boxes for one GT slot. Tiles are made about equal (300 GT slots in 2 tiles
    are 150 + 150, not 266 + 34): the same number of tiles, a smaller peak.
    """

    def even_step(total: int, max_step: int) -> int:
        if total == 0:
            return 1  # no tiles along this axis; a step of 0 would not be a valid range step
        max_step = max(1, min(total, max_step))
        return -(-total // -(-total // max_step))  # ceil(total / number of tiles)

    if num_gt * num_boxes <= max_elements:
        return even_step(num_images, max_elements // max(1, num_gt * num_boxes)), max(1, num_gt), max(1, num_boxes)
    if num_boxes <= max_elements:
        return 1, even_step(num_gt, max_elements // num_boxes), num_boxes
    return 1, 1, even_step(num_boxes, max_elements)


@torch.no_grad()
def match_boxes(
    matcher: Matcher, gt_boxes: Tensor, gt_valid: Tensor, boxes: Tensor, *, max_elements: int = MATCH_MAX_ELEMENTS
) -> tuple[Tensor, Tensor]:
    """Match the boxes of each image to its ground truth: `matcher(batched_box_iou(gt_boxes, boxes),
    gt_valid)` bit for bit, without ever holding more than `max_elements` IoU values at once.

    gt_boxes: (N, G, 4); gt_valid: (N, G) bool; boxes: (N, M, 4) (an expanded view is fine).
    Returns matched_idxs (N, M) int64 and labels (N, M) int8, as `Matcher.__call__`.

    Tiles of (images, GT slots, boxes) are matched one after the other (a Python loop over tiles,
    no host-device sync). Across GT tiles the best GT of each box is a running max that keeps the
    earlier slot on ties (torch.max's "first index wins"). The low-quality rule needs each GT's best
    IoU over all boxes of its image: when the boxes of an image do not fit in one tile, a first pass
    finds it and a second pass recomputes the tiles' IoU (the same bits) to find the ties.
    """
    num_images, num_gt, num_boxes = gt_boxes.shape[0], gt_boxes.shape[1], boxes.shape[1]
    image_step, gt_step, box_step = match_tile_sizes(num_images, num_gt, num_boxes, max_elements)
    tiles = [
        (slice(n, n + image_step), slice(g, g + gt_step), slice(m, m + box_step))
        for n in range(0, num_images, image_step)
        for g in range(0, num_gt, gt_step)
        for m in range(0, num_boxes, box_step)
    ]
    low_quality = matcher.allow_low_quality_matches
    boxes_split = box_step < num_boxes  # a GT's best IoU is known only after all box tiles

    def tile_iou(images: slice, gts: slice, preds: slice) -> Tensor:
        iou = batched_box_iou(gt_boxes[images, gts], boxes[images, preds])  # (n, g, m)
        # Padding slots: -1, as in Matcher.__call__ (masked_fill writes the same bits as where).
        return iou.masked_fill_(gt_valid[images, gts, None].logical_not(), -1.0)

    matched_vals = gt_boxes.new_full((num_images, num_boxes), float("-inf"))
    matched_idxs = torch.zeros((num_images, num_boxes), dtype=torch.int64, device=gt_boxes.device)
    best_per_gt = gt_boxes.new_full((num_images, num_gt), float("-inf"))
    is_low_quality = torch.zeros((num_images, num_boxes), dtype=torch.bool, device=gt_boxes.device)
    for images, gts, preds in tiles:
        iou = tile_iou(images, gts, preds)
        vals, idxs = iou.max(dim=1)  # (n, m) each
        old_vals = matched_vals[images, preds]
        # Strictly better only: on ties the earlier slot stays (torch.max's first index). No NaN
        # to care for: batched_box_iou gives 0 wherever the union is not a positive number.
        better = vals > old_vals
        matched_vals[images, preds] = torch.where(better, vals, old_vals)
        matched_idxs[images, preds] = torch.where(better, idxs + gts.start, matched_idxs[images, preds])
        if low_quality:
            tile_best = iou.max(dim=2).values  # (n, g)
            if boxes_split:
                best_per_gt[images, gts] = torch.maximum(best_per_gt[images, gts], tile_best)
            else:
                is_low_quality[images, preds] |= best_prediction_of_each_gt(iou, gt_valid[images, gts], tile_best).any(
                    dim=1
                )
        del iou
    if low_quality and boxes_split:
        for images, gts, preds in tiles:
            is_best = best_prediction_of_each_gt(
                tile_iou(images, gts, preds), gt_valid[images, gts], best_per_gt[images, gts]
            )
            is_low_quality[images, preds] |= is_best.any(dim=1)

    labels = matcher.threshold_labels(matched_vals)
    if low_quality:
        labels.masked_fill_(is_low_quality, 1)
    return matched_idxs, labels
