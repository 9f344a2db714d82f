"""Datasets, images, transforms and batched loading: image files and COCO json in, batches out.

    from detkit.data import build_train_loader, build_test_loader, get_dataset_info, read_image
    info = get_dataset_info(cfg, "train")            # class_names, category_ids, ann_file
    for images, targets, metas in build_train_loader(cfg, rank, world_size, start_iter): ...

Modules: image_io (files -> uint8 arrays), coco (COCO json -> validated records), formats (Pascal
VOC, YOLO, LabelMe and CVAT annotations -> COCO dicts), synthetic (the shapes dataset), transforms
(albumentations with boxes), datasets (config entries -> records and class names), loader
(samplers, collate, the two loaders).

The names below are imported on first use, so `import detkit.data.synthetic` (which the shapes
generator's worker processes do) does not pull in torch and albumentations.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "read_image": "image_io",
    "decode_image": "image_io",
    "load_coco_json": "coco",
    "read_dataset": "formats",
    "DetectionRecords": "coco",
    "ImageRecord": "coco",
    "ensure_shapes_dataset": "synthetic",
    "ShapesParams": "synthetic",
    "SHAPE_NAMES": "synthetic",
    "build_train_transform": "transforms",
    "build_test_transform": "transforms",
    "DetectionTransform": "transforms",
    "DatasetInfo": "datasets",
    "get_dataset_info": "datasets",
    "build_train_loader": "loader",
    "build_test_loader": "loader",
    "TrainingBatchSampler": "loader",
    "InferenceBatchSampler": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'detkit.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"detkit.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
