"""The whole detector on one image as flat tensors: what `tools/export.py` writes to ONNX / pt2 / AOTInductor.

Shapes: h x w the resized input image; Hp x Wp it padded to `size_divisibility`; M = H * W * A
anchors of the res4 grid; K candidates before the RPN's NMS; P proposals (<= post-NMS top-k);
C (RoI, class) candidates above the score threshold; D detections (<= detections per image).

    image (3, h, w) uint8, channels in the model's input format; original_size (2,) int64 (h0, w0)
      -> normalise -> zero-pad to a multiple of size_divisibility -> trunk -> res4 (1, C4, H, W)
      -> RPN head -> top-k logits -> decode -> clip -> drop empty -> NMS -> top-k -> proposals (P, 4)
      -> RoIAlign -> res5 -> mean -> class logits, deltas -> softmax -> decode -> clip
      -> score > thresh -> class-wise NMS -> top-D -> rescale to (h0, w0) -> clip -> drop empty
      -> boxes (D, 4) xyxy float32, scores (D,) float32, labels (D,) int64 in [0, K), best first

`BatchedDetector` runs that one-image graph on each image of a batch (N images zero-padded to a
common H x W, each with its own size): the pt2 file holds it as torch's `map` over the images, the
ONNX file as a `Loop` node around the one-image graph (exporter.batch_onnx_model). Each image is
cropped to its own size first, so it gives exactly its single-image detections in any batch:

    images (N, 3, H, W) uint8; image_sizes (N, 2) int64 (h_i, w_i); original_sizes (N, 2) int64
      -> for each i: SingleImageDetector(images[i, :, :h_i, :w_i], original_sizes[i])
      -> boxes (N, D, 4) float32, scores (N, D) float32, labels (N, D) int64, num_detections (N,)
         int64; image i's detections are the first num_detections[i] rows (the rest: 0, 0, -1)

Every step is the eager model's own code on one image: its modules, and for the post-processing
the very functions of detkit.modeling.postprocess that `RPN.predict_proposals` and
`Res5ROIHeads.inference` call (with N = 1), in the same order, so fp32 outputs match the eager
`FasterRCNN` run on a batch of that one image. Two choices differ from the batched eager code only
where that code itself chooses at run time (`nms_top_k(..., use_batched_nms=False)` here):
- NMS within the RPN is plain `nms` (eager calls batched_nms with one group: a zero offset up to
  1000 boxes on the CPU; above that nms followed by an unstable re-sort, which can reorder ties);
- class-wise NMS shifts each class into its own tile (torchvision's "coordinate trick", which
  eager `batched_nms` uses on the CPU up to 1000 candidates; above that it loops over classes,
  whose IoUs can differ in the last bit from the shifted boxes').
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from functorch.experimental.control_flow import map as map_over_batch
from torch import Tensor, nn
from torch.nn import functional as F

from detkit.modeling.anchors import AnchorGenerator
from detkit.modeling.detector import FasterRCNN
from detkit.modeling.postprocess import box_head_candidates, nms_top_k, rescale_detections, rpn_candidates, rpn_top_k
from detkit.modeling.roi_heads import Res5ROIHeads
from detkit.structures.boxes import BoxCoder


class GridAnchors(nn.Module):
    """features (1, C, H, W) -> the (M, 4) anchors of its grid (AnchorGenerator, no cache)."""

    def __init__(self, generator: AnchorGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, features: Tensor) -> Tensor:
        return self.generator._grid_anchors(features.shape[-2], features.shape[-1])


class Decode(nn.Module):
    """BoxCoder.decode as a module: deltas (R, 4k), boxes (R, 4) -> (R, 4k)."""

    def __init__(self, coder: BoxCoder):
        super().__init__()
        self.coder = coder

    def forward(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        return self.coder.decode(deltas, boxes)


class BoxHead(nn.Module):
    """features (1, C4, H, W), rois (R, 4) -> class logits (R, K + 1), deltas (R, 4K) or (R, 4)."""

    def __init__(self, heads: Res5ROIHeads):
        super().__init__()
        self.heads = heads

    def forward(self, features: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        roi_image_idx = torch.zeros_like(rois[:, 0], dtype=torch.int64)  # (R,): all in image 0
        return self.heads.box_predictor(self.heads.box_features(features, rois, roi_image_idx))


class SingleImageDetector(nn.Module):
    """`FasterRCNN` at test time on one unbatched image, returning flat tensors (module docstring).

    Holds the model's own submodules (no copy of the weights). `forward(image, original_size)`:
    image (3, h, w) uint8 (or float 0..255); original_size (2,) int64 (h0, w0), the size the boxes
    are rescaled to (pass (h, w) when the image was not resized). One eager code path: torch.export
    (exporter.export_program) records this forward with h and w symbolic for every format.
    """

    # Declared for the type checker only (register_buffer hides the attribute types from it).
    if TYPE_CHECKING:
        pixel_mean: Tensor  # (1, 3, 1, 1) buffer, registered in __init__
        pixel_std: Tensor  # (1, 3, 1, 1) buffer

    def __init__(self, model: FasterRCNN, size_divisibility: int):
        super().__init__()
        if model.training:
            raise ValueError("SingleImageDetector needs a model in eval mode")
        rpn, heads = model.rpn, model.roi_heads
        self.trunk = model.backbone
        self.rpn_head = rpn.head
        self.anchors = GridAnchors(rpn.anchor_generator)
        self.rpn_decode = Decode(rpn.box_coder)
        self.box_head = BoxHead(heads)
        self.box_decode = Decode(heads.box_coder)
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone(), persistent=False)  # (1, 3, 1, 1)
        self.register_buffer("pixel_std", model.pixel_std.detach().clone(), persistent=False)
        self.size_divisibility = int(size_divisibility)
        self.pre_nms_topk = int(rpn.pre_nms_topk[1])
        self.post_nms_topk = int(rpn.post_nms_topk[1])
        self.rpn_nms_thresh = float(rpn.nms_thresh)
        self.min_box_size = float(rpn.min_box_size)
        self.num_classes = int(heads.num_classes)
        self.score_thresh = float(heads.score_thresh)
        self.nms_thresh = float(heads.nms_thresh)
        self.detections_per_image = int(heads.detections_per_image)

    def forward(self, image: Tensor, original_size: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, w = image.shape[1], image.shape[2]
        image_size = torch.tensor([h, w], dtype=torch.int64, device=image.device)  # (2,)
        x = (image.float()[None] - self.pixel_mean) / self.pixel_std  # (3, h, w) -> (1, 3, h, w)
        # Zero padding after normalising, as FasterRCNN.normalize does (its mask sets the pad to 0).
        d = self.size_divisibility
        if d > 1:
            x = F.pad(x, [0, (d - w % d) % d, 0, (d - h % d) % d])  # (1, 3, Hp, Wp)
        features = self.trunk(x)  # (1, C4, Hp/16, Wp/16)
        proposals = self.proposals(features, image_size)  # (P, 4)
        return self.detections(features, proposals, image_size, original_size)

    def proposals(self, features: Tensor, image_size: Tensor) -> Tensor:
        """features (1, C4, H, W); image_size (2,) -> proposals (P, 4) xyxy, best first (RPN.predict_proposals)."""
        logits, deltas = self.rpn_head(features)  # (1, M), (1, M, 4)
        top_logits, top_deltas, top_anchors = rpn_top_k(self.anchors(features), logits, deltas, self.pre_nms_topk)
        boxes = self.rpn_decode(top_deltas, top_anchors).view(1, top_logits.shape[1], 4)  # (K, 4) -> (1, K, 4)
        boxes, keep = rpn_candidates(boxes, top_logits, image_size[None, :], self.min_box_size)  # (1, K, 4), (1, K)
        kept = torch.nonzero(keep[0]).squeeze(1)
        # Plain nms, the same algorithm at every size (module docstring).
        survivors = kept[
            nms_top_k(boxes[0][kept], top_logits[0][kept], None, self.rpn_nms_thresh, self.post_nms_topk, False)
        ]
        return boxes[0][survivors]

    def detections(
        self, features: Tensor, proposals: Tensor, image_size: Tensor, original_size: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The box head and its post-processing on one image (Res5ROIHeads.forward + inference).

        Returns boxes (D, 4) in original pixels, scores (D,), labels (D,) int64, best first.
        """
        cls_logits, box_deltas = self.box_head(features, proposals)  # (P, K + 1), (P, 4K) or (P, 4)
        boxes = self.box_decode(box_deltas, proposals)  # (P, 4K) or (P, 4)
        det_boxes, det_scores, det_labels, _ = box_head_candidates(
            cls_logits, boxes, image_size[None, :], self.score_thresh
        )  # (C, 4), (C,), (C,)
        # Class-wise NMS with each class shifted into its own tile (module docstring).
        keep = nms_top_k(det_boxes, det_scores, det_labels, self.nms_thresh, self.detections_per_image, False)
        det_boxes, det_scores, det_labels = det_boxes[keep], det_scores[keep], det_labels[keep]
        det_boxes, nonempty = rescale_detections(det_boxes, image_size[None, :], original_size[None, :])
        return det_boxes[nonempty], det_scores[nonempty], det_labels[nonempty]


class BatchedDetector(nn.Module):
    """`SingleImageDetector` on each image of a padded batch (module docstring), with D fixed to the
    model's detections per image so that every image's outputs have one shape.

    forward(images (N, 3, H, W) uint8, image_sizes (N, 2) int64, original_sizes (N, 2) int64)
    -> boxes (N, D, 4), scores (N, D), labels (N, D) (-1 past an image's detections), num_detections (N,).
    torch.export records the loop over N as one `map` node whose body has h_i and w_i as
    data-dependent sizes, so N, H and W are all free in the exported program.
    """

    def __init__(self, detector: SingleImageDetector):
        super().__init__()
        self.detector = detector
        self.max_detections = detector.detections_per_image

    def forward(self, images: Tensor, image_sizes: Tensor, original_sizes: Tensor) -> tuple[Tensor, ...]:
        return map_over_batch(self.one_image, (images, image_sizes, original_sizes))

    def one_image(self, inputs: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """image (3, H, W), its size (2,), original size (2,) -> boxes (D, 4), scores (D,), labels (D,), count ()."""
        image, size, original_size = inputs
        h, w = size[0].item(), size[1].item()
        # What torch.export must know of the data-dependent h and w; the runtime checks them.
        torch._check(h >= 1)
        torch._check(w >= 1)
        torch._check(h <= image.shape[1])
        torch._check(w <= image.shape[2])
        boxes, scores, labels = self.detector(image[:, :h, :w], original_size)
        count = scores.shape[0]
        torch._check(count <= self.max_detections)
        pad = self.max_detections - count
        return (
            F.pad(boxes, [0, 0, 0, pad]),
            F.pad(scores, [0, pad]),
            F.pad(labels, [0, pad], value=-1),
            torch.full((), count, dtype=torch.int64),
        )
