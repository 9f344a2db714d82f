"""Faster R-CNN with a ResNet C4 backbone: the one file that wires all stages.

Shapes: N images; Hp x Wp padded input; G padded ground-truth slots; P proposals per image.

Input (`forward(images, targets=None)`):
  images: an `ImageBatch` (what detkit's loaders give) or a list of (3, H, W) tensors, values
    0..255 (uint8 or float), channels in `input_format` order (RGB for torchvision weights, BGR
    for MSRA/Detectron2 weights), already resized: the model does not resize. A list is padded to a
    multiple of 32 and its outputs are in the pixels of the given tensors.
  targets (training): per image {"boxes": (G_i, 4) xyxy in input pixels, "labels": (G_i,) in [0, K)}.
Output: training -> {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"} scalars;
  eval -> per image {"boxes": (D, 4) xyxy in original pixels, "scores": (D,), "labels": (D,)}.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.modeling.backbone import ResNetTrunk
from detkit.modeling.roi_heads import Res5ROIHeads
from detkit.modeling.rpn import RPN
from detkit.structures.boxes import pad_targets
from detkit.structures.image_batch import ImageBatch


class FasterRCNN(nn.Module):
    pixel_mean: Tensor  # (1, 3, 1, 1) buffer, registered in __init__
    pixel_std: Tensor  # (1, 3, 1, 1) buffer

    def __init__(
        self,
        *,
        backbone: ResNetTrunk,
        rpn: RPN,
        roi_heads: Res5ROIHeads,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        size_divisibility: int = 32,
        batch_invariant: bool = True,
    ):
        """batch_invariant: at test time, give each image of a batch the detections it gets alone
        (own_sizes, docs/numerics.md "Batch-invariant inference"); False runs the padded batch as
        one tensor through every stage, as Detectron2 does (then the padding changes an image's
        detections). Training is the same either way."""
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.batch_invariant = batch_invariant
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes

    def forward(self, images: ImageBatch | Sequence[Tensor], targets: Sequence[dict] | None = None):
        if not isinstance(images, ImageBatch):
            images = ImageBatch.from_tensors(list(images), self.size_divisibility)
        device = self.pixel_mean.device
        own = None
        if not self.training and self.batch_invariant:
            own = self.own_sizes(images.image_sizes, images.tensor.shape[-2:])  # (N, 2), or None: no image is padded
        images = images.to(device, non_blocking=True)
        image_sizes = images.image_sizes
        x = self.normalize(images)
        if own is not None:
            own = own.to(device)
            features = self.backbone(x, own)  # (N, C4, Hp/16, Wp/16), zero outside each image's own map
            grid_sizes = torch.div(own + (self.backbone.stride - 1), self.backbone.stride, rounding_mode="floor")
            proposals, proposals_valid, _ = self.rpn(features, image_sizes, grid_sizes=grid_sizes)
            return self.roi_heads(
                features,
                proposals,
                proposals_valid,
                image_sizes,
                original_sizes=images.original_sizes,
                feature_sizes=grid_sizes,
            )
        features = self.backbone(x)  # (N, C4, Hp/16, Wp/16)

        if self.training:
            if targets is None or len(targets) != len(images):
                raise ValueError("training needs one target dict per image")
            gt_boxes, gt_labels, gt_valid = pad_targets(
                [t["boxes"] for t in targets], [t["labels"] for t in targets], device
            )
            proposals, proposals_valid, rpn_losses = self.rpn(features, image_sizes, gt_boxes, gt_valid)
            roi_losses = self.roi_heads(
                features,
                proposals,
                proposals_valid,
                image_sizes,
                gt_boxes=gt_boxes,
                gt_labels=gt_labels,
                gt_valid=gt_valid,
            )
            return {**rpn_losses, **roi_losses}

        proposals, proposals_valid, _ = self.rpn(features, image_sizes)
        return self.roi_heads(features, proposals, proposals_valid, image_sizes, original_sizes=images.original_sizes)

    def own_sizes(self, image_sizes: Tensor, padded_hw: Sequence[int]) -> Tensor | None:
        """The size each image is padded to when it runs alone: image_sizes (N, 2) (h, w) rounded up
        to `size_divisibility`, at most the batch's padded_hw (Hp, Wp). None when every image fills
        the batch (one image, or all of one padded size): the batch is then each image's own input.

        Its detections alone are the reference of batch-invariant inference: the padding beyond
        this size is kept out of every stage (ResNetTrunk.forward, RPN.predict_proposals_per_image,
        Res5ROIHeads.box_features). One host-device sync when the sizes live on a GPU.
        """
        sizes = image_sizes.to(torch.int64)
        d = self.size_divisibility
        if d > 1:
            sizes = torch.div(sizes + (d - 1), d, rounding_mode="floor") * d
        sizes = torch.minimum(sizes, torch.tensor(list(padded_hw), dtype=torch.int64, device=sizes.device))
        if bool((sizes == sizes.new_tensor(list(padded_hw))).all()):
            return None
        return sizes

    def normalize(self, images: ImageBatch) -> Tensor:
        """(N, 3, Hp, Wp) 0..255 -> (pixel - mean) / std, with the padding set to 0 after normalising
        (as Detectron2 pads normalised images)."""
        x = (images.tensor.float() - self.pixel_mean) / self.pixel_std
        hp, wp = x.shape[-2:]
        rows = torch.arange(hp, device=x.device)[None, :, None] < images.image_sizes[:, 0, None, None]  # (N, Hp, 1)
        cols = torch.arange(wp, device=x.device)[None, None, :] < images.image_sizes[:, 1, None, None]  # (N, 1, Wp)
        x = x * (rows & cols)[:, None].to(x.dtype)  # (N, Hp, Wp) -> (N, 1, Hp, Wp) mask
        if self.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        return x
