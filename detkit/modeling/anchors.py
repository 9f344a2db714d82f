"""Anchors on the single res4 feature map.

Shapes: A anchors per location (len(sizes) * len(aspect_ratios), 15 by default), H x W the feature
grid, M = H * W * A anchors per image.

Layout (Detectron2's, so its checkpoints give the same outputs): the A cell anchors are ordered
size-major, ratio-minor and centred at 0 (offset 0: the anchor of grid cell (i, j) is centred at
(j * stride, i * stride)); the M anchors are location-major, row by row, the A anchors of one
location consecutive, which is the order of the RPN head's outputs after
(N, A, H, W) -> (N, H, W, A) -> (N, M).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """(A, 4) xyxy anchors centred at (0, 0); area size**2 and height / width = ratio."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    """Anchors for one feature map of a given stride."""

    cell_anchors: Tensor  # (A, 4) buffer, registered in __init__

    def __init__(self, *, sizes: Sequence[float], aspect_ratios: Sequence[float], stride: int, offset: float = 0.0):
        super().__init__()
        self.stride = stride
        self.offset = offset
        self.register_buffer("cell_anchors", cell_anchors(sizes, aspect_ratios), persistent=False)
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return self.cell_anchors.shape[0]

    def forward(self, grid_hw: tuple[int, int]) -> Tensor:
        """(M, 4) anchors of an H x W grid, M = H * W * A; cached per grid size and device."""
        key = (int(grid_hw[0]), int(grid_hw[1]), self.cell_anchors.device)
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = self._grid_anchors(*key[:2])
            if len(self._cache) > 64:  # many input sizes in training: keep the cache bounded
                self._cache.clear()
            self._cache[key] = anchors
        return anchors

    def _grid_anchors(self, height: int, width: int) -> Tensor:
        device = self.cell_anchors.device
        shifts_x = torch.arange(width, dtype=torch.float32, device=device) * self.stride + self.offset * self.stride
        shifts_y = torch.arange(height, dtype=torch.float32, device=device) * self.stride + self.offset * self.stride
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")  # (H, W) each
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
        # (H*W, 1, 4) + (1, A, 4) -> (H*W*A, 4), location-major.
        return (shifts + self.cell_anchors.reshape(1, -1, 4)).reshape(-1, 4)
