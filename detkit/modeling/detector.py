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
        if not self.training and self.batch_invariant and len(images) > 1:
            return self.per_image(images)
        images = images.to(device, non_blocking=True)
        image_sizes = images.image_sizes
        x = self.normalize(images)
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

    def own_sizes(self, image_sizes: Tensor, padded_hw: Sequence[int]) -> list[tuple[int, int]]:
        """The (h, w) each image is padded to when it runs alone: image_sizes (N, 2) rounded up to
        `size_divisibility`, at most the batch's padded_hw (Hp, Wp)."""
        d = max(self.size_divisibility, 1)
        return [
            (min(-(-h // d) * d, int(padded_hw[0])), min(-(-w // d) * d, int(padded_hw[1])))
            for h, w in image_sizes.tolist()
        ]

    def per_image(self, images: ImageBatch) -> list[dict[str, Tensor]]:
        """Test-time batch invariance: each image runs as a batch of its own, cropped to the size it
        is padded to alone (own_sizes), so its detections are exactly its detections alone.

        Not one padded tensor: the padding beyond an image holds relu(BN shift) after the first
        layer (not the zeros its convolutions read at its border alone), anchors, and the rows its
        RoIAlign would interpolate with; and even zeroing all of that in the batch (tried: a mask
        after every layer, the RPN and RoIAlign on each image's own grid) leaves the convolution
        kernels' summation order, which depends on the batch size on the CPU (up to 9e-5 in score
        and 2e-3 px on an R101-C4). docs/numerics.md, "Batch-invariant inference", has the costs.
        Returns one detection dict per image (`forward`'s test-time output).
        """
        detections: list[dict[str, Tensor]] = []
        sizes = self.own_sizes(images.image_sizes, images.tensor.shape[-2:])
        for i, (h, w) in enumerate(sizes):
            one = ImageBatch(
                images.tensor[i : i + 1, :, :h, :w], images.image_sizes[i : i + 1], images.original_sizes[i : i + 1]
            )
            detections.extend(self.forward(one))  # forward, not __call__: the batch's hooks ran once already
        return detections

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
