"""Region Proposal Network on the res4 map.

Shapes: N images; C channels of the res4 map; H x W its grid; A anchors per location;
M = H * W * A anchors per image; G padded ground-truth slots; P = post-NMS top-k proposals per
image (padded: an image with fewer valid proposals has invalid slots at the end).

    res4 (N, C, H, W) -> 3x3 conv + ReLU -> objectness logits (N, A, H, W), deltas (N, 4A, H, W)
    train: match anchors to GT (IoU 0.3/0.7 + best anchor of each GT), sample 256 per image
           (50% positive), BCE + L1 losses normalised by N * 256 (Detectron2's normaliser)
    both:  per image top-k logits -> decode -> clip -> drop empty -> NMS 0.7 -> top-k
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detkit.modeling.anchors import AnchorGenerator
from detkit.modeling.matcher import Matcher, match_boxes
from detkit.modeling.postprocess import nms_top_k, rpn_candidates, rpn_top_k
from detkit.modeling.sampler import sample_balanced
from detkit.structures.boxes import BoxCoder


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared by a 1x1 objectness conv (A) and a 1x1 box-delta conv (4A)."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            assert layer.bias is not None  # built with bias=True (the default) just above
            nn.init.constant_(layer.bias, 0.0)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features (N, C, H, W) -> logits (N, M), deltas (N, M, 4), anchor order of anchors.py."""
        hidden = F.relu(self.conv(features))
        logits = self.objectness_logits(hidden)
        deltas = self.anchor_deltas(hidden)
        n, a, h, w = logits.shape
        # (N, A, H, W) -> (N, H, W, A) -> (N, M)
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1)
        # (N, 4A, H, W) -> (N, A, 4, H, W) -> (N, H, W, A, 4) -> (N, M, 4)
        deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        return logits, deltas


class RPN(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_stride: int = 16,
        iou_thresholds: tuple[float, float] = (0.3, 0.7),
        allow_low_quality_matches: bool = True,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        bbox_reg_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        smooth_l1_beta: float = 0.0,
        loss_weight: float = 1.0,
        pre_nms_topk: tuple[int, int] = (12000, 6000),
        post_nms_topk: tuple[int, int] = (2000, 1000),
        nms_thresh: float = 0.7,
        min_box_size: float = 0.0,
    ):
        """pre_nms_topk, post_nms_topk: (training, test) values."""
        super().__init__()
        self.anchor_generator = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=aspect_ratios, stride=anchor_stride)
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors_per_location)
        self.matcher = Matcher(
            low_threshold=iou_thresholds[0],
            high_threshold=iou_thresholds[1],
            allow_low_quality_matches=allow_low_quality_matches,
        )
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_weight = loss_weight
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_thresh = nms_thresh
        self.min_box_size = min_box_size

    def forward(
        self,
        features: Tensor,
        image_sizes: Tensor,
        gt_boxes: Tensor | None = None,
        gt_valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """features (N, C, H, W); image_sizes (N, 2) (h, w); gt_boxes (N, G, 4), gt_valid (N, G)
        in training.

        Returns proposals (N, P, 4), proposals_valid (N, P) bool, and the losses (empty at test).
        """
        logits, deltas = self.head(features)  # (N, M), (N, M, 4)
        anchors = self.anchor_generator(features.shape[-2:])  # (M, 4)
        losses: dict[str, Tensor] = {}
        if self.training:
            if gt_boxes is None or gt_valid is None:
                raise ValueError("RPN in training mode needs gt_boxes and gt_valid")
            gt_labels, gt_deltas = self.label_and_sample_anchors(anchors, gt_boxes, gt_valid)
            losses = self.losses(logits, deltas, gt_labels, gt_deltas)
        with torch.no_grad():
            # Proposals are fixed inputs of the RoI heads: no gradient flows through their coordinates.
            proposals, valid = self.predict_proposals(anchors, logits.detach(), deltas.detach(), image_sizes)
        return proposals, valid, losses

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> tuple[Tensor, Tensor]:
        """anchors (M, 4); gt_boxes (N, G, 4); gt_valid (N, G).

        Returns labels (N, M) int8: 1 sampled positive, 0 sampled negative, -1 not sampled; and the
        regression targets (N, M, 4) (meaningful where label is 1).
        """
        n = gt_boxes.shape[0]
        anchors_per_image = anchors.unsqueeze(0).expand(n, -1, -1)  # (M, 4) -> (N, M, 4)
        # (N, M) each; never the whole (N, G, M) IoU at once (1.2 GB at batch 16 x 300 GT boxes).
        matched_idxs, match_labels = match_boxes(self.matcher, gt_boxes, gt_valid, anchors_per_image)
        sampled_pos, sampled_neg = sample_balanced(
            match_labels == 1, match_labels == 0, self.batch_size_per_image, self.positive_fraction
        )
        labels = torch.full_like(match_labels, -1)
        labels[sampled_neg] = 0
        labels[sampled_pos] = 1
        matched_boxes = torch.gather(gt_boxes, 1, matched_idxs.unsqueeze(-1).expand(-1, -1, 4))  # (N, M, 4)
        gt_deltas = self.box_coder.encode(anchors_per_image, matched_boxes)
        return labels, gt_deltas

    def losses(self, logits: Tensor, deltas: Tensor, gt_labels: Tensor, gt_deltas: Tensor) -> dict[str, Tensor]:
        """logits (N, M), deltas (N, M, 4); gt_labels (N, M) in {1, 0, -1}; gt_deltas (N, M, 4).

        Masks multiply instead of indexing, so there is no host-device sync here.
        """
        positive = (gt_labels == 1).to(torch.float32)
        sampled = (gt_labels >= 0).to(torch.float32)
        normalizer = float(self.batch_size_per_image * logits.shape[0])
        # Targets of non-positive anchors can be -inf (matched to the zero padding box of an image
        # without ground truth: log(0)). Zero them before the loss, not only mask the loss after
        # it: with smooth_l1_beta > 0 the backward pass would give 0 * inf = NaN gradients.
        gt_deltas = torch.where(positive[..., None] > 0, gt_deltas, torch.zeros_like(gt_deltas))
        loc = smooth_l1(deltas.float(), gt_deltas, self.smooth_l1_beta).sum(dim=-1)  # (N, M)
        loc = torch.where(positive > 0, loc, torch.zeros_like(loc))
        cls = F.binary_cross_entropy_with_logits(logits.float(), positive, reduction="none")  # (N, M)
        return {
            "loss_rpn_cls": (cls * sampled).sum() / normalizer * self.loss_weight,
            "loss_rpn_loc": loc.sum() / normalizer * self.loss_weight,
        }

    @torch.no_grad()
    def predict_proposals(
        self, anchors: Tensor, logits: Tensor, deltas: Tensor, image_sizes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """anchors (M, 4); logits (N, M); deltas (N, M, 4); image_sizes (N, 2).

        Per image: top-k logits -> decode -> clip -> drop empty or non-finite -> NMS -> top-k, with
        the functions of detkit.modeling.postprocess (which the exported graph calls too).
        Returns proposals (N, P, 4) with P = post-NMS top-k, and valid (N, P) bool.
        """
        n = logits.shape[0]
        mode = 0 if self.training else 1
        post_k = self.post_nms_topk[mode]
        top_logits, top_deltas, top_anchors = rpn_top_k(
            anchors, logits, deltas, self.pre_nms_topk[mode]
        )  # (N, T), (N*T, 4) x 2
        boxes = self.box_coder.decode(top_deltas, top_anchors).view(n, top_logits.shape[1], 4)  # (N*T, 4) -> (N, T, 4)
        boxes, keep = rpn_candidates(boxes, top_logits, image_sizes, self.min_box_size)  # (N, T, 4), (N, T)

        # NMS per image with Detectron2's very call (batched_nms, one group id). One call over all
        # images, the image index as the group, keeps nearly the same boxes but not Detectron2's:
        # torchvision then shifts each image's coordinates by index x (max + 1), which rounds them
        # (up to 1000 boxes on the CPU, 25000 on CUDA), or above that re-sorts the survivors of all
        # images with an unstable sort, so tied logits change order and the post-NMS top-k with
        # them. One NMS call and one host-device sync per image, as in Detectron2.
        flat_boxes = boxes.reshape(-1, 4)
        flat_logits = top_logits.reshape(-1)
        kept_per_image = torch.nonzero(keep.reshape(-1)).squeeze(1).split(keep.sum(dim=1).tolist())
        proposals = boxes.new_zeros((n, post_k, 4))
        valid = torch.zeros((n, post_k), dtype=torch.bool, device=logits.device)
        for i, kept in enumerate(kept_per_image):
            survivors = kept[nms_top_k(flat_boxes[kept], flat_logits[kept], None, self.nms_thresh, post_k, True)]
            proposals[i, : survivors.numel()] = flat_boxes[survivors]
            valid[i, : survivors.numel()] = True
        return proposals, valid


def smooth_l1(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """Elementwise smooth-L1; beta 0 is exactly L1 (as in Detectron2)."""
    diff = (pred - target).abs()
    if beta < 1e-5:
        return diff
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
