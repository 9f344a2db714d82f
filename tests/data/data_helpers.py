"""Helpers that write tiny COCO-format datasets and images for the data tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from detkit.config import DatasetConfig, load_config, replace


def write_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """A small random JPEG/PNG (by suffix) of the given size."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def write_coco(
    root: Path,
    images: Sequence[dict],
    annotations: Sequence[dict],
    categories: Sequence[dict],
    *,
    write_images: bool = True,
    skip_files: Sequence[str] = (),
) -> tuple[str, str]:
    """Write root/ann.json and root/images/<file_name> for each image (random pixels). Returns
    (ann_file, image_root). Annotations get ids 1.. and iscrowd 0 unless given."""
    image_root = root / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    if write_images:
        for i, img in enumerate(images):
            if img["file_name"] not in skip_files:
                write_image(image_root / img["file_name"], img["height"], img["width"], seed=i)
    anns = []
    for j, ann in enumerate(annotations):
        full = {"id": j + 1, "iscrowd": 0, "area": 1.0}
        full.update(ann)
        anns.append(full)
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": list(images), "annotations": anns, "categories": list(categories)}))
    return str(ann_file), str(image_root)


def images_table(sizes: Sequence[tuple[int, int]], suffix: str = ".jpg", first_id: int = 1) -> list[dict]:
    """[{id, file_name, height, width}] for (h, w) sizes."""
    return [
        {"id": first_id + i, "file_name": f"img{first_id + i}{suffix}", "height": h, "width": w}
        for i, (h, w) in enumerate(sizes)
    ]


def coco_config(ann_file: str, image_root: str, *, num_classes: int, test: tuple[str, str] | None = None, **changes):
    """A small CPU config training (and testing) on the given COCO files."""
    train = DatasetConfig(type="coco", name="tiny", ann_file=ann_file, image_root=image_root)
    test_ds = DatasetConfig(type="coco", name="tiny_test", ann_file=test[0], image_root=test[1]) if test else train
    base = {
        "device": "cpu",
        "model.num_classes": num_classes,
        "data.train": (train,),
        "data.test": (test_ds,),
        "data.min_size_train": (64,),
        "data.max_size_train": 128,
        "data.min_size_test": 64,
        "data.max_size_test": 128,
        "data.num_workers": 0,
        "data.pin_memory": False,
        "solver.ims_per_batch": 2,
        "test.ims_per_batch": 2,
    }
    base.update(changes)
    return replace(load_config(None), **base)
