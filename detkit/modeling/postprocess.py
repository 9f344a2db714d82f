"""Test-time post-processing of the RPN and the box head, as functions over flat tensors.

One implementation of each step, called by both
- the batched eager model: `RPN.predict_proposals` and `Res5ROIHeads.inference`, with all images
  of a batch at once (an image index per row where rows of several images are mixed), and
- the exported single-image graph: `detkit.export.graph.SingleImageDetector`, with N = 1,
so the two run the same operations in the same order. Box decoding stays with the callers
(`BoxCoder.decode`; the graph traces it as a module) and so does the loop over images around the
NMS (eager only: one NMS call per image, as in Detectron2). Every function here is TorchScript-
and torch.export-compatible: typed arguments, no Python objects, no data-dependent Python branches.

Shapes: N images; M anchors per image; T = min(pre-NMS top-k, M) candidates per image; B boxes
given to one NMS call; R RoIs (flat, of one or more images); K foreground classes (the classifier
has K + 1 outputs, background last); k box classes per RoI (K, or 1 when class-agnostic);
C (RoI, class) candidates above the score threshold; D detections.

    RPN:      rpn_top_k -> decode (caller) -> rpn_candidates -> nms_top_k per image
    box head: decode (caller) -> box_head_candidates -> nms_top_k per image -> rescale_detections
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import batched_nms, nms

from detkit.structures.boxes import clip_boxes, nonempty_mask


def rpn_top_k(anchors: Tensor, logits: Tensor, deltas: Tensor, pre_nms_topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """The `pre_nms_topk` best anchors of each image, flattened for the box coder.

    anchors (M, 4) xyxy; logits (N, M); deltas (N, M, 4). Returns top_logits (N, T) fp32, best
    first, and those anchors' deltas and boxes, (N * T, 4) each, image-major (row n * T + t).
    """
    k = min(pre_nms_topk, logits.shape[1])
    top_logits, top_idx = logits.float().topk(k, dim=1)  # (N, T)
    top_deltas = deltas.gather(1, top_idx[:, :, None].expand(-1, -1, 4))  # (N, M, 4) -> (N, T, 4)
    return top_logits, top_deltas.reshape(-1, 4), anchors[top_idx].reshape(-1, 4)


def rpn_candidates(boxes: Tensor, logits: Tensor, image_sizes: Tensor, min_box_size: float) -> tuple[Tensor, Tensor]:
    """Clip the decoded top-k boxes to their image and mark the ones that may enter the NMS.

    boxes (N, T, 4) xyxy decoded; logits (N, T); image_sizes (N, 2) (h, w). Returns the clipped
    boxes (N, T, 4) and keep (N, T) bool: box and logit finite, both sides > min_box_size.
    """
    # Non-finite boxes are dropped before clipping (clipping would turn +inf into the border).
    finite = torch.isfinite(boxes).all(dim=-1) & torch.isfinite(logits)  # (N, T)
    boxes = clip_boxes(boxes, image_sizes[:, None, :])
    return boxes, nonempty_mask(boxes, min_box_size) & finite


def nms_top_k(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor | None,
    iou_threshold: float,
    top_k: int,
    use_batched_nms: bool,
) -> Tensor:
    """NMS within each group (class), then the `top_k` best survivors.

    boxes (B, 4) xyxy, >= 0 (clipped); scores (B,); groups (B,) int64, or None for one group.
    Returns (<= top_k,) int64 indices into the B rows, best first.

    use_batched_nms: True calls torchvision's `batched_nms` (Detectron2's very call: the eager
    model), which picks its algorithm by size at run time: each group shifted into its own tile
    (the "coordinate trick") up to 1000 boxes on the CPU, a loop over groups and an unstable
    re-sort of the survivors above that (ties can change order). False uses one algorithm at every
    size (the exported graph): plain `nms` for one group, the coordinate trick for several. Both
    give the same indices up to 1000 boxes on the CPU.
    """
    if use_batched_nms:
        group_ids = groups if groups is not None else torch.zeros_like(scores, dtype=torch.int64)
        keep = batched_nms(boxes, scores, group_ids, iou_threshold)
    elif groups is None:
        keep = nms(boxes, scores, iou_threshold)
    else:
        # The tile: one more than the largest coordinate. The appended 0 changes the max only
        # when there is no box (then the max of an empty tensor would fail).
        tile = torch.cat((boxes.flatten(), boxes.new_zeros(1))).max() + 1.0
        keep = nms(boxes + (groups.to(boxes.dtype) * tile)[:, None], scores, iou_threshold)
    return keep[:top_k]


def box_head_candidates(
    cls_logits: Tensor, boxes: Tensor, sizes_hw: Tensor, score_thresh: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Softmax, clip, drop non-finite RoIs, keep the (RoI, class) pairs above `score_thresh`.

    cls_logits (R, K + 1), background last; boxes (R, 4k) xyxy decoded (class-specific k = K, or
    class-agnostic k = 1); sizes_hw (R, 2) the (h, w) of each RoI's image, or (1, 2) for all.
    Returns boxes (C, 4) clipped, scores (C,), classes (C,) int64 in [0, K) and the RoI index of
    each (C,), RoI-major then class order.
    """
    probs = F.softmax(cls_logits.float(), dim=-1)  # (R, K + 1)
    # RoIs with a non-finite box or score are dropped, tested before clipping as in Detectron2.
    finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)  # (R,)
    scores = probs[:, :-1]  # (R, K + 1) -> (R, K)
    # (R, 4k) -> (R, k, 4); k is explicit so that R = 0 (no proposal at all) still reshapes.
    boxes = boxes.view(boxes.shape[0], boxes.shape[1] // 4, 4)
    boxes = clip_boxes(boxes, sizes_hw[:, None, :])
    candidates = torch.nonzero((scores > score_thresh) & finite[:, None])  # (C, 2) (RoI, class), row-major
    roi_idx, classes = candidates[:, 0], candidates[:, 1]
    box_class = classes if boxes.shape[1] > 1 else torch.zeros_like(classes)
    return boxes[roi_idx, box_class], scores[roi_idx, classes], classes, roi_idx


def rescale_detections(boxes: Tensor, image_sizes: Tensor, original_sizes: Tensor) -> tuple[Tensor, Tensor]:
    """From the resized input's pixels to the original image's, clipped to it.

    boxes (D, 4) xyxy; image_sizes, original_sizes (D, 2) (h, w) per box, or (1, 2) for all.
    Returns boxes (D, 4) and nonempty (D,) bool (boxes left with a zero side after clipping are
    to be dropped).
    """
    scale = original_sizes.to(boxes.dtype) / image_sizes.to(boxes.dtype)  # (D, 2) (sy, sx)
    boxes = boxes * scale.flip(-1).repeat(1, 2)  # (sx, sy, sx, sy)
    boxes = clip_boxes(boxes, original_sizes)
    return boxes, nonempty_mask(boxes)
