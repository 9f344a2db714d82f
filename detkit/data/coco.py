"""COCO-format annotation files -> validated, compact per-image records.

    dataset = load_coco_json("datasets/coco/annotations/instances_val2017.json", "datasets/coco/val2017")
    dataset.class_names[0], dataset.category_ids[0]    # 'person', 1
    record = dataset.records[0]                          # ImageRecord(image_id, file_name, height, width,
                                                         #             boxes (G, 4) xyxy, labels (G,))

Shapes: N images, M kept boxes over all images, G kept boxes of one image, K categories.

Category ids map to contiguous labels 0..K-1 in sorted id order; `category_ids[label]` gives the
original id back (the evaluator and `detkit-infer` write original ids).

The json is parsed with `json` and checked with numpy rather than through pycocotools' `COCO` index,
which silently keeps the last of two images sharing an id; pycocotools reads the same file for
evaluation (detkit.engine.evaluator), and the tests check these records against its index.

Everything that is wrong with a file is found in one pass and reported at once, before training:
  dropped with a warning  boxes with w or h <= 0 or a non-finite value, boxes entirely outside the
                          image; boxes partly outside are clipped to the image (also counted)
  kept out of targets     iscrowd=1 annotations (the evaluator still reads them from the json)
  errors (DataError)      duplicate image ids, two images with the same file_name, unknown category
                          ids, annotations of unknown images, images without a positive width/height,
                          missing image files; the message lists the first offenders of each kind and
                          their counts.
  noted with the warning  categories without a single usable box (they still count in
                          model.num_classes: an output the model never learns)

`check_coco` holds these rules for every reader (training and test loaders, the evaluator and
`detkit check-data`, which adds the checks that need the image files: see detkit.data.check). Each
offender is also one `Problem` with its annotation id and, when the dict has one, its "source"
(the file and line a format reader took it from).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detkit.errors import DataError

logger = logging.getLogger(__name__)

# How many offenders of one kind an error or warning names before it just counts.
MAX_LISTED = 5

# Problem.severity: "error" stops training (and `detkit check-data` exits 2); "warning" is a box
# or category the loaders drop, clip or keep with a warning, so training can proceed.
ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    """One offender: `where` names it ("annotation 12 (labels/a.txt:3)", "image 4 (a.jpg)",
    "category 0 'umbrella'"), `kind` is a stable key (box_outside, image_unreadable, ...) and
    `message` says what is wrong and what detkit does about it."""

    severity: str
    kind: str
    where: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "kind": self.kind, "where": self.where, "message": self.message}

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    """One image and its usable (non-crowd, valid, clipped) boxes, in original image pixels.

    boxes: (G, 4) float32 xyxy; labels: (G,) int64 contiguous class indices in [0, K).
    """

    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray


class DetectionRecords:
    """N image records stored column-wise in a few numpy arrays.

    A list of 118k Python dicts (COCO train) is copied page by page into every data-loader worker as
    reference counts change; flat arrays are not, and they index and concatenate cheaply.

    image_ids (N,) int64, heights/widths (N,) int64, boxes (M, 4) float32 xyxy, labels (M,) int64,
    box_offsets (N + 1,) int64: image i owns boxes[box_offsets[i]:box_offsets[i + 1]].
    File names are one utf-8 byte blob with (N + 1,) offsets.
    """

    def __init__(
        self,
        image_ids: Sequence[int] | np.ndarray,
        heights: Sequence[int] | np.ndarray,
        widths: Sequence[int] | np.ndarray,
        file_names: Sequence[str],
        boxes: np.ndarray,
        labels: np.ndarray,
        box_counts: Sequence[int] | np.ndarray,
    ):
        self.image_ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        self.heights = np.asarray(heights, dtype=np.int64).reshape(-1)
        self.widths = np.asarray(widths, dtype=np.int64).reshape(-1)
        n = len(self.image_ids)
        if not (len(self.heights) == len(self.widths) == len(file_names) == len(box_counts) == n):
            raise ValueError("image_ids, heights, widths, file_names and box_counts must have one entry per image")
        encoded = [name.encode("utf-8") for name in file_names]
        self._name_blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        self._name_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._name_offsets[1:])
        self.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.box_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.asarray(box_counts, dtype=np.int64), out=self.box_offsets[1:])
        if self.box_offsets[-1] != len(self.boxes) or len(self.labels) != len(self.boxes):
            raise ValueError(
                f"box_counts sum to {self.box_offsets[-1]} but there are {len(self.boxes)} boxes and {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def file_name(self, i: int | np.integer) -> str:
        return bytes(self._name_blob[self._name_offsets[i] : self._name_offsets[i + 1]]).decode("utf-8")

    @property
    def file_names(self) -> list[str]:
        return [self.file_name(i) for i in range(len(self))]

    @property
    def box_counts(self) -> np.ndarray:
        """(N,) int64 number of usable boxes per image."""
        return np.diff(self.box_offsets)

    def __getitem__(self, i: int) -> ImageRecord:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} images")
        i %= len(self)
        lo, hi = self.box_offsets[i], self.box_offsets[i + 1]
        return ImageRecord(
            image_id=int(self.image_ids[i]),
            file_name=self.file_name(i),
            height=int(self.heights[i]),
            width=int(self.widths[i]),
            boxes=self.boxes[lo:hi].copy(),
            labels=self.labels[lo:hi].copy(),
        )

    def subset(self, indices: Sequence[int] | np.ndarray) -> DetectionRecords:
        """The records at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        counts = self.box_counts[idx]
        # box k of the j-th chosen image sits at offsets[idx[j]] + k; built for all boxes at once
        first_out = np.cumsum(counts) - counts  # where each chosen image's boxes start in the output
        box_idx = np.repeat(self.box_offsets[idx] - first_out, counts) + np.arange(int(counts.sum()))
        return DetectionRecords(
            self.image_ids[idx],
            self.heights[idx],
            self.widths[idx],
            [self.file_name(i) for i in idx],
            self.boxes[box_idx],
            self.labels[box_idx],
            counts,
        )

    @staticmethod
    def concat(parts: Sequence[DetectionRecords]) -> DetectionRecords:
        """One record set holding all images of `parts`, in order."""
        if len(parts) == 1:
            return parts[0]
        return DetectionRecords(
            np.concatenate([p.image_ids for p in parts]),
            np.concatenate([p.heights for p in parts]),
            np.concatenate([p.widths for p in parts]),
            [name for p in parts for name in p.file_names],
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.box_counts for p in parts]),
        )


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


@dataclass
class AnnotationReport:
    """What loading one annotation file changed or dropped (errors are raised, not reported)."""

    num_images: int = 0
    num_annotations: int = 0
    num_boxes: int = 0  # kept as training targets
    num_crowd: int = 0  # iscrowd=1, kept out of the targets
    num_degenerate: int = 0  # w or h <= 0, non-finite, or not 4 numbers: dropped
    num_outside: int = 0  # entirely outside the image: dropped
    num_clipped: int = 0  # partly outside the image: clipped
    num_images_without_boxes: int = 0
    empty_categories: list[str] = field(default_factory=list)  # "<id> '<name>'" of categories without a box
    examples: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        parts = []
        for count, key, what in (
            (self.num_degenerate, "degenerate", "boxes with w or h <= 0 or non-finite values dropped"),
            (self.num_outside, "outside", "boxes entirely outside their image dropped"),
            (self.num_clipped, "clipped", "boxes partly outside their image clipped"),
        ):
            if count:
                listed = ", ".join(self.examples.get(key, []))
                parts.append(f"{count} {what} (first: {listed})")
        if self.empty_categories:
            parts.append(
                f"{len(self.empty_categories)} categories without a single usable box, each still counted in "
                f"model.num_classes (first: {_first(self.empty_categories)}); remove them from the categories "
                "unless their boxes come later"
            )
        return "; ".join(parts)


@dataclass(frozen=True)
class CocoDataset:
    """A loaded annotation file: every image (boxes or not) and its category table."""

    name: str
    ann_file: str
    image_root: str
    records: DetectionRecords
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]  # index = contiguous label, value = original category id
    report: AnnotationReport


def _first(items: Iterable, n: int = MAX_LISTED) -> str:
    items = list(items)
    text = ", ".join(str(x) for x in items[:n])
    return text + (", ..." if len(items) > n else "")


def read_json(path: str | os.PathLike, what: str = "annotation") -> object:
    """Parse a JSON file; a missing or unparsable file is a DataError naming it (`what`: its role)."""
    path = Path(path)
    if not path.is_file():
        hint = " (see datasets/README.md for where COCO goes)" if "coco" in str(path).lower() else ""
        raise DataError(f"{what} file not found: {path}{hint}")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} file {path} is not valid JSON: {exc}") from None


def read_coco_dict(ann_file: str | os.PathLike, what: str = "annotation") -> dict:
    """A COCO instances json with 'images' and 'categories' lists ('annotations' may be absent)."""
    data = read_json(ann_file, what)
    if not isinstance(data, dict):
        raise DataError(
            f"{ann_file}: a COCO annotation file is a JSON object with images, annotations and categories; got a {type(data).__name__}"
        )
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{ann_file}: the COCO key {key!r} is missing or not a list")
    if data.get("annotations") is None:
        data["annotations"] = []  # an image list without annotations (test-dev style) is fine
    if not isinstance(data["annotations"], list):
        raise DataError(f"{ann_file}: the COCO key 'annotations' must be a list")
    return data


@dataclass
class CocoIndex:
    """What `check_coco` parsed from a COCO dict: A annotations, I valid images, K categories."""

    category_names: dict[int, str]  # id -> name
    image_index: dict[int, int]  # image id -> position among the valid images
    image_ids: list[int]
    heights: list[int]
    widths: list[int]
    file_names: list[str]
    bboxes_xywh: np.ndarray  # (A, 4) float64, NaN where a bbox is not 4 numbers
    ann_image_idx: np.ndarray  # (A,) position of the annotation's image, -1 if unknown
    ann_category_ids: list  # (A,) the raw category_id values
    degenerate: np.ndarray  # (A,) bool: w or h <= 0, a non-finite value, or not 4 numbers
    errors: list[str]
    # (A, 4) float64 xyxy clipped to the image (NaN for degenerate boxes or unknown images)
    clipped_xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    outside: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (A,) entirely outside: dropped
    clipped: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (A,) partly outside, not crowd
    crowd: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (A,) iscrowd=1
    usable: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (A,) a training target
    category_box_counts: dict[int, int] = field(default_factory=dict)  # id -> usable boxes
    error_problems: list[Problem] = field(default_factory=list)  # one per offender of `errors`
    annotations: Sequence = field(default_factory=list, repr=False)  # the dict's, for the messages
    _problems: list[Problem] | None = field(default=None, repr=False)

    @property
    def problems(self) -> list[Problem]:
        """Every offender: the errors, then one warning per degenerate, outside or clipped box and per
        category without a usable box. Built on first use: a loader that only needs the counts and
        the first examples does not format a line for each of (possibly) 100k clipped boxes."""
        if self._problems is None:
            self._problems = self.error_problems + self._box_problems()
        return self._problems

    def _box_problems(self) -> list[Problem]:
        anns, problems = self.annotations, []
        for j in np.flatnonzero(self.degenerate).tolist():
            bbox = anns[j].get("bbox") if isinstance(anns[j], dict) else None
            reason = (
                "w or h <= 0 (a bbox is [x, y, w, h], not [x1, y1, x2, y2])"
                if np.isfinite(self.bboxes_xywh[j]).all()
                else "not 4 finite numbers (NaN, inf or missing values)"
            )
            problems.append(
                Problem(
                    WARNING,
                    "box_degenerate",
                    annotation_name(anns[j], j),
                    f"bbox {shown_bbox(bbox)}: {reason}; dropped",
                )
            )
        for kind, mask in (("box_outside", self.outside), ("box_clipped", self.clipped)):
            for j in np.flatnonzero(mask).tolist():
                i = self.ann_image_idx[j]
                image = f"its {self.widths[i]}x{self.heights[i]} (w x h) image {self.file_names[i]}"
                what = (
                    f"lies entirely outside {image}; dropped"
                    if kind == "box_outside"
                    else f"reaches outside {image}; clipped to "
                    f"{[round(float(v), 2) for v in self.clipped_xyxy[j]]} (x1, y1, x2, y2)"
                )
                problems.append(
                    Problem(
                        WARNING, kind, annotation_name(anns[j], j), f"bbox {shown_bbox(anns[j].get('bbox'))} {what}"
                    )
                )
        # categories no box uses (a labelling tool's placeholder class, e.g. id 0): a dead output
        for cid, n in self.category_box_counts.items():
            if n == 0:
                problems.append(
                    Problem(
                        WARNING,
                        "category_without_boxes",
                        f"category {cid} {self.category_names[cid]!r}",
                        "has no usable box; it still counts in model.num_classes (an output the model never "
                        "learns): remove it from the categories unless its boxes come later",
                    )
                )
        return problems


def shown_bbox(bbox: Any) -> Any:
    """A bbox as a message shows it: floats rounded to 4 decimals (a converter's 102.39999999999999
    reads as 102.4); anything else as given."""
    if isinstance(bbox, (list, tuple)):
        return [round(v, 4) if isinstance(v, float) and math.isfinite(v) else v for v in bbox]
    return bbox


def source_of(item: Any) -> str:
    """' (<source>)' when a format reader recorded where an image or annotation came from, else ''."""
    src = item.get("source") if isinstance(item, dict) else None
    return f" ({src})" if isinstance(src, str) and src else ""


def annotation_name(ann: Any, j: int) -> str:
    """How a report names annotation j: 'annotation <id> (<source>)'."""
    if not isinstance(ann, dict):
        return f"annotation #{j}"
    return f"annotation {ann.get('id', f'#{j}')}{source_of(ann)}"


def check_coco(data: dict) -> CocoIndex:
    """The rules every reader of a COCO file applies: the training and test loaders and the evaluator.

    Errors (collected, not raised): categories without an integer id or with duplicate ids, no
    categories, images without an integer id, a file_name or a positive height/width, duplicate
    image ids, two images with the same file_name (each entry would train on the other's objects
    as background), annotations of unknown images or categories. Degenerate boxes are flagged, not
    errors: both training and evaluation leave them out with one warning (see
    `degenerate_box_warning`); boxes entirely outside their image are dropped, partly outside
    clipped, and categories without a usable box noted (warnings in `problems`).
    """
    errors: list[str] = []
    problems: list[Problem] = []

    def error(kind: str, where: str, message: str) -> None:
        problems.append(Problem(ERROR, kind, where, message))

    # --- categories
    cat_names: dict[int, str] = {}
    bad_cats, dup_cats = [], []
    for cat in data["categories"]:
        cid = cat.get("id") if isinstance(cat, dict) else None
        if isinstance(cid, bool) or not isinstance(cid, int):
            bad_cats.append(repr(cat)[:60])
            error("category_bad", f"category {repr(cat)[:60]}", "has no integer 'id'")
        elif cid in cat_names:
            dup_cats.append(cid)
            error("category_duplicate_id", f"category {cid}", f"id {cid} is used by two categories; give each its own")
        else:
            cat_names[cid] = str(cat.get("name", f"class_{cid}"))
    if bad_cats:
        errors.append(f"{len(bad_cats)} categories without an integer id (first: {_first(bad_cats)})")
    if dup_cats:
        errors.append(f"{len(dup_cats)} duplicate category ids (first: {_first(dup_cats)})")
    if not cat_names and not bad_cats:
        errors.append("no categories: the 'categories' list is empty")
        error("no_categories", "categories", "the 'categories' list is empty")

    # --- images
    index_of: dict[Any, int] = {}  # image id -> row; looked up with the annotations' raw JSON values
    image_ids: list[int] = []
    heights: list[int] = []
    widths: list[int] = []
    file_names: list[str] = []
    first_with_name: dict[str, int] = {}  # file_name -> id of the first image listing it
    dup_ids, bad_images, dup_names = [], [], []
    for img in data["images"]:
        iid = img.get("id") if isinstance(img, dict) else None
        if isinstance(iid, bool) or not isinstance(iid, int) or not isinstance(img.get("file_name"), str):
            bad_images.append(repr(img)[:60])
            error("image_bad", f"image {repr(img)[:60]}", "needs an integer 'id' and a 'file_name'")
            continue
        where = f"image {iid} ({img['file_name']}){source_of(img)}"
        h, w = img.get("height"), img.get("width")
        if not (isinstance(h, (int, float)) and isinstance(w, (int, float)) and h > 0 and w > 0):
            bad_images.append(f"id {iid} ({img['file_name']}: height={h!r}, width={w!r})")
            error("image_bad", where, f"height={h!r}, width={w!r}: both must be positive numbers")
            continue
        if iid in index_of:
            dup_ids.append(iid)
            error("image_duplicate_id", where, f"image id {iid} is already used by an earlier image")
            continue
        if img["file_name"] in first_with_name:
            other = first_with_name[img["file_name"]]
            dup_names.append(f"{img['file_name']!r} (ids {other} and {iid})")
            error(
                "image_duplicate_name",
                where,
                f"the file is already listed as image {other}: list it once, with all its boxes",
            )
            continue
        first_with_name[img["file_name"]] = iid
        index_of[iid] = len(image_ids)
        image_ids.append(iid)
        heights.append(int(h))
        widths.append(int(w))
        file_names.append(img["file_name"])
    if not data["images"]:
        errors.append("no images: the 'images' list is empty")
        error("no_images", "images", "the 'images' list is empty")
    if dup_ids:
        errors.append(
            f"{len(dup_ids)} duplicate image ids (first: {_first(dup_ids)}); every entry of 'images' needs its own id"
        )
    if dup_names:
        errors.append(
            f"{len(dup_names)} images share a file_name with an earlier image (first: {_first(dup_names)}); list each "
            "file once with all its boxes (two entries train each other's objects as background)"
        )
    if bad_images:
        errors.append(
            f"{len(bad_images)} images without an integer id, a file_name or a positive height/width (first: {_first(bad_images)})"
        )

    # --- annotations
    anns = data["annotations"]
    raw = np.full((len(anns), 4), np.nan, dtype=np.float64)
    ann_image_idx = np.full(len(anns), -1, dtype=np.int64)
    ann_category_ids: list = [None] * len(anns)
    crowd = np.zeros(len(anns), dtype=bool)
    category_pos: dict[Any, int] = {cid: k for k, cid in enumerate(cat_names)}
    ann_category_pos = np.full(len(anns), -1, dtype=np.int64)  # position in cat_names, -1 if unknown
    unknown_cat, unknown_img = [], []
    for j, ann in enumerate(anns):
        if not isinstance(ann, dict):
            unknown_img.append(f"annotation #{j} is not an object")
            error("annotation_bad", f"annotation #{j}", "is not a JSON object")
            continue
        aid = ann.get("id", f"#{j}")
        idx = index_of.get(ann.get("image_id"))
        if idx is None:
            unknown_img.append(f"annotation {aid}{source_of(ann)} -> image_id {ann.get('image_id')!r}")
            error(
                "annotation_unknown_image",
                annotation_name(ann, j),
                f"image_id {ann.get('image_id')!r} is not in 'images'",
            )
        else:
            ann_image_idx[j] = idx
        cid = ann_category_ids[j] = ann.get("category_id")
        # an id of the table (1.0 finds 1 as before; a bool, string or list id is unknown)
        pos = category_pos.get(cid) if type(cid) in (int, float) else None
        if pos is not None:
            ann_category_pos[j] = pos
        else:
            unknown_cat.append(f"annotation {aid}{source_of(ann)} -> category_id {ann.get('category_id')!r}")
            error(
                "annotation_unknown_category",
                annotation_name(ann, j),
                f"category_id {ann.get('category_id')!r} is not one of the categories {_first(sorted(cat_names), 20)}",
            )
        crowd[j] = bool(ann.get("iscrowd", 0))
        bbox = ann.get("bbox")
        if isinstance(bbox, (list, tuple)) and len(bbox) == 4 and not any(isinstance(v, bool) for v in bbox):
            try:
                raw[j] = bbox
            except (TypeError, ValueError):
                pass  # stays NaN: degenerate
    if unknown_cat:
        errors.append(
            f"{len(unknown_cat)} annotations with unknown category ids (first: {_first(unknown_cat)}); the categories are {_first(sorted(cat_names), 20)}"
        )
    if unknown_img:
        errors.append(
            f"{len(unknown_img)} annotations of image ids that are not in 'images' (first: {_first(unknown_img)})"
        )
    degenerate = ~np.isfinite(raw).all(axis=1) | ~(raw[:, 2] > 0) | ~(raw[:, 3] > 0)

    # --- boxes against their image (vectorized over annotations): clip, or drop when nothing is left
    known = ann_image_idx >= 0
    img_h = np.where(known, np.asarray(heights + [0], dtype=np.float64)[ann_image_idx], np.nan)
    img_w = np.where(known, np.asarray(widths + [0], dtype=np.float64)[ann_image_idx], np.nan)
    x, y, w, h = raw.T
    with np.errstate(invalid="ignore"):
        xyxy = np.stack([x, y, x + w, y + h], axis=1)
        clipped_xyxy = np.stack(
            [
                np.clip(xyxy[:, 0], 0, img_w),
                np.clip(xyxy[:, 1], 0, img_h),
                np.clip(xyxy[:, 2], 0, img_w),
                np.clip(xyxy[:, 3], 0, img_h),
            ],
            axis=1,
        )
        outside = (
            known
            & ~degenerate
            & ~((clipped_xyxy[:, 2] > clipped_xyxy[:, 0]) & (clipped_xyxy[:, 3] > clipped_xyxy[:, 1]))
        )
        clipped = known & ~degenerate & ~outside & ~crowd & (np.abs(clipped_xyxy - xyxy) > 1e-6).any(axis=1)
    usable = known & (ann_category_pos >= 0) & ~degenerate & ~outside & ~crowd

    # --- usable boxes per category (a category without any is a dead output: a warning)
    per_position = np.bincount(ann_category_pos[usable], minlength=len(cat_names)).tolist()
    counts = dict(zip(cat_names, per_position))

    return CocoIndex(
        cat_names,
        index_of,
        image_ids,
        heights,
        widths,
        file_names,
        raw,
        ann_image_idx,
        ann_category_ids,
        degenerate,
        errors,
        clipped_xyxy=clipped_xyxy,
        outside=outside,
        clipped=clipped,
        crowd=crowd,
        usable=usable,
        category_box_counts=counts,
        error_problems=problems,
        annotations=anns,
    )


def raise_coco_errors(errors: Sequence[str], where: str) -> None:
    """One DataError listing every problem of a file, or nothing when there is none."""
    if errors:
        listing = "\n  - ".join(errors)
        raise DataError(
            f"{where}: {len(errors)} problem(s) must be fixed before this dataset can be used:\n  - {listing}"
        )


def degenerate_box_examples(anns: Sequence, degenerate: np.ndarray) -> list[str]:
    return [
        f"{annotation_name(anns[j], j)} bbox {anns[j].get('bbox') if isinstance(anns[j], dict) else None}"
        for j in np.flatnonzero(degenerate)[:MAX_LISTED]
    ]


def _missing_files(image_root: Path, file_names: Sequence[str]) -> list[str]:
    """file_names (relative to image_root, or absolute) that do not exist, listing each folder once."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for name in file_names:
        path = os.path.join(image_root, name)
        by_dir[os.path.dirname(path)].append(name)
    missing: list[str] = []
    for folder, names in by_dir.items():
        try:
            present = set(os.listdir(folder))
        except OSError:
            present = set()
        missing.extend(n for n in names if os.path.basename(n) not in present)
    return missing


def load_coco_json(
    ann_file: str | os.PathLike, image_root: str | os.PathLike, *, name: str = "", check_image_files: bool = True
) -> CocoDataset:
    """Load and validate a COCO-format detection json; see the module docstring for the rules.

    Raises DataError listing every problem that must be fixed by the user.
    """
    ann_path = Path(ann_file)
    root = Path(image_root)
    data = read_coco_dict(ann_path)
    index = check_coco(data)
    errors = list(index.errors)
    category_ids = sorted(index.category_names)
    cat_names = index.category_names
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    image_ids, heights, widths, file_names = index.image_ids, index.heights, index.widths, index.file_names
    anns = data["annotations"]
    num_anns = len(anns)
    ann_image_idx = index.ann_image_idx
    ann_label = np.array(
        [label_of.get(c, -1) if not isinstance(c, bool) else -1 for c in index.ann_category_ids], dtype=np.int64
    ).reshape(num_anns)
    ann_crowd = index.crowd

    if check_image_files and file_names:
        if not root.is_dir():
            errors.append(f"the image folder {root} does not exist (image_root of this dataset)")
        else:
            missing = _missing_files(root, file_names)
            if missing:
                errors.append(
                    f"{len(missing)} of {len(file_names)} image files missing under {root} (first: {_first(missing)})"
                )

    where = f"dataset {name!r} ({ann_path})" if name else str(ann_path)
    raise_coco_errors(errors, where)

    # --- boxes: drop degenerate, clip to the image, keep crowd out (all vectorized over annotations)
    report = AnnotationReport(num_images=len(image_ids), num_annotations=num_anns)
    # check_coco clipped, flagged and chose the targets (usable: not degenerate, outside or crowd)
    degenerate, outside, clipped = index.degenerate, index.outside, index.clipped
    clipped_xyxy = index.clipped_xyxy
    keep = index.usable
    report.num_crowd = int(ann_crowd.sum())
    report.num_degenerate = int(degenerate.sum())
    report.num_outside = int(outside.sum())
    report.num_clipped = int(clipped.sum())
    report.empty_categories = [f"{cid} {cat_names[cid]!r}" for cid, n in index.category_box_counts.items() if n == 0]
    for key, mask in (("degenerate", degenerate), ("outside", outside), ("clipped", clipped)):
        if mask.any():
            js = np.flatnonzero(mask)[:MAX_LISTED]
            report.examples[key] = [f"{annotation_name(anns[j], j)} bbox {anns[j].get('bbox')}" for j in js]

    kept = np.flatnonzero(keep)
    order = kept[np.argsort(ann_image_idx[kept], kind="stable")]
    counts = np.bincount(ann_image_idx[order], minlength=len(image_ids)) if len(image_ids) else np.zeros(0, np.int64)
    report.num_boxes = len(order)
    report.num_images_without_boxes = int((counts == 0).sum())
    records = DetectionRecords(
        image_ids,
        heights,
        widths,
        [str(root / f) for f in file_names],
        clipped_xyxy[order].astype(np.float32),
        ann_label[order],
        counts,
    )
    summary = report.summary()
    if summary:
        logger.warning("%s: %s", where, summary)
    logger.info(
        "%s: %d images, %d boxes kept as targets, %d crowd regions kept out, %d images without boxes, %d categories",
        where,
        report.num_images,
        report.num_boxes,
        report.num_crowd,
        report.num_images_without_boxes,
        len(category_ids),
    )
    return CocoDataset(
        name=name or ann_path.stem,
        ann_file=str(ann_path),
        image_root=str(root),
        records=records,
        class_names=tuple(cat_names[c] for c in category_ids),
        category_ids=tuple(category_ids),
        report=report,
    )


# A training run asks for the same file a few times (dataset info, train loader, evaluation);
# COCO train2017 takes tens of seconds to parse, so the last few loads are kept.
_CACHE: OrderedDict[tuple, CocoDataset] = OrderedDict()
_CACHE_SIZE = 4


def load_coco_json_cached(
    ann_file: str | os.PathLike, image_root: str | os.PathLike, *, name: str = "", check_image_files: bool = True
) -> CocoDataset:
    """`load_coco_json`, reusing the result while the file's size and mtime are unchanged."""
    ann_path = Path(ann_file)
    try:
        st = ann_path.stat()
        key: tuple | None = (
            str(ann_path.resolve()),
            st.st_mtime_ns,
            st.st_size,
            str(Path(image_root).resolve()),
            name,
            check_image_files,
        )
    except OSError:
        key = None
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    dataset = load_coco_json(ann_path, image_root, name=name, check_image_files=check_image_files)
    if key is not None:
        _CACHE[key] = dataset
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return dataset
