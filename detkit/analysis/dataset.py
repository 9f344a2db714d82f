"""A dataset before any training: box statistics, and how well the RPN's anchors cover its boxes.

    stats = box_statistics(gt)                                    # gt: load_ground_truth()'s dict
    coverage = anchor_coverage(gt, sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1, 2), stride=16,
                               min_size=800, max_size=1333)
    coverage.share_at(0.7)                                        # share of boxes some anchor reaches 0.7

Shapes: G ground-truth boxes (crowd boxes excluded), A cell anchors (len(sizes) * len(ratios)).

Anchor coverage is the question the RPN's matcher asks: a box whose best anchor reaches IoU 0.7 has
a positive anchor by threshold; below 0.3 only the "best anchor of each box" rule makes one positive
(and that anchor regresses far). Each box is scaled as the test transform resizes its image
(`resized_hw`: short side `min_size`, long side at most `max_size`), then compared with the anchors
of detkit's grid (anchors.py: centres at (j * stride, i * stride), one row/column per stride of the
resized image). IoU falls monotonically as an anchor's centre moves away from the box's centre in
either axis, so the best anchor of each shape sits at the grid point nearest the box centre, and the
best over the A shapes there is the best of the whole grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from detkit.data.transforms import resized_hw
from detkit.engine.eval_common import _unique_names
from detkit.modeling.anchors import cell_anchors

# COCO's area ranges (pixels^2 of the original image), the ones APs / APm / APl use.
SIZE_RANGES = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, float("inf"))}
COVERAGE_THRESHOLDS = (0.7, 0.5, 0.3)


def _objects(gt: dict) -> list[dict]:
    return [a for a in gt["annotations"] if not a.get("iscrowd", 0)]


def size_name(area: float) -> str:
    """COCO's size class of a box area (pixels^2): small < 32^2 <= medium < 96^2 <= large."""
    return next(name for name, (lo, hi) in SIZE_RANGES.items() if lo <= area < hi)


@dataclass
class BoxStatistics:
    """boxes_per_image: (I,); category_index, widths, heights, areas: (G,) (original pixels;
    area as the annotation gives it); class_names: K names in category-id order."""

    boxes_per_image: np.ndarray
    category_index: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    areas: np.ndarray
    class_names: list[str]

    @property
    def class_counts(self) -> np.ndarray:
        """(K,) boxes per class."""
        return np.bincount(self.category_index, minlength=len(self.class_names))

    def summary(self) -> dict:
        sizes = {name: int(sum(size_name(a) == name for a in self.areas)) for name in SIZE_RANGES}
        return {
            "images": int(self.boxes_per_image.size),
            "boxes": int(self.widths.size),
            "images_without_boxes": int((self.boxes_per_image == 0).sum()),
            "boxes_per_image_mean": float(self.boxes_per_image.mean()) if self.boxes_per_image.size else 0.0,
            "boxes_per_image_max": int(self.boxes_per_image.max()) if self.boxes_per_image.size else 0,
            "class_counts": dict(zip(self.class_names, self.class_counts.tolist())),
            "size_counts": sizes,
        }


def box_statistics(gt: dict) -> BoxStatistics:
    """Counts, sizes and classes of the non-crowd boxes of a COCO ground-truth dict."""
    objects = _objects(gt)
    category_ids = sorted(c["id"] for c in gt["categories"])
    index = {c: i for i, c in enumerate(category_ids)}
    names = _unique_names(gt["categories"])
    per_image = {img["id"]: 0 for img in gt["images"]}
    for obj in objects:
        per_image[obj["image_id"]] += 1
    boxes = np.array([obj["bbox"] for obj in objects], dtype=np.float64).reshape(-1, 4)
    return BoxStatistics(
        boxes_per_image=np.array(list(per_image.values()), dtype=np.int64),
        category_index=np.array([index[o["category_id"]] for o in objects], dtype=np.int64),
        widths=boxes[:, 2],
        heights=boxes[:, 3],
        areas=np.array([o["area"] for o in objects], dtype=np.float64),
        class_names=[names[c] for c in category_ids],
    )


def best_anchor_iou(
    boxes_xyxy: torch.Tensor,
    image_sizes_hw: torch.Tensor,
    *,
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    stride: int,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best IoU of each box with any anchor of its image's grid, and that anchor's shape index.

    boxes_xyxy: (G, 4) at the network's input scale; image_sizes_hw: (G, 2) the (resized) size of
    each box's image, which sets the grid extent (ceil(size / stride) points per axis).
    Returns ((G,) IoU, (G,) index into the A cell anchors).
    """
    cells = cell_anchors(sizes, aspect_ratios).double()  # (A, 4) centred at 0
    boxes = boxes_xyxy.double()
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (G, 2) x, y
    grid_max = torch.ceil(image_sizes_hw.double().flip(1) / stride) - 1  # (G, 2) last x, y grid index
    nearest = torch.round(centres / stride - offset).clamp(min=torch.zeros_like(grid_max), max=grid_max)
    anchor_centres = (nearest + offset) * stride  # (G, 2)
    # (G, 1, 4) + (1, A, 4) -> (G, A, 4): the A anchor shapes at each box's nearest grid point.
    anchors = anchor_centres.repeat(1, 2)[:, None, :] + cells[None, :, :]
    lt = torch.maximum(boxes[:, None, :2], anchors[:, :, :2])  # (G, A, 2)
    rb = torch.minimum(boxes[:, None, 2:], anchors[:, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)  # (G, A)
    area_boxes = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)  # (G,)
    area_cells = (cells[:, 2:] - cells[:, :2]).prod(dim=1)  # (A,)
    ious = inter / (area_boxes[:, None] + area_cells[None, :] - inter)  # (G, A)
    if ious.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    best, which = ious.max(dim=1)
    return best, which


@dataclass
class AnchorCoverage:
    """best_iou, best_anchor: (G,); boxes_xyxy: (G, 4) at the input scale; category_index, areas:
    (G,) as in BoxStatistics; anchor_wh: (A, 2) the cell anchors' width and height."""

    best_iou: np.ndarray
    best_anchor: np.ndarray
    boxes_xyxy: np.ndarray
    category_index: np.ndarray
    areas: np.ndarray
    image_ids: np.ndarray
    class_names: list[str]
    anchor_wh: np.ndarray
    scale_note: str

    def share_at(self, threshold: float, mask: np.ndarray | None = None) -> float:
        """Share (0..1) of the boxes (of `mask`) whose best anchor IoU is >= threshold; NaN if none."""
        values = self.best_iou if mask is None else self.best_iou[mask]
        return float((values >= threshold).mean()) if values.size else float("nan")

    def table(self, thresholds: Sequence[float] = COVERAGE_THRESHOLDS) -> list[dict]:
        """Rows {"group", "boxes", "IoU>=t": share in percent}: all boxes, each class, each size."""
        groups = [("all", np.ones(self.best_iou.shape, dtype=bool))]
        groups += [(name, self.category_index == k) for k, name in enumerate(self.class_names)]
        sizes = np.array([size_name(a) for a in self.areas])
        groups += [(f"size {name}", sizes == name) for name in SIZE_RANGES]
        return [
            {
                "group": name,
                "boxes": int(mask.sum()),
                **{f"IoU>={t:g}": self.share_at(t, mask) * 100 for t in thresholds},
            }
            for name, mask in groups
        ]


def anchor_coverage(
    gt: dict,
    *,
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    stride: int,
    min_size: int,
    max_size: int,
    offset: float = 0.0,
) -> AnchorCoverage:
    """Best anchor IoU of every non-crowd box after the test resize (module docstring)."""
    stats = box_statistics(gt)
    images = {img["id"]: img for img in gt["images"]}
    objects = _objects(gt)
    boxes, image_hw = [], []
    for obj in objects:
        img = images[obj["image_id"]]
        height, width = int(img["height"]), int(img["width"])
        new_h, new_w = resized_hw(height, width, min_size, max_size)
        sx, sy = new_w / width, new_h / height
        x, y, w, h = obj["bbox"]
        boxes.append([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
        image_hw.append([new_h, new_w])
    boxes_t = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    best, which = best_anchor_iou(
        boxes_t,
        torch.tensor(image_hw, dtype=torch.float64).reshape(-1, 2),
        sizes=sizes,
        aspect_ratios=aspect_ratios,
        stride=stride,
        offset=offset,
    )
    cells = cell_anchors(sizes, aspect_ratios).numpy()
    return AnchorCoverage(
        best_iou=best.numpy(),
        best_anchor=which.numpy(),
        boxes_xyxy=boxes_t.numpy(),
        category_index=stats.category_index,
        areas=stats.areas,
        image_ids=np.array([o["image_id"] for o in objects], dtype=np.int64),
        class_names=stats.class_names,
        anchor_wh=np.stack([cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]], axis=1),
        scale_note=f"boxes resized as the test transform does (short side {min_size}, long side <= {max_size}); "
        f"anchors sizes {list(sizes)}, ratios {list(aspect_ratios)}, stride {stride}",
    )
