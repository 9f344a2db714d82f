"""Pascal VOC box AP with the arithmetic of Detectron2's PascalVOCDetectionEvaluator.

    evaluator = VOCEvaluator(ground_truth, metric="voc07")   # a COCO-format dict or json file
    metrics = evaluator.evaluate(predictions)                 # COCO results, as for COCOEvaluator
    # {"AP": 52.1, "AP50": 78.0, "AP75": 55.3, "per_class": {"aeroplane": 80.1, ...}}  (percent)

Metrics (`test.metric` in the config):
  voc07  VOC2007's 11-point interpolated AP: the mean, over recall 0, 0.1, ..., 1, of the best
         precision at that recall or above (Detectron2's use_07_metric=True; its default for
         voc_2007_test, and how VOC07 test numbers are usually reported).
  voc12  the area under the interpolated precision/recall curve (VOC2010 and later, use_07_metric=False).
"AP50" is the VOC mAP (mean over classes of the AP at IoU > 0.5), "AP75" the same at IoU > 0.75,
"AP" Detectron2's mean of the mAPs at IoU > 0.50, 0.55, ..., 0.95, and "per_class" the AP at IoU > 0.5
of each category (the VOC table), in the ground truth's category order.

Matching, per class, as VOC's devkit and Detectron2 do it (it differs from COCOeval): detections are
taken in decreasing score order; each one is compared with every ground-truth box of its class in
its image and takes the one of largest IoU (the first of equal ones). IoU > threshold and that box
`difficult` (or iscrowd=1): the detection is ignored, neither true nor false positive; IoU > threshold
and the box not yet taken: true positive; taken already (a duplicate): false positive, even when
another free box also overlaps it; IoU <= threshold (or no box): false positive. Recall counts the
boxes that are not difficult. The annotation key "difficult" (0/1, absent = 0) is the one the VOC
reader writes.

Detectron2 arithmetic reproduced exactly (detectron2/evaluation/pascal_voc_evaluation.py):
  - ground truth in VOC's 1-based inclusive pixel integers: the VOC reader stores the XML's
    (xmin, ymin, xmax, ymax) as the COCO box [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
    (Detectron2's pascal_voc.py convention), and this module takes back x + 1, y + 1, x + w, y + h,
    the XML integers (boxes from other sources are used as they are, not rounded);
  - a predicted box [x1, y1, x2, y2] (float32, as the model writes it) becomes the text Detectron2
    writes, xmin = x1 + 1 and ymin = y1 + 1 in float32, each coordinate rounded to 0.1 px and the score
    to 0.001 (f"{v:.1f}", f"{s:.3f}": Python's correctly rounded formatting, not numpy's round); the
    sort and the matching use these rounded values;
  - IoU with VOC's "+1" widths: (x2 - x1 + 1) * (y2 - y1 + 1), in the same float64 operations.
    With the two shifts above this is the continuous-coordinate IoU of the COCO boxes, up to the 0.1 px
    rounding.
Predictions arrive here as COCO [x, y, w, h]; x2 = x + w is recomputed in float32, which can differ by
one float32 ulp from the model's x2 and then, rarely, round to the other 0.1 px.

Two deliberate differences, both documented in docs/evaluation-and-analysis.md:
  - Score ties (frequent after the rounding to 0.001) keep the order the detections arrive in (image
    order, then the model's order): a stable sort. Detectron2 calls np.argsort, whose default sort is
    not stable on numpy 2 with the x86 SIMD sort (already at 5 detections), so its own number can
    depend on the machine when a tie mixes true and false positives; it equals detkit's where that
    sort keeps ties in order (the tests pin both).
  - A class without any non-difficult ground truth in the test set has no defined AP: detkit reports
    NaN (null in metrics.json) and leaves it out of the means, as the COCO path does. Detectron2 counts
    such a class as 0 (voc07, or voc12 without detections) or NaN (voc12 with detections, which then
    makes its mAP NaN). On the 20 VOC classes of VOC2007 test every class has ground truth, so the
    numbers are the same.

Shapes in this file: T = 10 IoU thresholds, K categories, D detections of one class, G ground-truth
boxes of one class, I images, M the most boxes of one class in one image.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detkit.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

VOC_METRICS = ("voc07", "voc12")
# Detectron2 loops `for thresh in range(50, 100, 5)` and passes thresh / 100.0: the same doubles.
IOU_THRESHOLDS_PERCENT = tuple(range(50, 100, 5))
# The 11 recall points of VOC07, as np.arange builds them (0.30000000000000004, not 0.3: a recall of
# exactly 0.3 is below it, as in Detectron2).
_RECALL_POINTS_07 = np.arange(0.0, 1.1, 0.1)
METRIC_KEYS_VOC = ("AP", "AP50", "AP75")
# Detections x boxes per IoU matrix (about 32 MB of float64 with its temporaries).
_IOU_ELEMENTS_PER_CHUNK = 1 << 20


def check_metric(metric: str) -> str:
    """`metric` when it names a VOC metric, else a ConfigError naming the choices."""
    if metric not in VOC_METRICS:
        raise ConfigError(f"test.metric={metric!r} is not a VOC metric; use voc07 (11-point) or voc12 (area)")
    return metric


# --------------------------------------------------------------------------------------------
# Detectron2's text round trip
# --------------------------------------------------------------------------------------------


def _round_text(values: np.ndarray, digits: int) -> np.ndarray:
    """float64 values as Python's f"{v:.{digits}f}" writes them, read back (Detectron2's text files).

    Python's formatting rounds the exact binary value correctly (half to even only on exact halves).
    np.round computes rint(v * 10^digits) / 10^digits, which agrees with it whenever the product is
    exact: true for every float32 value (24 significant bits, plus at most 7 for 10 or 1000, fit in
    float64's 53), which is what the model writes. Other values (a results file's float64 scores)
    take the text route, one at a time.
    """
    values = np.asarray(values, dtype=np.float64)
    out = np.round(values, digits)
    with np.errstate(over="ignore"):
        not_float32 = values.astype(np.float32).astype(np.float64) != values
    if not_float32.any():
        fmt = f"{{:.{digits}f}}"
        out[not_float32] = [float(fmt.format(v)) for v in values[not_float32].tolist()]
    return out


def prediction_voc_boxes(bboxes_xywh: np.ndarray) -> np.ndarray:
    """COCO [x, y, w, h] predictions -> the [xmin, ymin, xmax, ymax] Detectron2's voc_eval reads.

    bboxes_xywh: (D, 4). Returns (D, 4) float64 on the 0.1 px grid: (x1 + 1, y1 + 1, x2, y2) computed
    in float32 (the model's precision) and rounded as Detectron2's result text rounds them.
    """
    xywh = np.asarray(bboxes_xywh, dtype=np.float64).reshape(-1, 4).astype(np.float32)
    x1y1 = xywh[:, :2]
    x2y2 = x1y1 + xywh[:, 2:]  # float32, as x2 = x1 + (x2 - x1) of the model's float32 boxes
    voc = np.concatenate([x1y1 + np.float32(1.0), x2y2], axis=1)  # "xmin += 1; ymin += 1" on float32
    return _round_text(voc.astype(np.float64), 1)


def ground_truth_voc_boxes(bboxes_xywh: np.ndarray) -> np.ndarray:
    """COCO [x, y, w, h] ground truth -> VOC's 1-based inclusive [xmin, ymin, xmax, ymax].

    bboxes_xywh: (G, 4) float64 with x = xmin - 1, w = xmax - xmin + 1 (the VOC reader's convention).
    Returns (G, 4) float64: the XML integers exactly when the boxes came from VOC XML.
    """
    xywh = np.asarray(bboxes_xywh, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([xywh[:, :2] + 1.0, xywh[:, :2] + xywh[:, 2:]], axis=1)


def voc_iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU with VOC's inclusive-pixel widths (w = x2 - x1 + 1), in Detectron2's float64 operations.

    det: (D, 4), gt: (D, M, 4) [xmin, ymin, xmax, ymax]; returns (D, M). Padding rows of gt set to NaN
    give NaN; the caller masks them.
    """
    d = det[:, None, :]
    iw = np.maximum(np.minimum(gt[..., 2], d[..., 2]) - np.maximum(gt[..., 0], d[..., 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(gt[..., 3], d[..., 3]) - np.maximum(gt[..., 1], d[..., 1]) + 1.0, 0.0)
    inters = iw * ih
    union = (
        (d[..., 2] - d[..., 0] + 1.0) * (d[..., 3] - d[..., 1] + 1.0)
        + (gt[..., 2] - gt[..., 0] + 1.0) * (gt[..., 3] - gt[..., 1] + 1.0)
        - inters
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return inters / union


# --------------------------------------------------------------------------------------------
# Average precision
# --------------------------------------------------------------------------------------------


def voc_average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP of one class from its cumulative recall and precision, (D,) each, in detection order.

    use_07_metric: VOC07's 11-point mean of the best precision at recall >= t; else the area under
    the precision envelope (precision made non-increasing from the right), summed where recall changes.
    """
    if use_07_metric:
        # recall is non-decreasing (a cumulative count), so "recall >= t" is a suffix of the array.
        best_after = np.maximum.accumulate(precision[::-1])[::-1] if precision.size else precision
        first = np.searchsorted(recall, _RECALL_POINTS_07, side="left")  # (11,)
        ap = 0.0
        # One addition after the other, in Detectron2's order, so the sum is the same double.
        for i in first.tolist():
            ap = ap + (float(best_after[i]) if i < recall.size else 0.0) / 11.0
        return ap
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the precision envelope
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


@dataclass
class ClassMatches:
    """The IoU-independent part of one class's matching.

    best_iou: (D,) each detection's largest IoU with a box of its class in its image (-inf when
    there is none); best_gt: (D,) that box's index into the class's ground truth (-1 when none);
    ignore_gt: (G,) difficult or crowd; num_positives: boxes that are not ignored.
    """

    best_iou: np.ndarray
    best_gt: np.ndarray
    ignore_gt: np.ndarray
    num_positives: int


def match_class(
    det_boxes: np.ndarray,
    det_images: np.ndarray,
    gt_boxes: np.ndarray,
    gt_images: np.ndarray,
    gt_ignore: np.ndarray,
    num_images: int,
) -> ClassMatches:
    """Each detection's best ground-truth box, for one class.

    det_boxes: (D, 4) VOC boxes already in evaluation order; det_images: (D,) image positions 0..I-1;
    gt_boxes: (G, 4) VOC boxes; gt_images: (G,) image positions; gt_ignore: (G,) bool.
    """
    num_gt = len(gt_boxes)
    # Pad the class's boxes per image: (I, M, 4), keeping the annotation order inside an image so that
    # argmax picks the first of equal IoUs as Detectron2 does.
    by_image = np.argsort(gt_images, kind="stable")
    counts = np.bincount(gt_images, minlength=num_images)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    slot = np.arange(num_gt) - starts[gt_images[by_image]]
    max_per_image = int(counts.max()) if num_gt else 0
    padded = np.full((num_images, max(max_per_image, 1), 4), np.nan)
    index = np.full((num_images, max(max_per_image, 1)), -1, dtype=np.int64)
    padded[gt_images[by_image], slot] = gt_boxes[by_image]
    index[gt_images[by_image], slot] = by_image

    num_det = len(det_boxes)
    best_iou, best_gt = np.full(num_det, -np.inf), np.full(num_det, -1, dtype=np.int64)
    # Detections in chunks so that the (chunk, M) IoU matrix stays small (COCO's person class can
    # have 10^5 detections and 10^2 boxes in one image).
    chunk = max(1, _IOU_ELEMENTS_PER_CHUNK // padded.shape[1])
    for lo in range(0, num_det, chunk):
        hi = min(lo + chunk, num_det)
        candidates = index[det_images[lo:hi]]  # (C, M) ground-truth index, -1 for padding
        iou = np.where(candidates >= 0, voc_iou(det_boxes[lo:hi], padded[det_images[lo:hi]]), -np.inf)
        # np.max and np.argmax as Detectron2 calls them: a NaN IoU (a degenerate box) wins both, and
        # NaN > threshold is False, so such a detection is a false positive there and here.
        best_iou[lo:hi] = np.max(iou, axis=1)
        best_gt[lo:hi] = candidates[np.arange(hi - lo), np.argmax(iou, axis=1)]  # -1: no box of the class
    return ClassMatches(best_iou, best_gt, gt_ignore, int((~gt_ignore).sum()))


def class_average_precision(matches: ClassMatches, iou_threshold: float, use_07_metric: bool) -> float:
    """AP of one class at one IoU threshold (NaN when the class has no box that is not ignored)."""
    if matches.num_positives == 0:
        return math.nan
    hit = matches.best_iou > iou_threshold  # (D,)
    ignored = hit & matches.ignore_gt[np.where(hit, matches.best_gt, 0)] if hit.size else hit
    candidate = hit & ~ignored
    tp = np.zeros(len(hit))
    # The first detection (in evaluation order) to reach a box takes it; later ones are duplicates.
    _, first = np.unique(matches.best_gt[candidate], return_index=True)
    tp[np.flatnonzero(candidate)[first]] = 1.0
    fp = (~ignored).astype(np.float64) - tp
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / float(matches.num_positives)
    # An ignored first detection leaves tp + fp = 0: precision 0 there, as in Detectron2.
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_average_precision(recall, precision, use_07_metric)


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------


@dataclass
class VOCResult:
    """Everything one VOC evaluation computed.

    metrics: {"AP", "AP50", "AP75": 0..100 or NaN, "per_class": {name: AP at IoU > 0.5, 0..100 or NaN}}
    ap: (T, K) AP of each IoU threshold (IOU_THRESHOLDS_PERCENT) and category, 0..1, NaN where undefined
    num_positives: (K,) ground-truth boxes per category that are not difficult
    num_detections: (K,) detections per category
    metric: "voc07" | "voc12"
    """

    metrics: dict
    ap: np.ndarray
    num_positives: np.ndarray
    num_detections: np.ndarray
    metric: str


class VOCEvaluator:
    """Pascal VOC AP of predictions against one ground truth, read and grouped once.

    ground_truth: a COCO-format dict (what detkit's dataset readers return, with "difficult" per
    annotation; not modified) or a COCO json file. metric: "voc07" | "voc12". source: how messages
    name the ground truth (default: the file, or "the ground-truth dataset").
    """

    def __init__(self, ground_truth: str | Path | dict, metric: str = "voc07", source: str | None = None):
        from detkit.engine.eval_common import _unique_names, load_ground_truth, prepare_ground_truth

        self.metric = check_metric(metric)
        if isinstance(ground_truth, dict):
            self.source = source or "the ground-truth dataset"
            # Fresh annotation dicts: the checks fill "area" and may renumber ids, the caller's dict stays as it is.
            annotations = [dict(a) if isinstance(a, dict) else a for a in ground_truth.get("annotations") or []]
            data = prepare_ground_truth({**ground_truth, "annotations": annotations}, self.source)
        else:
            self.source = source or str(ground_truth)
            data = load_ground_truth(ground_truth)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.category_names: dict[int, str] = _unique_names(categories)
        self.image_ids: list[int] = sorted(img["id"] for img in data["images"])
        self._image_pos = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self._category_pos = {cid: k for k, cid in enumerate(self.category_ids)}

        anns = data["annotations"]
        ignore, bad_difficult = [], []
        for ann in anns:
            difficult = ann.get("difficult", 0)
            if isinstance(difficult, str) or difficult not in (0, 1):
                bad_difficult.append(f"annotation {ann.get('id')} difficult={difficult!r}")
            ignore.append(bool(difficult) or bool(ann.get("iscrowd", 0)))
        if bad_difficult:
            raise DataError(
                f"{self.source}: {len(bad_difficult)} annotations have a 'difficult' value that is not 0 or 1 "
                f"(first: {', '.join(bad_difficult[:5])}); write 1 for VOC's difficult objects, 0 (or nothing) otherwise"
            )
        self._gt_boxes = ground_truth_voc_boxes(np.array([a["bbox"] for a in anns], dtype=np.float64))
        self._gt_images = np.array([self._image_pos[a["image_id"]] for a in anns], dtype=np.int64)
        self._gt_labels = np.array([self._category_pos[a["category_id"]] for a in anns], dtype=np.int64)
        self._gt_ignore = np.array(ignore, dtype=bool)

    def evaluate(self, predictions: Sequence[dict]) -> dict:
        """Metrics dict (see the module docstring) of COCO results `predictions`."""
        return self.run(predictions).metrics

    def run(self, predictions: Sequence[dict], source: str = "predictions") -> VOCResult:
        """Evaluate COCO results; checks them as COCOEvaluator does (DataError naming the offenders)."""
        from detkit.engine.eval_common import check_predictions

        start = time.perf_counter()
        checked = check_predictions(predictions, self.image_ids, self.category_ids, source)
        if not checked:
            logger.warning("%s: no predictions; every AP is 0 where %s has ground truth", source, self.source)
        boxes = prediction_voc_boxes(np.array([p["bbox"] for p in checked], dtype=np.float64).reshape(-1, 4))
        scores = _round_text(np.array([p["score"] for p in checked], dtype=np.float64), 3)
        images = np.array([self._image_pos[p["image_id"]] for p in checked], dtype=np.int64)
        labels = np.array([self._category_pos[p["category_id"]] for p in checked], dtype=np.int64)
        # Decreasing rounded score; ties keep the arrival order (see the module docstring).
        order = np.argsort(-scores, kind="stable")
        boxes, images, labels = boxes[order], images[order], labels[order]

        num_classes = len(self.category_ids)
        ap = np.full((len(IOU_THRESHOLDS_PERCENT), num_classes), math.nan)
        num_positives = np.zeros(num_classes, dtype=np.int64)
        num_detections = np.bincount(labels, minlength=num_classes)
        use_07 = self.metric == "voc07"
        for k in range(num_classes):
            in_class = labels == k
            gt = self._gt_labels == k
            matches = match_class(
                boxes[in_class],
                images[in_class],
                self._gt_boxes[gt],
                self._gt_images[gt],
                self._gt_ignore[gt],
                len(self.image_ids),
            )
            num_positives[k] = matches.num_positives
            for t, percent in enumerate(IOU_THRESHOLDS_PERCENT):
                ap[t, k] = class_average_precision(matches, percent / 100.0, use_07)

        metrics = summarize(ap * 100, [self.category_names[c] for c in self.category_ids])
        undefined = [self.category_names[c] for c, n in zip(self.category_ids, num_positives) if n == 0]
        if undefined:
            logger.warning(
                "%s: %d categories have no ground truth that is not difficult (%s): their AP is undefined (NaN) "
                "and left out of the means",
                self.source,
                len(undefined),
                ", ".join(undefined[:10]),
            )
        logger.info(
            "Evaluated %d predictions on %d images with the %s metric in %.2f s: AP50 (mAP) %.3f, AP %.3f",
            len(checked),
            len(self.image_ids),
            self.metric,
            time.perf_counter() - start,
            metrics["AP50"],
            metrics["AP"],
        )
        return VOCResult(metrics, ap, num_positives, num_detections, self.metric)


def summarize(ap_percent: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """(T, K) per-threshold, per-class AP in percent -> the metrics dict.

    As Detectron2: the mean over classes at each threshold, then AP = the mean of those T means.
    Classes whose AP is NaN (no ground truth) are left out of the class means.
    """
    valid = ~np.isnan(ap_percent[0])
    if valid.any():
        per_threshold = {p: float(np.mean(ap_percent[t, valid])) for t, p in enumerate(IOU_THRESHOLDS_PERCENT)}
        overall = float(np.mean(list(per_threshold.values())))
    else:
        per_threshold = dict.fromkeys(IOU_THRESHOLDS_PERCENT, math.nan)
        overall = math.nan
    return {
        "AP": overall,
        "AP50": per_threshold[50],
        "AP75": per_threshold[75],
        "per_class": {name: float(v) for name, v in zip(class_names, ap_percent[0])},
    }


def format_voc_metrics(metrics: dict, columns: int = 3) -> str:
    """Markdown tables of the VOC summary and of the per-class AP at IoU 0.5."""
    from detkit.engine.eval_common import _cell, _markdown_table, _per_class_table

    parts = [
        "Box AP (Pascal VOC: AP50 is the mAP at IoU > 0.5; AP the mean over IoU .50:.95):",
        _markdown_table(METRIC_KEYS_VOC, [[_cell(metrics[k]) for k in METRIC_KEYS_VOC]]),
    ]
    parts += _per_class_table(metrics.get("per_class", {}), columns, "Per-class AP50 (VOC):", "AP50")
    return "\n".join(parts)
