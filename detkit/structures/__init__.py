from detkit.structures.boxes import (
    BoxCoder,
    batched_box_iou,
    box_area,
    clip_boxes,
    nonempty_mask,
    pad_targets,
    rank_within_groups,
)
from detkit.structures.image_batch import ImageBatch

__all__ = [
    "BoxCoder",
    "ImageBatch",
    "batched_box_iou",
    "box_area",
    "clip_boxes",
    "nonempty_mask",
    "pad_targets",
    "rank_within_groups",
]
