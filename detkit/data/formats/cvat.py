"""CVAT "for images 1.1" XML -> a COCO dict (see `detkit.data.formats`).

    data = read_cvat("export/annotations.xml")      # or the export folder holding annotations.xml

The file (CVAT's documented format):
    <annotations><version>1.1</version>
      <meta><task or project or job>...<labels><label><name>car</name>...</label></labels>...</meta>
      <image id="0" name="frame_000000.jpg" width="640" height="480" [subset="Train"]>
        <box label="car" occluded="0" xtl="10.5" ytl="20" xbr="110.25" ybr="95" z_order="0"/>
        <polygon label="car" occluded="1" points="1.0,2.0;30.5,2.0;30.5,40.0" z_order="0"/>
        <ellipse label="car" cx="50" cy="50" rx="10" ry="5"/>
      </image></annotations>
Coordinates are continuous pixels (CVAT's canvas): a box is [xtl, ytl, xbr - xtl, ybr - ytl] (a box
with a `rotation`, in degrees about its centre, gives the box around its rotated corners), a
polygon or ellipse its bounding box. `occluded` (0/1) is kept per annotation. `polyline`, `points`,
`mask`, `cuboid`, `skeleton` and `tag` are not boxes: left out and reported. A shape whose label is not
in `meta` is bad input. Image names are relative to `image_root` (default: the `images` folder beside
the XML, as in CVAT's export zip, else the XML's folder). With `subset`, only images of that subset.

Categories: the labels of `meta`, in their order there.
"""

from __future__ import annotations

import math
from pathlib import Path

from detkit.data.formats._common import CocoBuilder, XmlNode, parse_xml, to_float
from detkit.errors import DataError

NOT_BOXES = ("polyline", "points", "mask", "cuboid", "skeleton", "tag")


def _meta_labels(root: XmlNode) -> list[str]:
    meta = root.find("meta")
    names: list[str] = []
    if meta is None:
        return names
    for labels in meta.iter("labels"):
        for label in labels.findall("label"):
            name = (label.findtext("name") or "").strip()
            if name and name not in names:
                names.append(name)
    return names


def _box(node: XmlNode) -> list[float] | str:
    a = node.attrs
    if node.tag == "box":
        x0, y0, x1, y1 = (to_float(a.get(k)) for k in ("xtl", "ytl", "xbr", "ybr"))
        if x0 is None or y0 is None or x1 is None or y1 is None:
            return "a <box> needs numeric xtl, ytl, xbr, ybr"
        rotation = to_float(a.get("rotation")) or 0.0
        if rotation % 180.0:  # a rotated box (degrees about its centre): the box around its corners
            theta = math.radians(rotation)
            mx, my, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            ex = hw * abs(math.cos(theta)) + hh * abs(math.sin(theta))
            ey = hw * abs(math.sin(theta)) + hh * abs(math.cos(theta))
            return [mx - ex, my - ey, 2 * ex, 2 * ey]
        return [x0, y0, x1 - x0, y1 - y0]
    if node.tag == "ellipse":
        cx, cy, rx, ry = (to_float(a.get(k)) for k in ("cx", "cy", "rx", "ry"))
        if cx is None or cy is None or rx is None or ry is None:
            return "an <ellipse> needs numeric cx, cy, rx, ry"
        return [cx - rx, cy - ry, 2 * rx, 2 * ry]
    points = []
    for pair in (a.get("points") or "").split(";"):
        xy = [to_float(v) for v in pair.split(",")]
        if len(xy) != 2 or xy[0] is None or xy[1] is None:
            return f"points must be 'x,y;x,y;...'; got {a.get('points', '')[:60]!r}"
        points.append((xy[0], xy[1]))
    if len(points) < 3:
        return f"a polygon needs at least 3 points, this one has {len(points)}"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def read_cvat(path: str | Path, *, image_root: str = "", subset: str = "", skip_bad: bool = False) -> dict:
    """Read a CVAT for images 1.1 XML file (see the module docstring) into a COCO dict."""
    path = Path(path)
    xml_file = path / "annotations.xml" if path.is_dir() else path
    if not xml_file.is_file():
        raise DataError(f"CVAT annotation file not found: {xml_file} (give annotations.xml or its folder)")
    root = parse_xml(xml_file)
    if root.tag != "annotations":
        raise DataError(f"{xml_file}: not a CVAT for images file (the root element is <{root.tag}>, not <annotations>)")
    labels = _meta_labels(root)
    if not labels:
        raise DataError(f"{xml_file}: no labels in <meta>; export with CVAT's 'CVAT for images 1.1' format")
    if image_root:
        images = Path(image_root)
    else:
        images = xml_file.parent / "images" if (xml_file.parent / "images").is_dir() else xml_file.parent
    builder = CocoBuilder(skip_bad)
    for image in root.findall("image"):
        where_image = f"{xml_file}:{image.line}"
        if subset and image.attrs.get("subset", "") != subset:
            continue
        width, height = to_float(image.attrs.get("width")), to_float(image.attrs.get("height"))
        name = image.attrs.get("name")
        if not name or width is None or height is None:
            builder.bad(where_image, "<image> needs name, width and height")
            continue
        image_id = builder.add_image(name, int(width), int(height), source=where_image)
        for node in image.children:
            where = f"{xml_file}:{node.line}"
            if node.tag in NOT_BOXES:
                builder.ignore(where, f"<{node.tag}> is not a box")
                continue
            if node.tag not in ("box", "polygon", "ellipse"):
                continue
            label = node.attrs.get("label", "")
            if label not in labels:
                builder.bad(where, f"label {label!r} is not in <meta> (labels: {', '.join(labels)})")
                continue
            box = _box(node)
            if isinstance(box, str):
                builder.bad(where, box)
                continue
            occluded = 1 if to_float(node.attrs.get("occluded")) else 0
            builder.add_box(image_id, label, box, source=where, occluded=occluded)
    return builder.build(labels, images)
