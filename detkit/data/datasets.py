"""Datasets named in the config -> records, class names and the category id mapping.

A dataset is a `DatasetConfig` entry under `data.train` or `data.test`; there is no registration
step. Type `coco` points at an annotation json and an image folder; type `shapes` generates the
synthetic set on first use (detkit.data.synthetic) and then reads it like any COCO json; types
`voc`, `yolo`, `labelme` and `cvat` read what a labelling tool wrote (`path`) and convert it once
to a cached COCO json (detkit.data.formats), which the loaders and the evaluator then read.

    info = get_dataset_info(cfg, "train")   # DatasetInfo(class_names, category_ids, ...)

Several training datasets are concatenated; they must share one category table (the same ids with
the same names), because the contiguous labels 0..K-1 are the model's classifier outputs.
Relative paths are taken from the current directory, and when nothing is there from the detkit
checkout (so `datasets/coco/...` works from anywhere in a source install).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from detkit.config import Config, DatasetConfig
from detkit.data.coco import CocoDataset, DetectionRecords, load_coco_json_cached
from detkit.data.synthetic import ensure_shapes_dataset, params_from_config
from detkit.errors import DataError

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DatasetInfo:
    """What the model, the checkpoint and the evaluator need to know about a split.

    class_names[label] and category_ids[label] for each contiguous label in [0, K); ann_file is the
    COCO json of the (first) dataset of the split: the ground truth for evaluation.
    """

    class_names: list[str]
    category_ids: list[int]
    ann_file: str
    image_root: str
    num_images: int
    dataset_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def resolve_path(path: str | os.PathLike) -> Path:
    """A user path: absolute as given, else from the current directory, else from the checkout."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.absolute()
    alt = PROJECT_ROOT / p
    return alt if alt.exists() else p.absolute()


def has_class_options(ds: DatasetConfig) -> bool:
    return bool(ds.classes or ds.rename or ds.drop_empty_classes)


def dataset_files(ds: DatasetConfig) -> tuple[str, str]:
    """(ann_file, image_root) of a dataset entry, as COCO json + image folder.

    A shapes entry is generated here when missing; a voc / yolo / labelme / cvat entry (and a coco
    entry with class options) is converted to a cached COCO json (detkit.data.formats).
    """
    from detkit.data import formats

    if ds.type == "shapes":
        root = Path(ds.root).expanduser()
        return ensure_shapes_dataset(params_from_config(ds), root if root.is_absolute() else Path.cwd() / root)
    if ds.type == "coco" and not has_class_options(ds):
        return str(resolve_path(ds.ann_file)), str(resolve_path(ds.image_root))
    source = ds.ann_file if ds.type == "coco" else ds.path
    if not source:
        key = "ann_file" if ds.type == "coco" else "path"
        raise DataError(
            f"dataset {ds.name or ds.type!r} (type {ds.type}) has no {key}: set {key}: to "
            + ("its COCO json" if ds.type == "coco" else "the folder or file the labelling tool wrote")
        )
    options = formats.dataset_options(ds)
    if options["image_root"]:
        options["image_root"] = str(resolve_path(options["image_root"]))
    if ds.type == "coco" and not options["image_root"]:
        raise DataError(f"dataset {ds.name or 'coco'!r} has no image_root: set image_root: to its image folder")
    return formats.converted_coco_json(ds.type, resolve_path(source), options, name=ds.name)


def load_dataset(ds: DatasetConfig) -> CocoDataset:
    """Load (or generate, or convert, and load) one dataset entry, validated; cached while the json
    is unchanged."""
    ann_file, image_root = dataset_files(ds)
    default_name = (
        f"shapes_{ds.split}" if ds.type == "shapes" else (f"{ds.type}_{ds.split}" if ds.type != "coco" else "")
    )
    return load_coco_json_cached(ann_file, image_root, name=ds.name or default_name)


def _entries(cfg: Config, split: str) -> Sequence[DatasetConfig]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    entries = cfg.data.train if split == "train" else cfg.data.test
    if not entries:
        raise DataError(
            f"no {split} dataset configured: add an entry under data.{split} (a COCO json + image folder, or "
            f"{{type: shapes}} for the synthetic set; see configs/shapes_r18.yaml and datasets/README.md)"
        )
    return entries


def check_same_categories(datasets: Sequence[CocoDataset]) -> None:
    """Concatenated datasets must share one category table; DataError otherwise."""
    first = datasets[0]
    for other in datasets[1:]:
        if other.category_ids != first.category_ids or other.class_names != first.class_names:
            raise DataError(
                f"datasets {first.name!r} ({first.ann_file}) and {other.name!r} ({other.ann_file}) have different categories "
                f"({len(first.category_ids)} vs {len(other.category_ids)}; first differing: "
                f"{_first_difference(first, other)}); datasets trained together need the same category ids and names"
            )


def _first_difference(a: CocoDataset, b: CocoDataset) -> str:
    pairs_a = list(zip(a.category_ids, a.class_names))
    pairs_b = list(zip(b.category_ids, b.class_names))
    for i in range(max(len(pairs_a), len(pairs_b))):
        pa = pairs_a[i] if i < len(pairs_a) else None
        pb = pairs_b[i] if i < len(pairs_b) else None
        if pa != pb:
            return f"{pa} vs {pb}"
    return "none"


def check_num_classes(cfg: Config, num_dataset_classes: int, what: str, empty_classes: Sequence[str] = ()) -> None:
    """model.num_classes must equal the dataset's category count: one DataError saying both (and
    naming the classes without a box, which a labelling tool's export may add)."""
    if cfg.model.num_classes != num_dataset_classes:
        hint = (
            f"; {len(empty_classes)} of them have no box ({', '.join(empty_classes[:10])}): "
            "drop_empty_classes: true on the dataset entry removes them"
            if empty_classes
            else ""
        )
        raise DataError(
            f"model.num_classes is {cfg.model.num_classes} but {what} has {num_dataset_classes} categories; "
            f"set model.num_classes: {num_dataset_classes} in the config (or pass model.num_classes={num_dataset_classes})"
            + hint
        )


def load_split(
    cfg: Config, split: Literal["train", "test"], dataset: DatasetConfig | None = None
) -> tuple[list[CocoDataset], DetectionRecords]:
    """The datasets of a split and their records (train: all concatenated; test: the first, or `dataset`).

    Checks the category tables against each other and against model.num_classes.
    """
    entries = [dataset] if dataset is not None else list(_entries(cfg, split))
    if split == "test":
        entries = entries[:1]
    datasets = [load_dataset(ds) for ds in entries]
    check_same_categories(datasets)
    names = ", ".join(repr(d.name) for d in datasets)
    records = DetectionRecords.concat([d.records for d in datasets])
    if cfg.model.num_classes != len(datasets[0].category_ids):
        counts = np.bincount(records.labels, minlength=len(datasets[0].category_ids))
        empty = [n for n, k in zip(datasets[0].class_names, counts) if k == 0]
        check_num_classes(cfg, len(datasets[0].category_ids), f"the {split} data ({names})", empty)
    return datasets, records


def get_dataset_info(cfg: Config, split: Literal["train", "test"] = "train") -> DatasetInfo:
    """Class names, category ids and the evaluation json of a split (generating shapes if needed).

    Raises DataError when model.num_classes differs from the dataset's category count.
    """
    datasets, records = load_split(cfg, split)
    first = datasets[0]
    return DatasetInfo(
        class_names=list(first.class_names),
        category_ids=list(first.category_ids),
        ann_file=first.ann_file,
        image_root=first.image_root,
        num_images=len(records),
        dataset_names=[d.name for d in datasets],
    )
