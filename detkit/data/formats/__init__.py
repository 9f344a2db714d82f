"""Annotation formats of labelling tools -> one COCO-format dict; class selection and renaming.

    data = read_dataset("voc", "VOCdevkit/VOC2007", split="trainval")
    data = read_dataset("yolo", "mydata/data.yaml", split="val", classes=["car", "bus"])
    data = read_dataset("labelme", "annotated/", rename={"Car": "car"}, drop_empty_classes=True)
    data = read_dataset("cvat", "export/annotations.xml", skip_bad=True)
    write_coco_json(data, "mine.json")          # what pycocotools and `detkit.data.coco` read

The dict (the same for every format):
    {"images": [{"id" 1.., "file_name" (relative to image_root, or absolute), "width", "height",
                 "source": the annotation file}],
     "annotations": [{"id" 1.., "image_id", "category_id" 1..K, "bbox": [x, y, w, h] (COCO: 0-based
                      continuous pixels), "area", "iscrowd": 0, "source": "<file>:<line>" or
                      "<file>#shape<k>", and per format "difficult"/"truncated" (VOC), "occluded" (CVAT)}],
     "categories": [{"id" 1..K, "name"}], "image_root": folder, "problems": [{"source", "message"}],
     "ignored": [...] (shapes that are not boxes), "class_report": {...} (what the class options did)}

Readers keep boxes as written (a box outside its image or of zero size is not clipped or dropped
here: the loaders and the dataset check flag it). Input that cannot be parsed raises DataError
naming the file and line or shape and the fix; with skip_bad=True it is skipped and listed in
"problems" (and logged with its count).

Categories get ids 1..K in each format's documented order (VOC: the 20 VOC classes in their
standard order when every name is one of them, else sorted; YOLO: `names`; LabelMe: sorted; CVAT:
the labels of `meta`; COCO: sorted by id). Then, in this order:
  rename               {old: new}; two old names given one new name are merged into one class
  classes              keep these classes, in this order (ids 1..K follow it); boxes of the other
                       classes are left out (counted and logged); their images stay, as background.
                       A name the source does not list is an error, except for formats without a
                       class list (LabelMe, VOC with other names than VOC's), whose splits may lack
                       a class: `classes` gives train and test splits the same table
  drop_empty_classes   remove classes without a single box (always reported, e.g. the id-0
                       "umbrella" category some exporters add to a COCO file)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detkit.errors import DataError

logger = logging.getLogger(__name__)

FORMATS = ("coco", "voc", "yolo", "labelme", "cvat")

# Bumped when a reader's output changes, so converted files in the cache are rewritten.
READER_VERSION = 1


def read_dataset(
    format: str,
    path: str | os.PathLike,
    *,
    split: str = "",
    image_root: str = "",
    subset: str = "",
    classes: Sequence[str] = (),
    rename: Mapping[str, str] | None = None,
    drop_empty_classes: bool = False,
    skip_bad: bool = False,
) -> dict:
    """Read a dataset in `format` (one of FORMATS) into the COCO dict described above.

    path: VOC: a VOCdevkit year folder or a folder of XML files; YOLO: data.yaml or its folder;
    LabelMe: a folder of JSON files or one file; CVAT: annotations.xml or its folder; COCO: the json.
    split: VOC: ImageSets/Main/<split>.txt ("" = every XML); YOLO: the data.yaml key (default train).
    image_root: where file_names are relative to (defaults per format; COCO: the json's folder).
    subset: CVAT only: keep the images of this subset.
    """
    path = Path(path)
    if format == "voc":
        from detkit.data.formats.voc import read_voc

        data = read_voc(path, split=split, image_root=image_root, skip_bad=skip_bad)
    elif format == "yolo":
        from detkit.data.formats.yolo import read_yolo

        data = read_yolo(path, split=split or "train", skip_bad=skip_bad)
    elif format == "labelme":
        from detkit.data.formats.labelme import read_labelme

        data = read_labelme(path, image_root=image_root, skip_bad=skip_bad)
    elif format == "cvat":
        from detkit.data.formats.cvat import read_cvat

        data = read_cvat(path, image_root=image_root, subset=subset, skip_bad=skip_bad)
    elif format == "coco":
        data = _read_coco(path, image_root)
    else:
        raise DataError(f"unknown dataset format {format!r}: choose one of {', '.join(FORMATS)}")
    return apply_class_options(
        data, classes=classes, rename=rename or {}, drop_empty_classes=drop_empty_classes, where=str(path)
    )


def _read_coco(path: Path, image_root: str) -> dict:
    from detkit.data.coco import check_coco, raise_coco_errors, read_coco_dict

    data = read_coco_dict(path)
    raise_coco_errors(check_coco(data).errors, str(path))
    data["image_root"] = image_root or str(path.parent)
    data.setdefault("problems", [])
    return data


def apply_class_options(
    data: dict,
    *,
    classes: Sequence[str] = (),
    rename: Mapping[str, str] | None = None,
    drop_empty_classes: bool = False,
    where: str = "",
) -> dict:
    """Rename/merge, select and drop empty categories (see the module docstring); ids become 1..K.

    The categories' current order is their id order. Adds data["class_report"]: {"names": final
    names, "empty": classes without boxes (before dropping), "dropped": dropped empty classes,
    "left_out": {class: boxes left out by `classes`}}. Without options the dict is returned with
    its ids unchanged (a COCO file keeps its own ids).
    """
    rename = dict(rename or {})
    cats = sorted(data["categories"], key=lambda c: c["id"])
    names_before = [str(c["name"]) for c in cats]
    unknown = [old for old in rename if old not in names_before]
    if unknown:
        raise DataError(
            f"{where}: rename: {', '.join(map(repr, unknown))} not among the classes ({', '.join(names_before)})"
        )
    name_of_id = {c["id"]: rename.get(str(c["name"]), str(c["name"])) for c in cats}
    order: list[str] = []
    for c in cats:
        if name_of_id[c["id"]] not in order:
            order.append(name_of_id[c["id"]])
    if classes:
        missing = [c for c in classes if c not in order]
        # Formats without a class list (LabelMe, VOC with other names) only know the classes of the
        # boxes found: there `classes` may name one this split lacks (it becomes an empty class).
        if missing and data.get("class_source") != "found":
            raise DataError(
                f"{where}: classes: {', '.join(map(repr, missing))} not among the classes "
                f"({', '.join(order)}; after rename)"
            )
        if len(set(classes)) != len(classes):
            raise DataError(f"{where}: classes lists a name twice: {list(classes)}")
        order = list(classes)
    counts = Counter(name_of_id.get(a["category_id"]) for a in data["annotations"])
    left_out = {n: counts[n] for n in counts if n not in order and n is not None}
    empty = [n for n in order if counts[n] == 0]
    report = {"names": order, "empty": empty, "dropped": [], "left_out": left_out}
    if left_out:
        logger.info(
            "%s: %d boxes of classes not selected by `classes` left out (%s)",
            where,
            sum(left_out.values()),
            ", ".join(f"{n}: {k}" for n, k in left_out.items()),
        )
    if empty:
        logger.warning(
            "%s: %d classes without a single box: %s%s",
            where,
            len(empty),
            ", ".join(empty),
            " (dropped: drop_empty_classes)" if drop_empty_classes else " (drop_empty_classes: true removes them)",
        )
    if drop_empty_classes:
        report["dropped"] = empty
        order = [n for n in order if counts[n] > 0]
        report["names"] = order
    if not order:
        raise DataError(f"{where}: no classes left after the class options (classes, rename, drop_empty_classes)")
    changed = bool(rename or classes or report["dropped"])
    if not changed:
        data["class_report"] = report
        return data
    new_id = {n: i + 1 for i, n in enumerate(order)}
    annotations: list[dict] = []
    for ann in data["annotations"]:
        name = name_of_id.get(ann["category_id"])
        if name in new_id:
            annotations.append({**ann, "id": len(annotations) + 1, "category_id": new_id[name]})
    out = dict(data)
    out["annotations"] = annotations
    out["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(order)]
    out["class_report"] = report
    return out


def write_coco_json(data: dict, path: str | os.PathLike) -> Path:
    """`data` as a COCO json file, written atomically (a half-written file never appears)."""
    from detkit.utils.files import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(data))


# --------------------------------------------------------------------------------------------
# Config entries: converted once, cached as COCO json (what the loaders and the evaluator read)
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where converted datasets are kept: $DETKIT_CACHE_DIR, else $XDG_CACHE_HOME/detkit, else
    ~/.cache/detkit; files go to its `datasets/` folder."""
    base = os.environ.get("DETKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "detkit"
    )
    return Path(base) / "datasets"


def _fingerprint(paths: Sequence[Path]) -> str:
    """A hash of the names, sizes and modification times of every file under `paths`."""
    h = hashlib.sha1()
    for p in paths:
        if p.is_file():
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            continue
        for folder, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                try:
                    st = os.stat(os.path.join(folder, name))
                except OSError:
                    continue
                h.update(f"{folder}/{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _inputs(format: str, path: Path) -> list[Path]:
    """The files and folders whose change means a new conversion."""
    if format == "yolo":
        from detkit.data.formats.yolo import find_data_yaml, read_data_yaml

        yaml_file = find_data_yaml(path)
        _, root, _ = read_data_yaml(yaml_file)
        return [yaml_file, root]
    return [path]


_MEMO: dict[str, tuple[str, str]] = {}


def dataset_options(ds: Any) -> dict:
    """read_dataset's keyword arguments from a DatasetConfig entry."""
    return {
        "split": ds.split,
        "image_root": ds.image_root,
        "subset": ds.subset,
        "classes": tuple(ds.classes),
        "rename": dict(ds.rename),
        "drop_empty_classes": ds.drop_empty_classes,
        "skip_bad": ds.skip_bad,
    }


def converted_coco_json(format: str, path: str | os.PathLike, options: dict, name: str = "") -> tuple[str, str]:
    """(COCO json, image_root) of a dataset in `format`, converted on first use and cached.

    The json is kept in `cache_dir()` under a name made of the options and a fingerprint of the
    input files (names, sizes, modification times): an edited annotation gives a new conversion.
    """
    path = Path(path).absolute()
    key_text = json.dumps(
        [READER_VERSION, format, str(path), options, _fingerprint(_inputs(format, path))], sort_keys=True, default=str
    )
    digest = hashlib.sha1(key_text.encode()).hexdigest()[:16]
    if digest in _MEMO and Path(_MEMO[digest][0]).is_file():
        return _MEMO[digest]
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in (name or f"{format}_{path.name}"))
    out = cache_dir() / f"{stem}_{digest}.json"
    if out.is_file():
        with open(out, "rb") as f:
            image_root = json.load(f)["image_root"]
    else:
        data = read_dataset(format, path, **options)
        write_coco_json(data, out)
        image_root = data["image_root"]
        logger.info(
            "%s (%s): %d images, %d boxes, %d classes; converted to %s",
            path,
            format,
            len(data["images"]),
            len(data["annotations"]),
            len(data["categories"]),
            out,
        )
    _MEMO[digest] = (str(out), str(image_root))
    return _MEMO[digest]
