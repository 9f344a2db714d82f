"""Tiny datasets written the way labelling tools write them, with the boxes each should read as.

Images and objects come from the shapes generator (detkit.data.synthetic); each writer lays them
out as its tool does and returns the truth: per split, {file stem: [(class name, [x, y, w, h])]} in
COCO pixels, computed from the numbers actually written (VOC integers, YOLO 6-decimal fractions,
LabelMe / CVAT 2-decimal pixels), so a reader must give them back to float rounding.

    truth = write_voc(tmp / "VOC2007")            # VOCdevkit: Annotations/, JPEGImages/, ImageSets/Main/
    truth = write_yolo(tmp / "yolo")              # data.yaml, images/{train,val}/, labels/{train,val}/
    truth = write_labelme(tmp / "labelme")        # {train,val}/*.json beside the images
    truth = write_cvat(tmp / "cvat")              # annotations.xml (subsets Train, Validation) + images/

Formats as published: VOC2007's devkit XML (annotation/folder/filename/source/size/segmented/object
with name/pose/truncated/difficult/bndbox), Ultralytics' dataset docs (data.yaml, `class cx cy w h`
and segment lines), LabelMe 5.x JSON (version/flags/shapes/imagePath/imageData/imageHeight/imageWidth),
CVAT's "CVAT for images 1.1" export (meta/task/labels, image with box/polygon, occluded, z_order).
"""

from __future__ import annotations

import json
from pathlib import Path

from detkit.data.synthetic import SHAPE_NAMES, ShapesParams, _draw_image

CLASS_NAMES = list(SHAPE_NAMES[:3])  # circle, square, triangle
SPLITS = {"train": 6, "val": 3}
SIZE_HW = (96, 128)

Truth = dict[str, dict[str, list[tuple[str, list[float]]]]]  # split -> file stem -> [(class, xywh)]


def shapes(split: str, n: int, seed: int = 0) -> list[tuple[str, bytes, list[tuple[str, list[float]]]]]:
    """[(file stem, JPEG bytes, [(class name, [x0, y0, x1, y1])])] of n shapes images."""
    params = ShapesParams(
        split=split, num_images=n, image_size=SIZE_HW, num_classes=len(CLASS_NAMES), max_objects=3,
        min_object_size=16, max_object_size=48, seed=seed,
    )  # fmt: skip
    out = []
    for i in range(n):
        jpeg, objects = _draw_image(params.validated(), i)
        out.append(
            (
                f"{split}_{i:03d}",
                jpeg,
                [(CLASS_NAMES[o["category"]], [float(v) for v in o["bbox_xyxy"]]) for o in objects],
            )
        )
    return out


def _clamp_int_box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
    """VOC's integer 1-based inclusive pixel box covering [x0, x1) x [y0, y1)."""
    h, w = SIZE_HW
    return max(int(x0) + 1, 1), max(int(y0) + 1, 1), min(int(x1 + 0.999), w), min(int(y1 + 0.999), h)


VOC_XML = """<annotation>
\t<folder>VOC2007</folder>
\t<filename>{file}</filename>
\t<source>
\t\t<database>The VOC2007 Database</database>
\t\t<annotation>PASCAL VOC2007</annotation>
\t\t<image>flickr</image>
\t</source>
\t<owner>
\t\t<name>detkit tests</name>
\t</owner>
\t<size>
\t\t<width>{width}</width>
\t\t<height>{height}</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>0</segmented>
{objects}</annotation>
"""

VOC_OBJECT = """\t<object>
\t\t<name>{name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>{truncated}</truncated>
\t\t<difficult>{difficult}</difficult>
\t\t<bndbox>
\t\t\t<xmin>{xmin}</xmin>
\t\t\t<ymin>{ymin}</ymin>
\t\t\t<xmax>{xmax}</xmax>
\t\t\t<ymax>{ymax}</ymax>
\t\t</bndbox>
\t</object>
"""


def write_voc(root: Path) -> Truth:
    """A VOCdevkit year folder; the first object of each val image is `difficult`. Truth objects of
    VOC carry a third item: difficult (0/1)."""
    truth: Truth = {}
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    h, w = SIZE_HW
    for split, n in SPLITS.items():
        truth[split] = {}
        for stem, jpeg, objects in shapes(split, n):
            (root / "JPEGImages" / f"{stem}.jpg").write_bytes(jpeg)
            parts, boxes = [], []
            for k, (name, box) in enumerate(objects):
                xmin, ymin, xmax, ymax = _clamp_int_box(*box)
                difficult = int(split == "val" and k == 0)
                truncated = int(xmin == 1 or ymin == 1 or xmax == w or ymax == h)
                parts.append(
                    VOC_OBJECT.format(
                        name=name, truncated=truncated, difficult=difficult, xmin=xmin, ymin=ymin, xmax=xmax, ymax=ymax
                    )
                )
                boxes.append((name, [xmin - 1.0, ymin - 1.0, xmax - xmin + 1.0, ymax - ymin + 1.0], difficult))
            xml = VOC_XML.format(file=f"{stem}.jpg", width=w, height=h, objects="".join(parts))
            (root / "Annotations" / f"{stem}.xml").write_text(xml)
            truth[split][stem] = boxes  # type: ignore[assignment]
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in truth[split]))
    return truth


def write_yolo(root: Path, names_as_dict: bool = False) -> Truth:
    """An Ultralytics dataset; image 0 of each split has no label file, image 1 an empty one, and
    the last object of image 2 is written as a segment (its box's 4 corners and 2 edge midpoints)."""
    truth: Truth = {}
    h, w = SIZE_HW
    # Ultralytics writes names as a mapping of int ids (its own datasets) or as a flow list
    names = "".join(f"\n  {i}: {n}" for i, n in enumerate(CLASS_NAMES)) if names_as_dict else json.dumps(CLASS_NAMES)
    lines_yaml = ["path: .", "train: images/train", "val: images/val", "test:", f"names: {names}"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text("\n".join(lines_yaml) + "\n")
    for split, n in SPLITS.items():
        truth[split] = {}
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i, (stem, jpeg, objects) in enumerate(shapes(split, n, seed=1)):
            (root / "images" / split / f"{stem}.jpg").write_bytes(jpeg)
            if i == 0:
                truth[split][stem] = []
                continue
            if i == 1:
                (root / "labels" / split / f"{stem}.txt").write_text("")
                truth[split][stem] = []
                continue
            lines, boxes = [], []
            for k, (name, (x0, y0, x1, y1)) in enumerate(objects):
                cls = CLASS_NAMES.index(name)
                if i == 2 and k == len(objects) - 1:
                    pts = [(x0, y0), ((x0 + x1) / 2, y0), (x1, y0), (x1, y1), ((x0 + x1) / 2, y1), (x0, y1)]
                    texts = [(f"{px / w:.6f}", f"{py / h:.6f}") for px, py in pts]
                    lines.append(f"{cls} " + " ".join(f"{a} {b}" for a, b in texts))
                    xs, ys = [float(a) for a, _ in texts], [float(b) for _, b in texts]
                    bx, by = min(xs), min(ys)
                    boxes.append((name, [bx * w, by * h, (max(xs) - bx) * w, (max(ys) - by) * h]))
                    continue
                texts4 = [f"{v:.6f}" for v in ((x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h)]
                lines.append(f"{cls} " + " ".join(texts4))
                cx, cy, bw, bh = (float(t) for t in texts4)
                boxes.append((name, [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]))
            (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
            truth[split][stem] = boxes
    return truth


def write_labelme(root: Path) -> Truth:
    """LabelMe JSON beside each image in root/<split>/; even objects are rectangles (corners
    written bottom-right first, as a drag up-left gives), odd ones polygons; no imageData."""
    truth: Truth = {}
    h, w = SIZE_HW
    for split, n in SPLITS.items():
        truth[split] = {}
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for stem, jpeg, objects in shapes(split, n, seed=2):
            (folder / f"{stem}.jpg").write_bytes(jpeg)
            shapes_json, boxes = [], []
            for k, (name, box) in enumerate(objects):
                x0, y0, x1, y1 = (round(v, 2) for v in box)
                if k % 2 == 0:
                    points = [[x1, y1], [x0, y0]]
                    shape_type = "rectangle"
                else:
                    points = [[x0, (y0 + y1) / 2], [(x0 + x1) / 2, y0], [x1, y1], [x0 + 1.0, y1]]
                    shape_type = "polygon"
                shapes_json.append(
                    {
                        "label": name,
                        "points": points,
                        "group_id": None,
                        "description": "",
                        "shape_type": shape_type,
                        "flags": {},
                        "mask": None,
                    }
                )
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                boxes.append((name, [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]))
            doc = {
                "version": "5.4.1",
                "flags": {},
                "shapes": shapes_json,
                "imagePath": f"{stem}.jpg",
                "imageData": None,
                "imageHeight": h,
                "imageWidth": w,
            }
            (folder / f"{stem}.json").write_text(json.dumps(doc, indent=2))
            truth[split][stem] = boxes
    return truth


CVAT_SUBSETS = {"train": "Train", "val": "Validation"}


def write_cvat(root: Path) -> Truth:
    """A CVAT for images 1.1 export of one task with subsets Train and Validation: annotations.xml +
    images/; odd objects are polygons (the box's corners), the first object of an image `occluded`."""
    truth: Truth = {}
    h, w = SIZE_HW
    (root / "images").mkdir(parents=True, exist_ok=True)
    labels = "".join(
        f"        <label>\n          <name>{n}</name>\n          <color>#ff0000</color>\n          <type>any</type>\n"
        "          <attributes>\n          </attributes>\n        </label>\n"
        for n in CLASS_NAMES
    )
    parts = [
        '<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n  <version>1.1</version>\n  <meta>\n    <task>\n'
        "      <id>7</id>\n      <name>shapes</name>\n      <size>9</size>\n      <mode>annotation</mode>\n"
        f"      <labels>\n{labels}      </labels>\n    </task>\n    <dumped>2026-12-07 05:00:00.000000+00:00</dumped>\n"
        "  </meta>\n"
    ]
    image_id = 0
    for split, n in SPLITS.items():
        truth[split] = {}
        for stem, jpeg, objects in shapes(split, n, seed=3):
            (root / "images" / f"{stem}.jpg").write_bytes(jpeg)
            parts.append(
                f'  <image id="{image_id}" name="{stem}.jpg" subset="{CVAT_SUBSETS[split]}" width="{w}" height="{h}">\n'
            )
            image_id += 1
            boxes = []
            for k, (name, box) in enumerate(objects):
                x0, y0, x1, y1 = (round(v, 2) for v in box)
                occluded = int(k == 0)
                if k % 2 == 0:
                    parts.append(
                        f'    <box label="{name}" source="manual" occluded="{occluded}" xtl="{x0:.2f}" ytl="{y0:.2f}" '
                        f'xbr="{x1:.2f}" ybr="{y1:.2f}" z_order="0">\n    </box>\n'
                    )
                else:
                    pts = f"{x0:.2f},{y0:.2f};{x1:.2f},{y0:.2f};{x1:.2f},{y1:.2f};{x0:.2f},{y1:.2f}"
                    parts.append(
                        f'    <polygon label="{name}" source="manual" occluded="{occluded}" points="{pts}" z_order="0">\n'
                        "    </polygon>\n"
                    )
                boxes.append((name, [x0, y0, x1 - x0, y1 - y0]))
            parts.append("  </image>\n")
            truth[split][stem] = boxes
    parts.append("</annotations>\n")
    (root / "annotations.xml").write_text("".join(parts))
    return truth


WRITERS = {"voc": write_voc, "yolo": write_yolo, "labelme": write_labelme, "cvat": write_cvat}


def dataset_entry(fmt: str, root: Path, split: str) -> dict:
    """The config entry (data.train / data.test) that reads split `split` of a sample."""
    if fmt == "voc":
        return {"type": "voc", "name": f"voc_{split}", "path": str(root), "split": split}
    if fmt == "yolo":
        return {"type": "yolo", "name": f"yolo_{split}", "path": str(root / "data.yaml"), "split": split}
    if fmt == "labelme":
        return {"type": "labelme", "name": f"labelme_{split}", "path": str(root / split)}
    return {
        "type": "cvat",
        "name": f"cvat_{split}",
        "path": str(root / "annotations.xml"),
        "subset": CVAT_SUBSETS[split],
    }


def read_options(fmt: str, root: Path, split: str) -> tuple[Path, dict]:
    """(path, read_dataset keyword arguments) of split `split` of a sample."""
    entry = dataset_entry(fmt, root, split)
    options = {k: v for k, v in entry.items() if k in ("split", "subset")}
    return Path(entry["path"]), options
