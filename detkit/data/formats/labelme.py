"""LabelMe JSON (one file per image) -> a COCO dict (see `detkit.data.formats`).

    data = read_labelme("annotated/")        # every *.json below the folder (or one .json file)

A LabelMe file: {"version", "flags", "shapes": [{"label", "points": [[x, y], ...], "group_id",
"shape_type", "flags"}], "imagePath", "imageData", "imageHeight", "imageWidth"}. `imagePath` is
relative to the JSON's folder (backslashes of Windows exports are read as separators); `imageData`
(the base64 image) is optional and not used. Points are continuous pixel coordinates.

Shapes -> boxes: `rectangle` (2 corners, any order), `polygon` (3 or more points; also a shape
without shape_type) and `circle` (centre, a point on the circle) give their bounding box. `point`,
`line`, `linestrip`, `points` and `mask` shapes are not boxes: they are left out and reported. A
rectangle without 2 points or a polygon with fewer than 3 is bad input. A shape is named
`<file>#shape<k>`, k its index in `shapes` (from 0).

Categories: the labels found, sorted (LabelMe files have no class list; `classes:` sets an order).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from detkit.data.formats._common import CocoBuilder, image_size, relative_file_name
from detkit.errors import DataError

NOT_BOXES = ("point", "line", "linestrip", "points", "mask")


def _points(shape: dict) -> list[tuple[float, float]] | None:
    pts = shape.get("points")
    if not isinstance(pts, list):
        return None
    out = []
    for p in pts:
        if not (isinstance(p, (list, tuple)) and len(p) == 2):
            return None
        try:
            x, y = float(p[0]), float(p[1])
        except (TypeError, ValueError):
            return None
        if not (math.isfinite(x) and math.isfinite(y)):
            return None
        out.append((x, y))
    return out


def _box(shape_type: str, pts: list[tuple[float, float]]) -> list[float] | str:
    """[x, y, w, h] of a shape, or the reason it is bad."""
    if shape_type == "rectangle":
        if len(pts) != 2:
            return f"a rectangle has 2 corner points, this one has {len(pts)}"
    elif shape_type == "circle":
        if len(pts) != 2:
            return f"a circle has 2 points (centre, a point on it), this one has {len(pts)}"
        (cx, cy), (px, py) = pts
        r = math.hypot(px - cx, py - cy)
        return [cx - r, cy - r, 2 * r, 2 * r]
    elif len(pts) < 3:
        return f"a polygon needs at least 3 points, this one has {len(pts)}"
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def read_labelme(path: str | Path, *, image_root: str = "", skip_bad: bool = False) -> dict:
    """Read LabelMe JSON files (a folder, searched recursively, or one file) into a COCO dict.

    file_names are relative to `image_root` (default: the folder given).
    """
    path = Path(path)
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = sorted(path.rglob("*.json")), path
    else:
        raise DataError(f"LabelMe input not found: {path} (give a folder of LabelMe .json files or one file)")
    if not files:
        raise DataError(f"no .json files in {path}")
    images_root = Path(image_root) if image_root else root
    builder = CocoBuilder(skip_bad)
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            builder.bad(str(file), f"not valid JSON ({exc}); re-save it from LabelMe")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list) or not data.get("imagePath"):
            builder.bad(str(file), "not a LabelMe file: it needs `shapes` (a list) and `imagePath`")
            continue
        image = (file.parent / str(data["imagePath"]).replace("\\", "/")).resolve()
        width, height = data.get("imageWidth"), data.get("imageHeight")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            width, height = image_size(image)
        image_id = builder.add_image(relative_file_name(image, images_root.resolve()), width, height, str(file))
        for k, shape in enumerate(data["shapes"]):
            where = f"{file}#shape{k}"
            if not isinstance(shape, dict):
                builder.bad(where, "a shape must be a JSON object")
                continue
            shape_type = shape.get("shape_type") or "polygon"
            label = shape.get("label")
            if not isinstance(label, str) or not label.strip():
                builder.bad(where, "shape without a label; give it a class name")
                continue
            if shape_type in NOT_BOXES:
                builder.ignore(where, f"{shape_type} shapes are not boxes")
                continue
            pts = _points(shape)
            if pts is None:
                builder.bad(where, "`points` must be a list of [x, y] number pairs")
                continue
            box = _box(shape_type, pts)
            if isinstance(box, str):
                builder.bad(where, box)
                continue
            builder.add_box(image_id, label.strip(), box, source=where)
    return builder.build(builder.class_names_seen(), images_root, declared=False)
