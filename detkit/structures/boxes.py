"""Box arithmetic shared by the RPN and the RoI heads.

Boxes are (x1, y1, x2, y2) in pixels of the (resized) input image, float. Widths are x2 - x1 with
no +1, as in Detectron2. Shapes: N images, G ground-truth boxes, M boxes per image, R flat boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# exp(dw) is clamped so a predicted box is at most 1000/16 times its anchor: no inf from exp().
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes a box relative to a reference box as (dx, dy, dw, dh), and decodes it back.

    dx = wx * (gx - rx) / rw, dw = ww * log(gw / rw) for centres (x, y) and sizes (w, h);
    `weights` = (wx, wy, ww, wh): (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head.
    """

    def __init__(self, weights: Sequence[float], scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4:
            raise ValueError(f"BoxCoder needs 4 weights (wx, wy, ww, wh), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, reference: Tensor, target: Tensor) -> Tensor:
        """Deltas that turn `reference` boxes into `target` boxes.

        reference, target: (..., 4) xyxy with the same shape. Returns (..., 4) deltas.
        """
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        ref_x = reference[..., 0] + 0.5 * ref_w
        ref_y = reference[..., 1] + 0.5 * ref_h
        tgt_w = target[..., 2] - target[..., 0]
        tgt_h = target[..., 3] - target[..., 1]
        tgt_x = target[..., 0] + 0.5 * tgt_w
        tgt_y = target[..., 1] + 0.5 * tgt_h
        wx, wy, ww, wh = self.weights
        return torch.stack(
            (
                wx * (tgt_x - ref_x) / ref_w,
                wy * (tgt_y - ref_y) / ref_h,
                ww * torch.log(tgt_w / ref_w),
                wh * torch.log(tgt_h / ref_h),
            ),
            dim=-1,
        )

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply (dx, dy, dw, dh) deltas to boxes.

        deltas: (R, 4k) for k classes (k = 1 for class-agnostic); boxes: (R, 4) xyxy.
        Returns (R, 4k) xyxy in the deltas' float dtype (fp32 when deltas come from fp32 logits).
        dw, dh are clamped at log(1000 / 16) so exp() cannot overflow.
        """
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]

        x1 = pred_ctr_x - 0.5 * pred_w
        y1 = pred_ctr_y - 0.5 * pred_h
        x2 = pred_ctr_x + 0.5 * pred_w
        y2 = pred_ctr_y + 0.5 * pred_h
        # (R, k, 4) -> (R, 4k): x1, y1, x2, y2 of class 0, then of class 1, ...
        return torch.stack((x1, y1, x2, y2), dim=-1).reshape(deltas.shape)


def clip_boxes(boxes: Tensor, sizes_hw: Tensor) -> Tensor:
    """Clip boxes to their image.

    boxes: (..., 4) xyxy; sizes_hw: (..., 2) (h, w) broadcastable to boxes[..., 0]
    (e.g. boxes (N, M, 4) with sizes (N, 1, 2), or boxes (R, 4) with sizes (R, 2)).
    """
    h = sizes_hw[..., 0].to(boxes.dtype)
    w = sizes_hw[..., 1].to(boxes.dtype)
    x1 = torch.minimum(boxes[..., 0].clamp(min=0), w)
    y1 = torch.minimum(boxes[..., 1].clamp(min=0), h)
    x2 = torch.minimum(boxes[..., 2].clamp(min=0), w)
    y2 = torch.minimum(boxes[..., 3].clamp(min=0), h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) area (0 for inverted boxes is NOT enforced; callers clip first)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def nonempty_mask(boxes: Tensor, threshold: float = 0.0) -> Tensor:
    """(..., 4) xyxy -> (...) bool: both sides strictly larger than `threshold`."""
    return ((boxes[..., 2] - boxes[..., 0]) > threshold) & ((boxes[..., 3] - boxes[..., 1]) > threshold)


def batched_box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Pairwise IoU within each image of a batch.

    boxes_a: (N, G, 4), boxes_b: (N, M, 4) xyxy. Returns (N, G, M); 0 where the union is empty.
    The same numbers as torchvision.ops.box_iou on each image (tested), without a loop over images.
    Intersection widths and heights are two (N, G, M) tensors updated in place, not (N, G, M, 2)
    corner pairs: about 3 (N, G, M) floats at the peak instead of ~9, with the same operations on
    every element, so the same bits (tested against the corner-pair form).
    """
    area_a = box_area(boxes_a)[:, :, None]  # (N, G) -> (N, G, 1)
    area_b = box_area(boxes_b)[:, None, :]  # (N, M) -> (N, 1, M)
    a = boxes_a[:, :, None, :]  # (N, G, 4) -> (N, G, 1, 4)
    b = boxes_b[:, None, :, :]  # (N, M, 4) -> (N, 1, M, 4)
    inter = torch.minimum(a[..., 2], b[..., 2]).sub_(torch.maximum(a[..., 0], b[..., 0])).clamp_(min=0)  # widths
    heights = torch.minimum(a[..., 3], b[..., 3]).sub_(torch.maximum(a[..., 1], b[..., 1])).clamp_(min=0)
    inter.mul_(heights)  # (N, G, M)
    del heights
    union = (area_a + area_b).sub_(inter)  # (N, G, M)
    empty = (union > 0).logical_not_()  # not `union <= 0`: a NaN union gives IoU 0 too
    iou = inter.div_(union.clamp_(min=torch.finfo(inter.dtype).tiny))
    del union
    return iou.masked_fill_(empty, 0.0)


def pad_targets(
    boxes_per_image: Sequence[Tensor], labels_per_image: Sequence[Tensor], device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Ground truth as a padded batch.

    boxes_per_image: N tensors (G_i, 4); labels_per_image: N tensors (G_i,).
    Returns boxes (N, G, 4) float32, labels (N, G) int64, valid (N, G) bool with G = max(1, max G_i):
    at least one (invalid) slot so that images without any box still give well-shaped tensors.
    """
    num_images = len(boxes_per_image)
    max_gt = max([1] + [int(b.shape[0]) for b in boxes_per_image])
    boxes = torch.zeros((num_images, max_gt, 4), dtype=torch.float32, device=device)
    labels = torch.zeros((num_images, max_gt), dtype=torch.int64, device=device)
    valid = torch.zeros((num_images, max_gt), dtype=torch.bool, device=device)
    for i, (b, lab) in enumerate(zip(boxes_per_image, labels_per_image)):
        g = int(b.shape[0])
        boxes[i, :g] = b.to(device=device, dtype=torch.float32, non_blocking=True)
        labels[i, :g] = lab.to(device=device, dtype=torch.int64, non_blocking=True)
        valid[i, :g] = True
    return boxes, labels, valid


def rank_within_groups(group_ids: Tensor) -> Tensor:
    """Position of each element among the elements of its group, in the given order.

    group_ids: (R,) int64 group of each element (e.g. the image index of detections sorted by
    score). Returns (R,) int64: 0 for the first element of each group, 1 for the second, ...
    Used to keep the top-k per image after one NMS over all images, without a loop.
    """
    if group_ids.numel() == 0:
        return group_ids.clone()
    order = torch.sort(group_ids, stable=True).indices  # grouped, original order within a group
    sorted_ids = group_ids[order]
    positions = torch.arange(group_ids.numel(), device=group_ids.device)
    is_start = torch.ones_like(sorted_ids, dtype=torch.bool)
    is_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    # Index of the first element of each element's group, propagated forward with cummax.
    group_start = torch.where(is_start, positions, torch.zeros_like(positions)).cummax(dim=0).values
    ranks = torch.empty_like(positions)
    ranks[order] = positions - group_start
    return ranks
