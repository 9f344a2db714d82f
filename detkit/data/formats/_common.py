"""What the format readers share: the COCO dict they build, bad-input handling, safe XML, image sizes.

Every reader returns one COCO-format dict (see `detkit.data.formats`), built by a `CocoBuilder`:

    builder = CocoBuilder(skip_bad)
    image_id = builder.add_image("img1.jpg", width=640, height=480, source="ann/img1.xml")
    builder.add_box(image_id, "dog", [x, y, w, h], source="ann/img1.xml:14", difficult=1)
    builder.bad("labels/img1.txt:3", "5 numbers expected (class cx cy w h), got 4; fix or delete the line")
    data = builder.build(category_order=["cat", "dog"])

Boxes are kept exactly as written (never clipped, fixed or dropped): the loaders and the dataset check
flag boxes outside their image or of zero size. Only input that cannot be parsed is bad: `bad()` raises
a DataError naming the place and the fix, or with skip_bad=True records it under "problems".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from detkit.errors import DataError

logger = logging.getLogger(__name__)

# How many offenders a log message names before it just counts.
MAX_LISTED = 5


class CocoBuilder:
    """Accumulates images and boxes (by class name) and turns them into a COCO dict with ids 1..K."""

    def __init__(self, skip_bad: bool = False):
        self.skip_bad = skip_bad
        self.images: list[dict] = []
        self.boxes: list[tuple[dict, str]] = []  # (annotation without category_id, class name)
        self.problems: list[dict] = []
        self.ignored: list[dict] = []  # shapes that are not regions (points, lines): reported, not boxes

    def bad(self, source: str, message: str) -> None:
        """Unparseable input at `source`: a DataError, or with skip_bad a listed problem."""
        if not self.skip_bad:
            raise DataError(f"{source}: {message} (or pass skip_bad / --skip-bad to skip it and list it)")
        self.problems.append({"source": source, "message": message})

    def ignore(self, source: str, message: str) -> None:
        """A well-formed annotation that is not a box (a LabelMe point, a CVAT polyline): reported."""
        self.ignored.append({"source": source, "message": message})

    def add_image(self, file_name: str, width: int, height: int, source: str) -> int:
        image_id = len(self.images) + 1
        self.images.append(
            {"id": image_id, "file_name": file_name, "width": int(width), "height": int(height), "source": source}
        )
        return image_id

    def add_box(self, image_id: int, name: str, xywh: Sequence[float], source: str, **extra: int) -> None:
        """One box [x, y, w, h] in COCO pixels (0-based, continuous) of class `name`."""
        x, y, w, h = (float(v) for v in xywh)
        ann = {"image_id": image_id, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "source": source}
        ann.update(extra)
        self.boxes.append((ann, name))

    def class_names_seen(self) -> list[str]:
        return sorted({name for _, name in self.boxes})

    def build(self, category_order: Sequence[str], image_root: str | os.PathLike, declared: bool = True) -> dict:
        """The COCO dict; `category_order` holds every name used by a box, first = id 1.

        declared: the classes come from a list in the source (YOLO names, CVAT meta, VOC's 20), not
        only from the boxes found; then `classes:` may not name a class outside it (a typo)."""
        ids = {name: i + 1 for i, name in enumerate(category_order)}
        annotations = []
        for k, (ann, name) in enumerate(self.boxes):
            annotations.append({"id": k + 1, "category_id": ids[name], **ann})
        if self.problems:
            logger.warning(
                "%d bad annotations skipped (skip_bad); first: %s",
                len(self.problems),
                "; ".join(f"{p['source']}: {p['message']}" for p in self.problems[:MAX_LISTED]),
            )
        if self.ignored:
            logger.warning(
                "%d annotations that are not boxes or regions left out; first: %s",
                len(self.ignored),
                "; ".join(f"{p['source']}: {p['message']}" for p in self.ignored[:MAX_LISTED]),
            )
        return {
            "images": self.images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(category_order)],
            "image_root": str(image_root),
            "class_source": "declared" if declared else "found",
            "problems": self.problems,
            "ignored": self.ignored,
        }


# --------------------------------------------------------------------------------------------
# XML: a small element tree with line numbers, no DTDs (so no entity expansion)
# --------------------------------------------------------------------------------------------


@dataclass
class XmlNode:
    """One element: tag, attributes, the line it starts on, text, children."""

    tag: str
    attrs: dict[str, str]
    line: int
    children: list[XmlNode] = field(default_factory=list)
    text: str = ""

    def find(self, tag: str) -> XmlNode | None:
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> list[XmlNode]:
        return [c for c in self.children if c.tag == tag]

    def findtext(self, tag: str, default: str | None = None) -> str | None:
        child = self.find(tag)
        return child.text.strip() if child is not None else default

    def iter(self, tag: str):
        """Every descendant (and self) with this tag, in document order."""
        if self.tag == tag:
            yield self
        for child in self.children:
            yield from child.iter(tag)


class _UnsafeXml(Exception):
    pass


class XmlError(DataError):
    """An XML file that cannot be parsed: `source` "<file>:<line>", `reason` what is wrong and the fix."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def parse_xml(path: Path) -> XmlNode:
    """Parse an XML file into XmlNodes with line numbers.

    Documents with a DOCTYPE or entity declaration are refused: annotation files never need one, and
    refusing them rules out entity-expansion attacks ("billion laughs", external entities) without a
    dependency. Raises DataError naming the file and line for malformed XML.
    """
    parser = expat.ParserCreate()
    stack: list[XmlNode] = []
    root: list[XmlNode] = []
    texts: list[list[str]] = []

    def start(tag: str, attrs: dict[str, str]) -> None:
        node = XmlNode(tag, attrs, parser.CurrentLineNumber)
        if stack:
            stack[-1].children.append(node)
        else:
            root.append(node)
        stack.append(node)
        texts.append([])

    def end(tag: str) -> None:
        node = stack.pop()
        node.text = "".join(texts.pop())

    def chars(data: str) -> None:
        if texts:
            texts[-1].append(data)

    def refuse(*args) -> None:
        raise _UnsafeXml()

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
    except expat.ExpatError as exc:
        raise XmlError(
            f"{path}:{exc.lineno}",
            f"malformed XML ({expat.ErrorString(exc.code)}, column {exc.offset + 1}); "
            "fix the file or re-export it from the labelling tool",
        ) from None
    except _UnsafeXml:
        raise XmlError(
            f"{path}:{parser.CurrentLineNumber}",
            "the XML declares a DOCTYPE or entities, which annotation files never need and which detkit "
            "refuses to expand; remove the declaration",
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not root:
        raise DataError(f"{path}: empty XML document; re-export it from the labelling tool")
    return root[0]


# --------------------------------------------------------------------------------------------
# Images and numbers
# --------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as detkit decodes it: EXIF orientation applied (5..8 swap the
    sides), read from the file header with PIL without decoding the pixels. DataError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"cannot read the size of image {path}: {exc}") from None
    if orientation in (5, 6, 7, 8):  # transposed or rotated by 90 degrees
        width, height = height, width
    return int(width), int(height)


def to_float(text: str | None) -> float | None:
    """A number from annotation text, None when it is missing or not a number."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def display_path(path: Path, base: Path | None = None) -> str:
    """`path` relative to `base` when inside it (shorter messages), else as given."""
    if base is not None:
        try:
            return str(path.relative_to(base))
        except ValueError:
            pass
    return str(path)


def relative_file_name(image: Path, image_root: Path) -> str:
    """The file_name of `image` relative to image_root (posix separators), absolute when outside it."""
    try:
        return image.relative_to(image_root).as_posix()
    except ValueError:
        return str(image)
