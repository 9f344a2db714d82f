"""Pascal VOC XML -> a COCO dict (see `detkit.data.formats`).

    data = read_voc("VOCdevkit/VOC2007", split="trainval")   # Annotations/, JPEGImages/, ImageSets/Main/
    data = read_voc("labels/")                                # a plain folder of XML files (LabelImg)

Layouts:
  VOCdevkit  `<root>/Annotations/<id>.xml`, images in `<root>/JPEGImages/`, the image list of a split in
             `<root>/ImageSets/Main/<split>.txt` (one id per line); without an ImageSets/Main folder
             every XML of Annotations/ is read.
  plain      every `*.xml` in the folder; images in `image_root` (default: the same folder).
The image is `<filename>` of the XML (LabelImg and the VOC files write it), else `<id>.jpg`.

Boxes: VOC's `bndbox` holds 1-based pixel indices, inclusive ((1, 1, W, H) is the whole image). They
are converted as Detectron2's `pascal_voc.py` does: xmin - 1 and ymin - 1, xmax and ymax unchanged,
which gives COCO's continuous [x, y, w, h] = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1].
`difficult` and `truncated` (0/1, absent = 0) are kept per annotation; `difficult` boxes are training
targets (as in Detectron2) and are ignored by the VOC metric.

Categories: the 20 VOC classes in their standard order when every name is one of them, else the
names found, sorted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from detkit.data.formats._common import (
    IMAGE_SUFFIXES,
    CocoBuilder,
    XmlError,
    XmlNode,
    image_size,
    parse_xml,
    to_float,
)
from detkit.errors import DataError

logger = logging.getLogger(__name__)

VOC_CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_layout(root: Path, split: str, image_root: str = "") -> tuple[list[Path], Path]:
    """(the XML files to read, the image folder) of a VOCdevkit year folder or a plain XML folder."""
    if not root.is_dir():
        raise DataError(
            f"VOC dataset folder not found: {root} (give the VOC2007-style folder or a folder of XML files)"
        )
    ann_dir = root / "Annotations"
    if ann_dir.is_dir():
        images = Path(image_root) if image_root else root / "JPEGImages"
        sets = root / "ImageSets" / "Main"
        if not sets.is_dir() or not split:
            return sorted(ann_dir.glob("*.xml")), images
        list_file = sets / f"{split}.txt"
        if not list_file.is_file():
            available = sorted(p.stem for p in sets.glob("*.txt") if "_" not in p.stem)
            raise DataError(
                f"{list_file} not found: split {split!r} is not one of this VOC folder's image lists "
                f"({', '.join(available) or 'none'}); set split: to one of them"
            )
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        return [ann_dir / f"{i}.xml" for i in ids], images
    return sorted(root.glob("*.xml")), Path(image_root) if image_root else root


def _image_file(node: XmlNode, xml_file: Path, images: Path) -> Path:
    name = (node.findtext("filename") or "").strip()
    if name:
        return images / name
    for suffix in IMAGE_SUFFIXES:  # no <filename>: the image beside the XML's id
        candidate = images / (xml_file.stem + suffix)
        if candidate.exists():
            return candidate
    return images / (xml_file.stem + ".jpg")


def _flag(obj: XmlNode, tag: str) -> int:
    value = to_float(obj.findtext(tag))
    return 1 if value else 0


def read_voc(path: str | Path, *, split: str = "", image_root: str = "", skip_bad: bool = False) -> dict:
    """Read a VOC folder (see the module docstring) into a COCO dict; DataError on unparseable input."""
    root = Path(path)
    xml_files, images = voc_layout(root, split, image_root)
    if not xml_files:
        raise DataError(f"no VOC XML files in {root / 'Annotations' if (root / 'Annotations').is_dir() else root}")
    builder = CocoBuilder(skip_bad)
    sized_from_image = 0
    for xml_file in xml_files:
        if not xml_file.is_file():
            builder.bad(str(xml_file), "annotation file listed in the split's image list is missing")
            continue
        try:
            tree = parse_xml(xml_file)
        except XmlError as exc:
            builder.bad(exc.source, exc.reason)  # the whole file (image) is skipped with skip_bad
            continue
        image_file = _image_file(tree, xml_file, images)
        size = tree.find("size")
        width = to_float(size.findtext("width")) if size is not None else None
        height = to_float(size.findtext("height")) if size is not None else None
        if not width or not height:  # some tools write 0 or leave <size> out: the image header knows
            width, height = image_size(image_file)
            sized_from_image += 1
        try:
            file_name = image_file.relative_to(images).as_posix()
        except ValueError:
            file_name = str(image_file)
        image_id = builder.add_image(file_name, int(width), int(height), source=str(xml_file))
        for obj in tree.findall("object"):
            where = f"{xml_file}:{obj.line}"
            name = (obj.findtext("name") or "").strip()
            box = obj.find("bndbox")
            coords = [to_float(box.findtext(k)) if box is not None else None for k in ("xmin", "ymin", "xmax", "ymax")]
            if not name:
                builder.bad(where, "<object> without a <name>; add the class name")
                continue
            if any(c is None for c in coords):
                builder.bad(where, "<bndbox> needs numeric <xmin>, <ymin>, <xmax>, <ymax>")
                continue
            xmin, ymin, xmax, ymax = (float(c) for c in coords)  # type: ignore[arg-type]
            x0, y0 = xmin - 1.0, ymin - 1.0  # 1-based inclusive -> continuous (Detectron2's conversion)
            builder.add_box(
                image_id,
                name,
                [x0, y0, xmax - x0, ymax - y0],
                source=where,
                difficult=_flag(obj, "difficult"),
                truncated=_flag(obj, "truncated"),
            )
    if sized_from_image:
        logger.info("%s: %d XML files without a <size>: image sizes read from the image files", root, sized_from_image)
    names = builder.class_names_seen()
    is_voc = set(names) <= set(VOC_CLASS_NAMES)
    return builder.build(list(VOC_CLASS_NAMES) if is_voc else names, images, declared=is_voc)
