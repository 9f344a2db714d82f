"""A dataset before training: what it holds, how its boxes fit the anchors, and every problem in it.

    data = read_coco_dict("ann.json")                  # or a format reader's dict (detkit.data.formats)
    result = check_dataset(data, "images/", name="train", anchors=anchor_spec(cfg))
    result.errors                                       # Problems that stop training (exit 2)
    result.to_dict()                                    # counts, classes, anchor coverage, problems

Shapes: A annotations, I images, K categories of one dataset dict.

The rules are `detkit.data.coco.check_coco`'s, the ones the training and test loaders and the
evaluator apply (so the trainer stops on the same errors with the same text), plus the checks that
need the image files, which only this check runs (the loaders meet them image by image):

  error    a category/image/annotation error of check_coco (unknown category or image id, duplicate
           image ids or file names, no categories, an image without a positive size)
           image file missing, unreadable or truncated (decoded as training decodes it)
           decoded size differs from the annotation's width/height (the training loader skips such
           an image and the test loader stops on it: its boxes would be in another frame)
  warning  boxes the loaders drop (w or h <= 0, NaN/inf, entirely outside the image) or clip
           (partly outside); categories without a usable box (still counted in model.num_classes);
           images with boxes whose EXIF orientation is not 1; annotations a format reader skipped
           (skip_bad)

EXIF orientation. detkit reads every image as viewers show it: OpenCV applies the orientation tag
in `detkit.data.image_io.read_image`, which training, evaluation and inference all use. Boxes must
therefore be drawn on the upright image. An image whose tag rotates it by 90 degrees and whose
annotation gives the stored (unrotated) width and height was labelled on the stored pixels: an
error. Otherwise the size cannot tell in which frame the boxes were drawn (a flip or 180 degrees, or
a rotated image whose annotation gives the upright size), so an image with boxes and a tag is a
warning: look at it once (`detkit infer` draws what detkit reads).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detkit.data.coco import ERROR, WARNING, CocoIndex, Problem, check_coco, source_of
from detkit.data.image_io import decode_image
from detkit.errors import ImageReadError

logger = logging.getLogger(__name__)

# EXIF orientation values (TIFF tag 274) and what a viewer does to the stored pixels.
EXIF_ORIENTATION_TAG = 0x0112
EXIF_ORIENTATIONS = {
    2: "mirrored left-right",
    3: "rotated 180 degrees",
    4: "mirrored top-bottom",
    5: "mirrored and rotated 90 degrees",
    6: "rotated 90 degrees clockwise",
    7: "mirrored and rotated 90 degrees",
    8: "rotated 90 degrees counter-clockwise",
}
SWAPS_SIDES = (5, 6, 7, 8)  # these orientations exchange width and height

# COCO's area ranges (pixels^2 of the original image), as APs / APm / APl use them.
SIZE_NAMES = ("small", "medium", "large")


@dataclass
class AnchorSpec:
    """What the anchor coverage needs: the RPN's anchors and the test resize (see
    detkit.analysis.dataset.anchor_coverage)."""

    sizes: Sequence[float]
    aspect_ratios: Sequence[float]
    stride: int
    min_size: int
    max_size: int


def anchor_spec(cfg) -> AnchorSpec:
    """The anchors and test input scale of a config (model.rpn.*, data.min_size_test/max_size_test)."""
    rpn = cfg.model.rpn
    return AnchorSpec(
        sizes=tuple(rpn.anchor_sizes),
        aspect_ratios=tuple(rpn.aspect_ratios),
        stride=int(rpn.anchor_stride),
        min_size=int(cfg.data.min_size_test),
        max_size=int(cfg.data.max_size_test),
    )


@dataclass
class DatasetCheck:
    """The check of one dataset dict (one split entry).

    class_boxes: K (category id, name, usable boxes); size_counts: usable boxes per COCO size class;
    anchor_rows: AnchorCoverage.table() rows (share of boxes in percent per IoU threshold), empty
    without anchors; blocking: the one-line errors, as the loaders raise them.
    """

    name: str
    source: str
    image_root: str
    num_images: int = 0
    num_annotations: int = 0
    num_boxes: int = 0
    num_crowd: int = 0
    num_images_without_boxes: int = 0
    images_decoded: bool = False
    class_boxes: list[tuple[int, str, int]] = field(default_factory=list)
    size_counts: dict[str, int] = field(default_factory=dict)
    anchor_note: str = ""
    anchor_rows: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    blocking: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "image_root": self.image_root,
            "images": self.num_images,
            "annotations": self.num_annotations,
            "boxes": self.num_boxes,
            "crowd": self.num_crowd,
            "images_without_boxes": self.num_images_without_boxes,
            "images_decoded": self.images_decoded,
            "classes": [{"id": cid, "name": name, "boxes": n} for cid, name, n in self.class_boxes],
            "size_counts": self.size_counts,
            "anchor_coverage": {"note": self.anchor_note, "table": self.anchor_rows},
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "blocking": self.blocking,
            "problems": [p.to_dict() for p in self.problems],
        }


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of encoded image bytes; 1 when there is none or it cannot be read.

    PIL (a torchvision dependency) reads the tag from JPEG, PNG, WebP and TIFF headers without
    decoding the pixels.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            value = im.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return 1  # the decode check reports a file PIL cannot parse; no tag to report here
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_image_file(path: str, height: int, width: int, decode: bool) -> tuple[str, str, int] | None:
    """(kind, message, orientation) of one image file's problem, else (or when fine) None / ("", "", o).

    kind "" with orientation != 1: readable, size as annotated, but tagged (the caller decides).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "image_missing", f"the file {path} does not exist", 1
    except OSError as exc:
        return "image_unreadable", f"{path} cannot be opened ({exc.strerror or exc})", 1
    if not decode:
        return None
    try:
        image = decode_image(data, name=path)
    except ImageReadError as exc:
        return "image_unreadable", f"{path}: {exc.reason}", 1
    orientation = exif_orientation(data)
    got_h, got_w = image.shape[:2]
    if (got_h, got_w) != (height, width):
        if orientation in SWAPS_SIDES and (got_h, got_w) == (width, height):
            why = (
                f"its EXIF orientation {orientation} ({EXIF_ORIENTATIONS[orientation]}) turns the stored {width}x{height} "
                f"(w x h) pixels into {got_w}x{got_h}: the annotation gives the stored size, so its boxes were drawn on "
                "the stored pixels, while detkit reads images upright as viewers show them. Re-save the image with "
                "the rotation applied and redraw (or rotate) its boxes, or strip the orientation tag if the boxes "
                "fit the stored pixels"
            )
        else:
            why = (
                f"it decodes to {got_w}x{got_h} (w x h, after EXIF orientation) but the annotation says "
                f"{width}x{height}: fix the annotation's width/height or the image (the training loader would skip it, "
                "the test loader stop on it)"
            )
        return "image_size_mismatch", why, orientation
    return "", "", orientation


def check_images(
    index: CocoIndex,
    image_root: str | os.PathLike,
    *,
    decode: bool = True,
    workers: int = 0,
    sources: Sequence[str] | None = None,
) -> list[Problem]:
    """Problems of the image files of the valid images of `index` (missing, unreadable, size, EXIF).

    decode=False only looks for the files. workers: decoding threads (0: one per CPU core, at most 8;
    OpenCV releases the GIL while decoding). sources: per valid image, ' (<source>)' or ''.
    """
    root = Path(image_root)
    boxes_per_image = np.bincount(index.ann_image_idx[index.usable], minlength=len(index.image_ids))
    paths = [str(root / name) for name in index.file_names]
    n_workers = workers or min(8, os.cpu_count() or 1)

    def check(i: int) -> tuple[str, str, int] | None:
        return _check_image_file(paths[i], index.heights[i], index.widths[i], decode)

    if decode and n_workers > 1 and len(paths) > 1:
        with ThreadPoolExecutor(n_workers) as pool:
            results = list(pool.map(check, range(len(paths))))
    else:
        results = [check(i) for i in range(len(paths))]
    problems = []
    for i, result in enumerate(results):
        if result is None:
            continue
        kind, message, orientation = result
        where = f"image {index.image_ids[i]} ({index.file_names[i]})" + (sources[i] if sources else "")
        if kind:
            problems.append(Problem(ERROR, kind, where, message))
        elif orientation != 1 and boxes_per_image[i] > 0:
            problems.append(
                Problem(
                    WARNING,
                    "image_exif_orientation",
                    where,
                    f"EXIF orientation {orientation} ({EXIF_ORIENTATIONS[orientation]}): detkit reads it upright, as "
                    f"viewers show it; check that its {boxes_per_image[i]} boxes were drawn on the upright image",
                )
            )
    return problems


def _size_name(area: float) -> str:
    return "small" if area < 32**2 else "medium" if area < 96**2 else "large"


def check_dataset(
    data: dict,
    image_root: str | os.PathLike | None = None,
    *,
    name: str = "",
    source: str = "",
    decode_images: bool = True,
    anchors: AnchorSpec | None = None,
    workers: int = 0,
) -> DatasetCheck:
    """Check one COCO-format dataset dict: check_coco's rules, the image files (when image_root, or
    data["image_root"], is known), counts per class and size, and the anchor coverage of its boxes."""
    root = image_root if image_root is not None else data.get("image_root")
    index = check_coco(data)
    anns = data["annotations"]
    result = DatasetCheck(name=name, source=source, image_root=str(root) if root is not None else "")
    result.problems = list(index.problems)
    # a format reader's skipped annotations (skip_bad=True): listed, never silently gone
    for skipped in data.get("problems") or ():
        where = str(skipped.get("source", "?")) if isinstance(skipped, dict) else "?"
        message = str(skipped.get("message", skipped)) if isinstance(skipped, dict) else str(skipped)
        result.problems.append(Problem(WARNING, "annotation_skipped", where, f"{message}; skipped by the reader"))
    result.blocking = list(index.errors)
    if root is not None and index.file_names:
        if not Path(root).is_dir():
            message = f"the image folder {root} does not exist (image_root of this dataset)"
            result.problems.append(Problem(ERROR, "image_root_missing", str(root), message))
            result.blocking.append(message)
        else:
            # a format reader's "source" of each image (its annotation file) helps find it
            sources = {img.get("id"): source_of(img) for img in data["images"] if isinstance(img, dict)}
            image_problems = check_images(
                index, root, decode=decode_images, workers=workers, sources=[sources[i] for i in index.image_ids]
            )
            result.images_decoded = decode_images
            result.problems.extend(image_problems)
            for kind, what in (
                ("image_missing", "image files missing"),
                ("image_unreadable", "image files unreadable or truncated"),
                ("image_size_mismatch", "images whose decoded size is not the annotation's"),
            ):
                listed = [p.where for p in image_problems if p.kind == kind]
                if listed:
                    first = ", ".join(listed[:5]) + (", ..." if len(listed) > 5 else "")
                    result.blocking.append(f"{len(listed)} {what} under {root} (first: {first})")
    usable = index.usable
    result.num_images = len(index.image_ids)
    result.num_annotations = len(anns)
    result.num_boxes = int(usable.sum())
    result.num_crowd = int((index.crowd & (index.ann_image_idx >= 0)).sum())
    per_image = np.bincount(index.ann_image_idx[usable], minlength=len(index.image_ids))
    result.num_images_without_boxes = int((per_image == 0).sum())
    result.class_boxes = [
        (cid, index.category_names[cid], index.category_box_counts[cid]) for cid in sorted(index.category_names)
    ]
    xyxy = index.clipped_xyxy[usable]
    areas = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    result.size_counts = dict.fromkeys(SIZE_NAMES, 0)
    for a in areas:
        result.size_counts[_size_name(float(a))] += 1
    if anchors is not None and result.num_boxes:
        result.anchor_note, result.anchor_rows = _anchor_rows(index, xyxy, anchors)
    return result


def _anchor_rows(index: CocoIndex, xyxy: np.ndarray, anchors: AnchorSpec) -> tuple[str, list[dict]]:
    """The analysis code's anchor coverage of the usable boxes (clipped, as training sees them)."""
    from detkit.analysis.dataset import anchor_coverage

    rows = np.flatnonzero(index.usable)
    gt = {
        "images": [
            {"id": i, "height": h, "width": w} for i, (h, w) in enumerate(zip(index.heights, index.widths), start=1)
        ],
        "categories": [{"id": cid, "name": index.category_names[cid]} for cid in sorted(index.category_names)],
        "annotations": [
            {
                "image_id": int(index.ann_image_idx[j]) + 1,
                "category_id": index.ann_category_ids[j],
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                "area": float((b[2] - b[0]) * (b[3] - b[1])),
            }
            for j, b in zip(rows, xyxy)
        ],
    }
    coverage = anchor_coverage(
        gt,
        sizes=anchors.sizes,
        aspect_ratios=anchors.aspect_ratios,
        stride=anchors.stride,
        min_size=anchors.min_size,
        max_size=anchors.max_size,
    )
    return coverage.scale_note, coverage.table()


# The fix that a category table differing between datasets of one config needs.
SAME_CATEGORIES = "datasets used together need the same category ids and names (the model predicts the training ones)"


def category_table_difference(first: Sequence[tuple[int, str]], other: Sequence[tuple[int, str]]) -> str:
    """'' when two (id, name) category tables are equal, else "its categories differ (<n other> vs
    <n first>; first differing (id, name): <other's> vs <first's>)" (the check's and the trainer's words)."""
    if list(first) == list(other):
        return ""
    padded_first: list = [*first, *[None] * len(other)]
    padded_other: list = [*other, *[None] * len(first)]
    a, b = next((a, b) for a, b in zip(padded_first, padded_other) if a != b)
    return f"its categories differ ({len(other)} vs {len(first)}; first differing (id, name): {b} vs {a})"


def split_problems(checks: Sequence[tuple[str, DatasetCheck]], num_classes: int | None = None) -> list[Problem]:
    """Problems between the datasets of a config: (split, check) pairs. Every dataset must share the
    first training dataset's category table (the model's outputs); model.num_classes must match it."""
    problems: list[Problem] = []
    if not checks:
        return problems
    first_split, first = checks[0]
    table = [(cid, name) for cid, name, _ in first.class_boxes]
    for split, other in checks[1:]:
        diff = category_table_difference(table, [(cid, name) for cid, name, _ in other.class_boxes])
        if diff:
            problems.append(
                Problem(
                    ERROR,
                    "categories_differ",
                    f"{split} {other.name!r}",
                    f"{diff} from those of {first_split} {first.name!r}; {SAME_CATEGORIES}",
                )
            )
    if num_classes is not None and num_classes != len(table):
        problems.append(
            Problem(
                ERROR,
                "num_classes",
                "model.num_classes",
                f"is {num_classes} but {first_split} {first.name!r} has {len(table)} categories; set "
                f"model.num_classes: {len(table)} (or pass model.num_classes={len(table)})",
            )
        )
    return problems


def format_report(
    checks: Sequence[tuple[str, DatasetCheck]], extra: Sequence[Problem] = (), max_listed: int = 5
) -> str:
    """The terminal report of (split, check) pairs: a table per split, boxes per class, anchor
    coverage, then the problems (at most `max_listed` of each kind per dataset, with the count)."""
    lines: list[str] = []
    head = ("split", "dataset", "images", "boxes", "crowd", "no boxes", "classes", "errors", "warnings")
    rows = [
        (
            split,
            c.name,
            c.num_images,
            c.num_boxes,
            c.num_crowd,
            c.num_images_without_boxes,
            len(c.class_boxes),
            len(c.errors),
            len(c.warnings),
        )
        for split, c in checks
    ]
    lines += _table(head, rows)
    if checks:
        lines += ["", "boxes per class (id name: " + ", ".join(f"{s} {c.name}" for s, c in checks) + ")"]
        class_rows: dict[tuple[int, str], list[Any]] = {}
        for k, (_, c) in enumerate(checks):
            for cid, name, n in c.class_boxes:
                class_rows.setdefault((cid, name), [""] * len(checks))[k] = n
        lines += _table(
            ("id", "class", *(f"{s}:{c.name}" for s, c in checks)),
            [(cid, name, *counts) for (cid, name), counts in sorted(class_rows.items(), key=lambda kv: kv[0][0])],
        )
        sizes = [(s, c.name, *(c.size_counts.get(n, 0) for n in SIZE_NAMES)) for s, c in checks]
        lines += ["", "boxes per COCO size (area < 32^2 small, < 96^2 medium)"]
        lines += _table(("split", "dataset", *SIZE_NAMES), sizes)
        for split, c in checks:
            if c.anchor_rows:
                lines += [
                    "",
                    f"anchor coverage, {split} {c.name}: share (%) of boxes whose best anchor reaches the IoU",
                ]
                keys = list(c.anchor_rows[0])
                lines += _table(
                    keys,
                    [tuple(f"{v:.1f}" if isinstance(v, float) else v for v in r.values()) for r in c.anchor_rows],
                    text_columns=1,
                )
                lines.append(f"  ({c.anchor_note})")
        undecoded = [f"{s} {c.name}" for s, c in checks if not c.images_decoded]
        if undecoded:
            lines += ["", f"images not decoded ({', '.join(undecoded)}): only their presence was checked"]
    problems = [("", p) for p in extra] + [(f"{s} {c.name}", p) for s, c in checks for p in c.problems]
    problems.sort(key=lambda item: item[1].severity != ERROR)  # errors first, each group in file order
    if problems:
        lines += ["", "problems (error: training cannot proceed; warning: the loaders drop, clip or keep it):"]
        shown: dict[tuple[str, str], int] = {}
        for owner, p in problems:
            key = (owner, p.kind)
            shown[key] = shown.get(key, 0) + 1
            if shown[key] <= max_listed:
                prefix = f"{owner}: " if owner else ""
                lines.append(f"  {p.severity:<7} {p.kind:<28} {prefix}{p.where}: {p.message}")
        for (owner, kind), n in shown.items():
            if n > max_listed:
                lines.append(f"  ... {owner}: {n - max_listed} more {kind} (all in the JSON report)")
    return "\n".join(lines)


def _table(head: Sequence[Any], rows: Sequence[Sequence[Any]], text_columns: int = 2) -> list[str]:
    """Aligned lines: the first `text_columns` columns left-aligned, the numbers right-aligned."""
    cells = [[str(v) for v in head]] + [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return [
        "  ".join(v.ljust(w) if i < text_columns else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
        for r in cells
    ]
