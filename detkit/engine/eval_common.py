"""What the COCO and the VOC evaluators share: reading and checking ground truth and predictions
(the same rules and messages for both metrics), and the markdown tables their reports print.

detkit.engine.evaluator re-exports these names; both evaluators import them from here, so neither
imports the other.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detkit.data.coco import check_coco, degenerate_box_examples, raise_coco_errors, read_coco_dict, read_json
from detkit.errors import DataError

logger = logging.getLogger(__name__)

# How many offending entries an error message shows.
_MAX_EXAMPLES = 5

# --------------------------------------------------------------------------------------------
# Reading and checking ground truth and predictions
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _bbox_problem(bbox: Any) -> str | None:
    """Why `bbox` is not a usable [x, y, w, h], or None when it is."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox must be a list of 4 numbers [x, y, w, h], got {bbox!r}"
    if not all(_is_number(v) and math.isfinite(v) for v in bbox):
        return f"bbox values must be finite numbers, got {bbox!r}"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"bbox width and height must be >= 0 ([x, y, w, h], not [x1, y1, x2, y2]?), got {bbox!r}"
    return None


def load_ground_truth(ann_file: str | Path) -> dict:
    """Read and check a COCO instances json; returns the dataset dict ready for COCOeval.

    The same rules as the training and test loaders (`detkit.data.coco.check_coco`): the same
    errors, raised together, and degenerate boxes (w or h <= 0, non-finite, not 4 numbers) left
    out with the same warning (no detection can match them). Also fixes two things pycocotools
    gets wrong silently, with a warning: annotations without "area" get w*h (COCOeval needs it for
    the area ranges), and annotation ids that are missing, 0 or duplicated are renumbered 1..N
    (COCOeval keys matches by id, and id 0 reads as "unmatched").
    """
    data = read_coco_dict(ann_file, "ground-truth")
    return prepare_ground_truth(data, str(ann_file), errors_heading=f"ground-truth file {ann_file}")


def prepare_ground_truth(data: dict, source: str, errors_heading: str | None = None) -> dict:
    """`load_ground_truth` for a COCO-format dict already in memory (a dataset reader's output).

    `source` names the data in messages (errors_heading, default "ground truth <source>", heads the
    list of errors). The dict and its annotations are changed in place.
    """
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{source}: the COCO key {key!r} is missing or not a list")
    if not isinstance(data.setdefault("annotations", []), list):
        raise DataError(f"{source}: the COCO key 'annotations' must be a list")
    index = check_coco(data)
    raise_coco_errors(index.errors, errors_heading or f"ground truth {source}")
    annotations = data["annotations"]
    if index.degenerate.any():
        logger.warning(
            "%s: %d boxes with w or h <= 0 or non-finite values dropped (first: %s)",
            source,
            int(index.degenerate.sum()),
            ", ".join(degenerate_box_examples(annotations, index.degenerate)),
        )
        annotations = [ann for ann, bad in zip(annotations, index.degenerate) if not bad]
    filled_area = 0
    for ann in annotations:
        if not _is_number(ann.get("area")):
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
            filled_area += 1
    if filled_area:
        logger.warning("%s: %d annotations had no 'area'; using bbox w*h", source, filled_area)
    ann_ids = [ann.get("id") for ann in annotations]
    if any(not _is_int(a) or a == 0 for a in ann_ids) or len(set(ann_ids)) != len(ann_ids):
        logger.warning("%s: annotation ids are missing, 0 or duplicated; renumbering them 1..N", source)
        for new_id, ann in enumerate(annotations, start=1):
            ann["id"] = new_id
    data["annotations"] = annotations
    return data


def load_predictions(path: str | Path) -> list[dict]:
    """Read a COCO results json (a list of {image_id, category_id, bbox, score})."""
    data = read_json(path, "predictions")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        raise DataError(
            f"predictions file {path} is a COCO dataset dict; a results file is a plain JSON list of "
            '{"image_id", "category_id", "bbox", "score"} entries'
        )
    if not isinstance(data, list):
        raise DataError(
            f"predictions file {path} must hold a JSON list of "
            f'{{"image_id", "category_id", "bbox", "score"}} entries, got {type(data).__name__}'
        )
    return data


def check_predictions(
    predictions: Sequence[Any],
    image_ids: Iterable[int],
    category_ids: Iterable[int],
    source: str = "predictions",
) -> list[dict]:
    """Validate COCO results against a ground truth; returns fresh, minimal dicts for COCOeval.

    Raises DataError naming up to 5 offenders: entries that are not dicts or lack a field, ids that
    are not integers, a bbox that is not 4 finite numbers with w, h >= 0, a non-finite score, image
    ids not in the ground truth, category ids not in the ground truth.
    """
    known_images = set(image_ids)
    known_categories = set(category_ids)
    malformed: list[str] = []
    unknown_images: dict[int, int] = {}
    unknown_categories: dict[int, int] = {}
    checked: list[dict] = []
    for i, pred in enumerate(predictions):
        problem = None
        if not isinstance(pred, dict):
            problem = f"is a {type(pred).__name__}, not a dict"
        else:
            missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in pred]
            if missing:
                problem = f"lacks {', '.join(missing)}"
            elif not _is_int(pred["image_id"]):
                problem = f"image_id must be an integer, got {pred['image_id']!r}"
            elif not _is_int(pred["category_id"]):
                problem = f"category_id must be an integer, got {pred['category_id']!r}"
            elif not (_is_number(pred["score"]) and math.isfinite(pred["score"])):
                problem = f"score must be a finite number, got {pred['score']!r}"
            else:
                problem = _bbox_problem(pred["bbox"])
        if problem:
            malformed.append(f"[{i}] {problem}")
            continue
        image_id, category_id = int(pred["image_id"]), int(pred["category_id"])
        if image_id not in known_images:
            unknown_images[image_id] = unknown_images.get(image_id, 0) + 1
        if category_id not in known_categories:
            unknown_categories[category_id] = unknown_categories.get(category_id, 0) + 1
        x, y, w, h = (float(v) for v in pred["bbox"])
        # The fields pycocotools' loadRes sets for bbox results (the polygon is not needed for boxes).
        checked.append(
            {
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [x, y, w, h],
                "score": float(pred["score"]),
                "area": w * h,
                "id": len(checked) + 1,
                "iscrowd": 0,
            }
        )
    if malformed:
        shown = "; ".join(malformed[:_MAX_EXAMPLES])
        raise DataError(
            f"{source}: {len(malformed)} of {len(predictions)} entries are malformed: {shown}. Each entry must "
            'be {"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}'
        )
    if unknown_images:
        shown = ", ".join(str(k) for k in sorted(unknown_images)[:_MAX_EXAMPLES])
        raise DataError(
            f"{source}: {sum(unknown_images.values())} predictions name {len(unknown_images)} image ids that "
            f"are not in the ground truth (e.g. {shown}); were they made on another dataset or split?"
        )
    if unknown_categories:
        shown = ", ".join(str(k) for k in sorted(unknown_categories)[:_MAX_EXAMPLES])
        valid = sorted(known_categories)
        hint = ""
        if all(0 <= c < len(valid) for c in unknown_categories):
            hint = " They look like contiguous labels 0..K-1: map label k to the dataset's category id category_ids[k]."
        raise DataError(
            f"{source}: {sum(unknown_categories.values())} predictions have category ids that are not in "
            f"the ground truth (e.g. {shown}; valid: {_short_list(valid)}).{hint}"
        )
    return checked


def _short_list(values: Sequence[int], limit: int = 12) -> str:
    text = ", ".join(str(v) for v in values[:limit])
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _unique_names(categories: list[dict]) -> dict[int, str]:
    """category id -> name; a repeated or missing name gets its id appended so dict keys stay unique."""
    names = [str(cat.get("name", cat["id"])) for cat in categories]
    out = {}
    for cat, name in zip(categories, names):
        out[cat["id"]] = f"{name} (id {cat['id']})" if names.count(name) > 1 else name
    return out


def _cell(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.3f}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.center(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join(":" + "-" * w + ":" for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _per_class_table(per_class: dict, columns: int, title: str, value_name: str) -> list[str]:
    """[title, markdown table] of `per_class` {name: value}, `columns` name/value pairs a row; [] when empty."""
    items = list(per_class.items())
    if not items:
        return []
    columns = max(1, min(columns, len(items)))
    cells = [c for name, ap in items for c in (name, _cell(ap))]
    cells += [""] * (-len(cells) % (2 * columns))
    rows = [cells[i : i + 2 * columns] for i in range(0, len(cells), 2 * columns)]
    return [title, _markdown_table(["category", value_name] * columns, rows)]
