"""Second stage of the C4 detector: RoIAlign on res4, res5 per RoI, classification + boxes.

Shapes: N images; C4 / C5 channels of res4 / res5; P padded proposals per image; G padded
ground-truth slots; K foreground classes (the classifier has K + 1 outputs, background LAST, as in
Detectron2); R RoIs of all images together (flat, with an image index); D detections.

    train: proposals + GT boxes -> match (IoU >= 0.5 foreground) -> sample 512 per image, 25% fg
    both:  roi_align 14x14 (aligned, sampling 0, 1/16) -> res5 (stride 2) -> mean over 7x7 (R, C5)
           -> class logits (R, K + 1), class-specific deltas (R, 4K)
    train: cross-entropy + L1 over foreground, both normalised by the number of sampled RoIs
    test:  softmax -> decode -> clip -> score > 0.05 -> class-wise NMS 0.5 -> top 100 per image
           -> rescale to the original image size -> clip -> drop empty boxes
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from detkit.modeling.matcher import Matcher, match_boxes
from detkit.modeling.postprocess import box_head_candidates, nms_top_k, rescale_detections
from detkit.modeling.rpn import smooth_l1
from detkit.modeling.sampler import sample_balanced
from detkit.structures.boxes import BoxCoder


class BoxPredictor(nn.Module):
    """(R, C5) pooled features -> class logits (R, K + 1) and box deltas (R, 4K) or (R, 4)."""

    def __init__(self, in_channels: int, num_classes: int, cls_agnostic_bbox_reg: bool = False):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, 4 * (1 if cls_agnostic_bbox_reg else num_classes))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.cls_score.bias, 0.0)
        nn.init.constant_(self.bbox_pred.bias, 0.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class Res5ROIHeads(nn.Module):
    def __init__(
        self,
        *,
        res5: nn.Module,
        res5_out_channels: int,
        num_classes: int,
        feature_stride: int = 16,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        iou_threshold: float = 0.5,
        pooler_resolution: int = 14,
        sampling_ratio: int = 0,
        aligned: bool = True,
        bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta: float = 0.0,
        cls_agnostic_bbox_reg: bool = False,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
    ):
        super().__init__()
        self.res5 = res5
        self.box_predictor = BoxPredictor(res5_out_channels, num_classes, cls_agnostic_bbox_reg)
        self.num_classes = num_classes
        self.spatial_scale = 1.0 / feature_stride
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.matcher = Matcher(
            low_threshold=iou_threshold, high_threshold=iou_threshold, allow_low_quality_matches=False
        )
        self.pooler_resolution = pooler_resolution
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.smooth_l1_beta = smooth_l1_beta
        self.cls_agnostic_bbox_reg = cls_agnostic_bbox_reg
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image

    # ---------------------------------------------------------------- shared by both modes
    def box_features(self, features: Tensor, rois: Tensor, roi_image_idx: Tensor) -> Tensor:
        """features (N, C4, H, W); rois (R, 4) xyxy input pixels; roi_image_idx (R,) -> (R, C5)."""
        # (R,) + (R, 4) -> (R, 5) rows (image index, x1, y1, x2, y2), the layout roi_align takes.
        # The boxes stay fp32 under autocast: bf16 keeps 8 mantissa bits, so a coordinate near
        # 1333 px would move by up to 4 px (and training would pool from another box than the one
        # its regression target was computed for). roi_align needs input and boxes of one dtype, so
        # it samples fp32 features and its crops go back to the features' dtype for res5.
        # (Detectron2 instead casts the boxes to the features' dtype; in fp32 the two agree.)
        rois_5 = torch.cat((roi_image_idx[:, None].to(torch.float32), rois.float()), dim=1)
        crops = roi_align(
            features.float(),
            rois_5,
            output_size=self.pooler_resolution,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
        ).to(features.dtype)  # (R, C4, 14, 14)
        return self.res5(crops).mean(dim=(2, 3))  # (R, C5, 7, 7) -> (R, C5)

    def forward(
        self,
        features: Tensor,
        proposals: Tensor,
        proposals_valid: Tensor,
        image_sizes: Tensor,
        original_sizes: Tensor | None = None,
        gt_boxes: Tensor | None = None,
        gt_labels: Tensor | None = None,
        gt_valid: Tensor | None = None,
    ):
        """Training: returns a dict of losses. Test: returns detections (see `inference`).

        proposals (N, P, 4), proposals_valid (N, P); image_sizes / original_sizes (N, 2) (h, w);
        gt_boxes (N, G, 4), gt_labels (N, G) in [0, K), gt_valid (N, G).
        """
        if self.training:
            if gt_boxes is None or gt_labels is None or gt_valid is None:
                raise ValueError("Res5ROIHeads in training mode needs gt_boxes, gt_labels and gt_valid")
            rois, roi_image_idx, roi_classes, roi_gt_boxes = self.label_and_sample_proposals(
                proposals, proposals_valid, gt_boxes, gt_labels, gt_valid
            )
            cls_logits, box_deltas = self.box_predictor(self.box_features(features, rois, roi_image_idx))
            return self.losses(cls_logits, box_deltas, rois, roi_classes, roi_gt_boxes)

        # The number of valid proposals decides the shapes below: one sync.
        roi_image_idx, slot = torch.nonzero(proposals_valid, as_tuple=True)
        rois = proposals[roi_image_idx, slot]  # (R, 4)
        cls_logits, box_deltas = self.box_predictor(self.box_features(features, rois, roi_image_idx))
        sizes = original_sizes if original_sizes is not None else image_sizes
        return self.inference(cls_logits, box_deltas, rois, roi_image_idx, image_sizes, sizes)

    # ---------------------------------------------------------------- training
    @torch.no_grad()
    def label_and_sample_proposals(
        self, proposals: Tensor, proposals_valid: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Add the GT boxes to the proposals, match, and sample the RoIs of the box head.

        Returns rois (R, 4), roi_image_idx (R,), roi_classes (R,) in [0, K] (K = background) and
        the matched GT box of each RoI (R, 4).
        """
        candidates = torch.cat((proposals, gt_boxes), dim=1)  # (N, P + G, 4)
        candidates_valid = torch.cat((proposals_valid, gt_valid), dim=1)
        matched_idxs, match_labels = match_boxes(self.matcher, gt_boxes, gt_valid, candidates)  # (N, P + G) each

        classes = torch.gather(gt_labels, 1, matched_idxs)
        classes = torch.where(match_labels == 1, classes, torch.full_like(classes, self.num_classes))
        foreground = (match_labels == 1) & candidates_valid
        background = (match_labels == 0) & candidates_valid
        sampled_fg, sampled_bg = sample_balanced(
            foreground, background, self.batch_size_per_image, self.positive_fraction
        )

        # Variable RoI count per image: one sync, so that res5 runs only on real RoIs.
        roi_image_idx, slot = torch.nonzero(sampled_fg | sampled_bg, as_tuple=True)
        rois = candidates[roi_image_idx, slot]
        roi_classes = classes[roi_image_idx, slot]
        roi_gt_boxes = gt_boxes[roi_image_idx, matched_idxs[roi_image_idx, slot]]
        return rois, roi_image_idx, roi_classes, roi_gt_boxes

    def losses(
        self, cls_logits: Tensor, box_deltas: Tensor, rois: Tensor, roi_classes: Tensor, roi_gt_boxes: Tensor
    ) -> dict[str, Tensor]:
        """cls_logits (R, K + 1), box_deltas (R, 4K) or (R, 4); rois, roi_gt_boxes (R, 4);
        roi_classes (R,) in [0, K]. Both losses are sums divided by R (at least 1), as in Detectron2.
        """
        num_rois = max(int(roi_classes.shape[0]), 1)
        loss_cls = F.cross_entropy(cls_logits.float(), roi_classes, reduction="sum") / num_rois

        foreground = roi_classes < self.num_classes  # (R,)
        if self.cls_agnostic_bbox_reg:
            fg_deltas = box_deltas.float()  # (R, 4)
        else:
            # (R, 4K) -> (R, K, 4), then the deltas of each RoI's own class (background: any, masked).
            per_class = box_deltas.float().view(box_deltas.shape[0], self.num_classes, 4)
            class_idx = roi_classes.clamp(max=self.num_classes - 1)
            fg_deltas = per_class[torch.arange(per_class.shape[0], device=per_class.device), class_idx]
        targets = self.box_coder.encode(rois, roi_gt_boxes)  # (R, 4)
        # A background RoI of an image without ground truth is "matched" to a zero padding box:
        # log(0) = -inf targets. Masking the loss afterwards is not enough: for beta > 0 the
        # backward pass of smooth-L1 multiplies the zero mask by inf (NaN). Zero them first.
        targets = torch.where(foreground[:, None], targets, torch.zeros_like(targets))
        loss_box = smooth_l1(fg_deltas, targets, self.smooth_l1_beta).sum(dim=1)
        loss_box = torch.where(foreground, loss_box, torch.zeros_like(loss_box)).sum() / num_rois
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box}

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def inference(
        self,
        cls_logits: Tensor,
        box_deltas: Tensor,
        rois: Tensor,
        roi_image_idx: Tensor,
        image_sizes: Tensor,
        original_sizes: Tensor,
    ) -> list[dict[str, Tensor]]:
        """Detections per image in original pixels.

        cls_logits (R, K + 1), box_deltas (R, 4K) or (R, 4), rois (R, 4), roi_image_idx (R,);
        image_sizes (N, 2) the frame of the rois; original_sizes (N, 2) the output frame.
        Returns N dicts: boxes (D_i, 4) xyxy, scores (D_i,), labels (D_i,) int64 in [0, K),
        sorted by score. The steps are the functions of detkit.modeling.postprocess, which the
        exported graph calls too.
        """
        num_images = image_sizes.shape[0]
        boxes = self.box_coder.decode(box_deltas, rois)  # (R, 4K) or (R, 4)
        det_boxes, det_scores, det_labels, roi_idx = box_head_candidates(
            cls_logits, boxes, image_sizes[roi_image_idx], self.score_thresh
        )  # (C, 4), (C,), (C,), (C,)
        det_image = roi_image_idx[roi_idx]

        # Class-wise NMS and top-k per image with Detectron2's very call (batched_nms with the class
        # as the group), so that the kept boxes and the order of tied scores are Detectron2's bit for
        # bit (see RPN.predict_proposals: one call over all images would round shifted coordinates
        # or re-sort ties). torchvision 0.29's batched_nms is one nms call up to 25000 boxes on CUDA,
        # so this is one call per image; the counts per image need one host-device sync.
        by_image = torch.sort(det_image, stable=True).indices  # image-major, RoI-major within an image
        keep_per_image = [
            candidates[
                nms_top_k(
                    det_boxes[candidates],
                    det_scores[candidates],
                    det_labels[candidates],
                    self.nms_thresh,
                    self.detections_per_image,
                    True,
                )
            ]
            for candidates in by_image.split(torch.bincount(det_image, minlength=num_images).tolist())
        ]
        keep = torch.cat(keep_per_image) if keep_per_image else by_image
        det_boxes, det_scores, det_labels, det_image = (
            det_boxes[keep],
            det_scores[keep],
            det_labels[keep],
            det_image[keep],
        )

        # Rescale from the resized input to the original image, clip, drop boxes left empty.
        det_boxes, nonempty = rescale_detections(det_boxes, image_sizes[det_image], original_sizes[det_image])
        det_boxes, det_scores, det_labels, det_image = (
            det_boxes[nonempty],
            det_scores[nonempty],
            det_labels[nonempty],
            det_image[nonempty],
        )

        # Split per image at the API boundary (stable sort keeps each image's score order).
        order = torch.sort(det_image, stable=True).indices
        counts = torch.bincount(det_image, minlength=num_images).tolist()
        return [
            {"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(
                det_boxes[order].split(counts), det_scores[order].split(counts), det_labels[order].split(counts)
            )
        ]
