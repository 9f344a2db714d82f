"""A batch of images padded to one size, with each image's true sizes.

Shapes: N images; Hp x Wp the padded size (a multiple of `size_divisibility`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageBatch:
    """What the model eats.

    tensor:         (N, 3, Hp, Wp) uint8 or float, values 0..255, channels in the model's
                    `input_format` order (RGB or BGR), zero padded at the bottom/right.
    image_sizes:    (N, 2) int64 (h, w) of each image inside the padding: the frame of the targets.
    original_sizes: (N, 2) int64 (h, w) of each image before resizing; detections are rescaled from
                    image_sizes to these.
    """

    tensor: Tensor
    image_sizes: Tensor
    original_sizes: Tensor

    def __len__(self) -> int:
        return self.tensor.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def to(self, device, non_blocking: bool = False) -> ImageBatch:
        return ImageBatch(
            self.tensor.to(device, non_blocking=non_blocking),
            self.image_sizes.to(device, non_blocking=non_blocking),
            self.original_sizes.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> ImageBatch:
        return ImageBatch(self.tensor.pin_memory(), self.image_sizes.pin_memory(), self.original_sizes.pin_memory())

    @classmethod
    def from_tensors(
        cls,
        images: Sequence[Tensor],
        size_divisibility: int = 32,
        original_sizes: Sequence[Sequence[int]] | None = None,
    ) -> ImageBatch:
        """Pad a list of (3, H_i, W_i) images into one batch.

        original_sizes: per image (h, w) before any resize; defaults to the images' own sizes.
        """
        if len(images) == 0:
            raise ValueError("ImageBatch.from_tensors needs at least one image")
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i} must be a (3, H, W) tensor, got shape {tuple(img.shape)}")
        max_h = max(int(img.shape[1]) for img in images)
        max_w = max(int(img.shape[2]) for img in images)
        if size_divisibility > 1:
            max_h = int(math.ceil(max_h / size_divisibility) * size_divisibility)
            max_w = int(math.ceil(max_w / size_divisibility) * size_divisibility)
        first = images[0]
        batch = first.new_zeros((len(images), 3, max_h, max_w))
        for i, img in enumerate(images):
            batch[i, :, : img.shape[1], : img.shape[2]].copy_(img)
        sizes = torch.tensor([[int(img.shape[1]), int(img.shape[2])] for img in images], dtype=torch.int64)
        orig = (
            sizes.clone()
            if original_sizes is None
            else torch.as_tensor(original_sizes, dtype=torch.int64).reshape(-1, 2)
        )
        return cls(batch, sizes, orig)
