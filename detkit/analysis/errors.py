"""Why a detector loses AP: COCO error-analysis curves, the TIDE breakdown, a confusion matrix and a
per-class table, all from a ground-truth dict and COCO results.

    gt = load_ground_truth("instances_val.json")                 # detkit.engine.evaluator
    preds = check_predictions(load_predictions("predictions.json"), image_ids, category_ids)
    report = analyze_errors(gt, preds, iou_threshold=0.5)         # ErrorAnalysis

Shapes: K categories (sorted by id), R = 101 recall thresholds, A = 4 area ranges (all, small,
medium, large), D detections and G ground-truth boxes of one image.

COCO analyze curves (Hoiem et al. 2012 as the COCO API's MATLAB `analyze` computes them), at most
100 detections per image, each a precision-recall curve of one class and area range:
  C75, C50  PR at IoU .75 and .50 (pycocotools' own precision arrays at those thresholds);
  Loc       PR at IoU .10: localisation errors (not duplicates) forgiven;
  Sim       Loc + the class's detections on objects of another class of the same supercategory
            ignored (neither true nor false positives);
  Oth       Loc + detections on objects of any other class ignored;
  BG        Oth + every remaining false positive removed: precision 1 up to the recall Oth reaches;
  FN        every object found: precision 1 at every recall.
The area between two consecutive curves is the AP the next error type costs.

TIDE (Bolya et al., ECCV 2020; the definitions of its reference code, tidecv 1.0.1, re-implemented
here because tidecv needs pandas, seaborn and appdirs and is unmaintained since 2020). At the
foreground IoU t_f (0.5) and background IoU t_b (0.1) every false positive gets one type, tested in
this order: Bkg when its image has no object; Loc when its best same-class IoU is in [t_b, t_f];
Cls when its best other-class IoU is >= t_f; Dupe when it overlaps an already matched same-class
object with IoU >= t_f; Bkg when no object overlaps it by more than t_b; Both otherwise. An object
no detection found and no Cls/Loc error could fix is Miss. dAP of a type is the AP at t_f after
fixing that type alone (each type fixed in isolation, as the paper argues, so the numbers do not
depend on an order) minus the original AP: a Cls or Loc error becomes the true positive of its
object (only the highest-scoring one per object; the others are removed), Both, Dupe and Bkg
errors are removed, and Miss objects leave the ground truth. FP and FN are the special errors:
all false positives scored below all true positives, and every missed object removed.
TIDE's AP is COCO's 101-point interpolation, but it keeps the top 100 detections per image over
all classes (COCO: per image and class) and averages over every class with objects or detections.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from detkit.engine.eval_common import _unique_names
from detkit.engine.evaluator import _make_coco

AREA_NAMES = ("all", "small", "medium", "large")
ANALYZE_TYPES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
TIDE_TYPES = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
TIDE_SPECIAL = ("FP", "FN")
MAX_DETS = 100


# --------------------------------------------------------------------------------------------
# COCO analyze curves
# --------------------------------------------------------------------------------------------


def _cocoeval_class():
    from pycocotools.cocoeval import COCOeval

    class _IgnoringCOCOeval(COCOeval):
        """COCOeval that honours an `_analysis_ignore` flag on ground truth (pycocotools overwrites
        `ignore` with `iscrowd`): a detection matched to such an object is neither true nor false."""

        def _prepare(self):
            super()._prepare()
            for gts in self._gts.values():
                for gt in gts:
                    if gt.get("_analysis_ignore"):
                        gt["ignore"] = 1

    return _IgnoringCOCOeval


def _run_cocoeval(
    gt: dict,
    predictions: Sequence[dict],
    iou_thresholds: Sequence[float] | np.ndarray,
    max_dets: Sequence[int] = (MAX_DETS,),
    category_ids: Sequence[int] | None = None,
    image_ids: Sequence[int] | None = None,
):
    """pycocotools COCOeval after evaluate() and accumulate(), on copies of the inputs."""
    coco_gt = _make_coco("pycocotools", gt)
    coco_dt = _make_coco(
        "pycocotools",
        {"images": gt["images"], "categories": gt["categories"], "annotations": [dict(p) for p in predictions]},
    )
    coco_eval = _cocoeval_class()(coco_gt, coco_dt, iouType="bbox")
    coco_eval.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
    coco_eval.params.maxDets = list(max_dets)
    if category_ids is not None:
        coco_eval.params.catIds = list(category_ids)
    if image_ids is not None:
        coco_eval.params.imgIds = list(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


def coco_iou_thresholds() -> np.ndarray:
    """(10,) COCOeval's default IoU thresholds .50:.05:.95 (np.linspace, so .75 is not exactly 0.75)."""
    return np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)


@dataclass
class AnalyzeCurves:
    """precision: (7, R, K, A) in ANALYZE_TYPES order, NaN where class k has no object in area a.
    recall_thresholds: (R,)."""

    precision: np.ndarray
    recall_thresholds: np.ndarray
    category_ids: list[int]

    def curves(self, class_index: int | None = None, area: int = 0) -> np.ndarray:
        """(7, R) curves of one class, or averaged over the classes with objects (class_index None)."""
        values = self.precision[:, :, :, area]  # (7, R, K)
        if class_index is not None:
            return values[:, :, class_index]
        defined = ~np.isnan(values[0, 0])  # (K,)
        if not defined.any():
            return np.full(values.shape[:2], np.nan)
        return values[:, :, defined].mean(axis=2)

    def areas_under(self, class_index: int | None = None, area: int = 0) -> dict[str, float]:
        """The AP (0..100) of each curve: its mean precision over the recall thresholds."""
        curves = self.curves(class_index, area)
        return {name: float(curves[i].mean() * 100) for i, name in enumerate(ANALYZE_TYPES)}


def analyze_curves(gt: dict, predictions: Sequence[dict]) -> AnalyzeCurves:
    """The seven COCO analyze PR curves of every class and area range (see the module docstring)."""
    thresholds = coco_iou_thresholds()
    t75, t50 = thresholds[np.isclose(thresholds, 0.75)][0], thresholds[0]
    base = _run_cocoeval(gt, predictions, [t75, t50, 0.1])
    category_ids = list(base.params.catIds)
    num_r = len(base.params.recThrs)
    precision = np.zeros((len(ANALYZE_TYPES), num_r, len(category_ids), len(AREA_NAMES)))
    precision[:3] = base.eval["precision"][:, :, :, :, 0]  # (3, R, K, A)
    supercategory = {c["id"]: c.get("supercategory") for c in gt["categories"]}
    for k, category_id in enumerate(category_ids):
        own = [p for p in predictions if p["category_id"] == category_id]
        for row, same_group in ((3, True), (4, False)):
            relabelled = []
            for ann in gt["annotations"]:
                ann = dict(ann)
                other = ann["category_id"] != category_id
                if other and (
                    not same_group
                    or (
                        supercategory[ann["category_id"]] is not None
                        and supercategory[ann["category_id"]] == supercategory[category_id]
                    )
                ):
                    ann["category_id"] = category_id
                    ann["_analysis_ignore"] = True
                relabelled.append(ann)
            # Only images with an object or a detection of class k change its curve; the others
            # are left out (the same numbers, much faster on 80-class datasets).
            image_ids = sorted(
                {a["image_id"] for a in relabelled if a["category_id"] == category_id} | {p["image_id"] for p in own}
            )
            if not image_ids:
                continue  # no object of class k: its curves are undefined (NaN below)
            dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": relabelled}
            result = _run_cocoeval(dataset, own, [0.1], category_ids=[category_id], image_ids=image_ids)
            precision[row, :, k, :] = result.eval["precision"][0, :, 0, :, 0]
    undefined = precision[0] == -1  # (R, K, A): no object of class k in area a
    precision[5] = (precision[4] > 0).astype(np.float64)
    precision[6] = 1.0
    precision[:, undefined] = np.nan
    return AnalyzeCurves(
        precision=precision, recall_thresholds=np.asarray(base.params.recThrs), category_ids=category_ids
    )


# --------------------------------------------------------------------------------------------
# TIDE
# --------------------------------------------------------------------------------------------


def _interpolated_ap(scores: Sequence[float], is_true: Sequence[bool], num_gt: int) -> float:
    """COCO's 101-point AP (0..100) of detections in the given order (ties keep that order)."""
    if num_gt <= 0:
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.asarray(is_true, dtype=np.float64)[order]
    if tp.size == 0:
        return 0.0
    num_true = np.cumsum(tp)
    precision = num_true / np.arange(1, tp.size + 1)
    recall = num_true / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the non-increasing envelope
    # TIDE takes the recall points as k / 100 (COCO: np.linspace, which differs in the last bit).
    bars = np.searchsorted(recall, np.arange(101) / 100, side="left")
    values = np.where(bars < precision.size, precision[np.minimum(bars, precision.size - 1)], 0.0)
    return float(values.sum() / 101 * 100)


@dataclass
class TideError:
    """One error: `kind` in TIDE_TYPES; pred / gt index into TideResult.detections / .objects (-1: none)."""

    kind: str
    pred: int
    gt: int


@dataclass
class TideResult:
    """ap: AP at t_f (0..100); delta_ap: {type: dAP} for TIDE_TYPES + TIDE_SPECIAL; counts: {type: n}.

    detections / objects: the COCO dicts the errors index (detections sorted by score per image,
    top 100 per image; objects exclude crowd boxes). recall: {category_id: found / objects}.
    """

    ap: float
    delta_ap: dict[str, float]
    counts: dict[str, int]
    errors: list[TideError]
    detections: list[dict]
    objects: list[dict]
    recall: dict[int, float]
    pos_threshold: float
    bg_threshold: float


def _by_image(entries: Iterable[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for entry in entries:
        out.setdefault(entry["image_id"], []).append(entry)
    return out


def tide_errors(
    gt: dict,
    predictions: Sequence[dict],
    *,
    pos_threshold: float = 0.5,
    bg_threshold: float = 0.1,
    max_dets: int = MAX_DETS,
) -> TideResult:
    """TIDE's error types and the dAP of each (module docstring). predictions: checked COCO results."""
    gt_by_image = _by_image(gt["annotations"])
    pred_by_image = _by_image(predictions)
    detections: list[dict] = []
    objects: list[dict] = []
    # Per detection: (class, score, state) with state True (TP), False (FP) or None (on a crowd
    # region: not part of the AP). Per object: its class, whether matched, whether a Cls/Loc error
    # can fix it (usable) and that error's best score and detection.
    det_state: list = []
    obj_used: list[bool] = []
    best_fixer: dict[int, tuple[float, int]] = {}
    errors: list[TideError] = []
    for image in gt["images"]:
        image_id = image["id"]
        anns = gt_by_image.get(image_id, [])
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        first_obj = len(objects)
        objects.extend(a for a in anns if not a.get("iscrowd", 0))
        image_objs = objects[first_obj:]
        obj_used.extend([False] * len(image_objs))
        preds = sorted(pred_by_image.get(image_id, []), key=lambda p: -p["score"])[:max_dets]
        first_det = len(detections)
        detections.extend(preds)
        if not preds:
            errors.extend(TideError("Miss", -1, first_obj + g) for g in range(len(image_objs)))
            continue
        det_cls = np.array([p["category_id"] for p in preds])
        det_boxes = [p["bbox"] for p in preds]
        if image_objs:
            gt_cls = np.array([a["category_id"] for a in image_objs])
            iou = np.asarray(
                mask_utils.iou(det_boxes, [a["bbox"] for a in image_objs], [0] * len(image_objs))
            )  # (D, G)
            same = det_cls[:, None] == gt_cls[None, :]  # (D, G)
            cls_iou = iou * same
            buffer = cls_iou.copy()
        state: list = [False] * len(preds)
        for d in range(len(preds)):
            if not image_objs:
                break
            g = int(np.argmax(buffer[d]))
            if buffer[d, g] >= pos_threshold:
                state[d] = True
                obj_used[first_obj + g] = True
                buffer[:, g] = 0
        if crowd:
            crowd_iou = np.asarray(mask_utils.iou(det_boxes, [a["bbox"] for a in crowd], [1] * len(crowd)))  # (D, C)
            crowd_cls = np.array([a["category_id"] for a in crowd])
            for d in range(len(preds)):
                if not state[d] and np.any((crowd_iou[d] > pos_threshold) & (crowd_cls == det_cls[d])):
                    state[d] = None
        det_state.extend(state)
        if image_objs:
            used = np.array(obj_used[first_obj:])  # (G,)
            other_iou = iou * ~same
            used_cls_iou = cls_iou * used[None, :]
        for d in range(len(preds)):
            if state[d] is True:
                continue
            det_index = first_det + d
            if not image_objs:
                errors.append(TideError("Bkg", det_index, -1))
                continue
            g = int(np.argmax(cls_iou[d]))
            if bg_threshold <= cls_iou[d, g] <= pos_threshold:
                kind = "Loc"
            else:
                g = int(np.argmax(other_iou[d]))
                if other_iou[d, g] >= pos_threshold:
                    kind = "Cls"
                elif used_cls_iou[d].max() >= pos_threshold:
                    errors.append(TideError("Dupe", det_index, first_obj + int(np.argmax(used_cls_iou[d]))))
                    continue
                elif iou[d].max() <= bg_threshold:
                    errors.append(TideError("Bkg", det_index, -1))
                    continue
                else:
                    errors.append(TideError("Both", det_index, -1))
                    continue
            obj_index = first_obj + g
            errors.append(TideError(kind, det_index, obj_index))
            if not obj_used[obj_index]:
                score = preds[d]["score"]
                if obj_index not in best_fixer or best_fixer[obj_index][0] < score:
                    best_fixer[obj_index] = (score, det_index)
        for g in range(len(image_objs)):
            if not obj_used[first_obj + g] and (first_obj + g) not in best_fixer:
                errors.append(TideError("Miss", -1, first_obj + g))

    num_gt: dict[int, int] = {}
    for obj in objects:
        num_gt[obj["category_id"]] = num_gt.get(obj["category_id"], 0) + 1
    true_points = [(p["category_id"], p["score"], True) for p, s in zip(detections, det_state) if s is True]

    def mean_ap(points: list[tuple[int, float, bool]], gt_counts: dict[int, int]) -> float:
        classes = {c for c, _, _ in points} | {c for c, n in gt_counts.items() if n > 0}
        if not classes:
            return 0.0
        aps = []
        for c in sorted(classes):
            sel = [(s, t) for cls, s, t in points if cls == c]
            aps.append(_interpolated_ap([s for s, _ in sel], [t for _, t in sel], gt_counts.get(c, 0)))
        return float(np.mean(aps))

    def error_points(fix: str | None) -> tuple[list, dict[int, int]]:
        """The AP data after fixing errors of type `fix` (None: nothing), TIDE's push order:
        errors first, then the true positives."""
        points, counts = [], dict(num_gt)
        for err in errors:
            if err.kind == "Miss":
                if fix == "Miss":
                    counts[objects[err.gt]["category_id"]] -= 1
                continue
            det = detections[err.pred]
            if err.kind == fix:
                if fix in ("Cls", "Loc") and best_fixer.get(err.gt, (None, -1))[1] == err.pred:
                    cls = objects[err.gt]["category_id"] if fix == "Cls" else det["category_id"]
                    points.append((cls, det["score"], True))
                continue
            if det_state[err.pred] is not None:
                points.append((det["category_id"], det["score"], False))
        return points, counts

    # The original AP takes the detections in image order (as TIDE does); ties in score are the
    # only place where this order and the fixed data's order (errors first) can differ.
    ap = mean_ap([(p["category_id"], p["score"], st) for p, st in zip(detections, det_state) if st is not None], num_gt)
    original_points, _ = error_points(None)
    delta_ap = {}
    for kind in TIDE_TYPES:
        points, counts = error_points(kind)
        delta_ap[kind] = max(mean_ap(points + true_points, counts) - ap, 0.0)
    false_points = [(c, 0.0, False) for c, _, _ in original_points]
    delta_ap["FP"] = mean_ap(false_points + [(c, 1.0, True) for c, _, _ in true_points], num_gt) - ap
    found: dict[int, int] = {}
    for obj, was_used in zip(objects, obj_used):
        found[obj["category_id"]] = found.get(obj["category_id"], 0) + int(was_used)
    delta_ap["FN"] = mean_ap(original_points + true_points, found) - ap
    error_counts = {kind: sum(e.kind == kind for e in errors) for kind in TIDE_TYPES}
    recall = {c: found.get(c, 0) / n for c, n in num_gt.items()}
    return TideResult(
        ap=ap,
        delta_ap=delta_ap,
        counts=error_counts,
        errors=errors,
        detections=detections,
        objects=objects,
        recall=recall,
        pos_threshold=pos_threshold,
        bg_threshold=bg_threshold,
    )


# --------------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------------


def confusion_matrix(
    gt: dict,
    predictions: Sequence[dict],
    category_ids: Sequence[int],
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
) -> np.ndarray:
    """(K+1, K+1) counts: row = true class (last row: background), column = predicted class (last
    column: background, i.e. the object was missed).

    Per image the detections scoring >= score_threshold are matched greedily in score order, each
    to an unmatched object with IoU >= iou_threshold: one of its own class when there is one (the
    highest IoU), else the highest-IoU object of another class. Unmatched detections (a second box
    on a matched object included) count in the background row, unmatched objects in the background
    column. Crowd boxes are not objects; a detection unmatched otherwise but on a crowd box of its
    class is not counted.
    """
    index = {c: i for i, c in enumerate(category_ids)}
    bg = len(category_ids)
    matrix = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    gt_by_image = _by_image(gt["annotations"])
    pred_by_image = _by_image(p for p in predictions if p["score"] >= score_threshold)
    for image in gt["images"]:
        anns = gt_by_image.get(image["id"], [])
        objs = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        preds = sorted(pred_by_image.get(image["id"], []), key=lambda p: -p["score"])
        obj_cls = np.array([index[a["category_id"]] for a in objs], dtype=np.int64)
        matched = np.zeros(len(objs), dtype=bool)
        if preds and objs:
            iou = np.asarray(mask_utils.iou([p["bbox"] for p in preds], [a["bbox"] for a in objs], [0] * len(objs)))
        if preds and crowd:
            crowd_iou = np.asarray(
                mask_utils.iou([p["bbox"] for p in preds], [a["bbox"] for a in crowd], [1] * len(crowd))
            )
        for d, pred in enumerate(preds):
            k = index[pred["category_id"]]
            if objs:
                candidates = (iou[d] >= iou_threshold) & ~matched
                own = candidates & (obj_cls == k)
                pool = own if own.any() else candidates
                if pool.any():
                    g = int(np.argmax(np.where(pool, iou[d], -1.0)))
                    matched[g] = True
                    matrix[obj_cls[g], k] += 1
                    continue
            if crowd and any(
                crowd_iou[d, j] >= iou_threshold and a["category_id"] == pred["category_id"]
                for j, a in enumerate(crowd)
            ):
                continue
            matrix[bg, k] += 1
        for missed in np.flatnonzero(~matched):
            matrix[obj_cls[missed], bg] += 1
    return matrix


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (a row without entries stays 0)."""
    sums = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(matrix, sums, out=np.zeros(matrix.shape, dtype=np.float64), where=sums > 0)


# --------------------------------------------------------------------------------------------
# Per-class table and the whole analysis
# --------------------------------------------------------------------------------------------


def per_class_table(gt: dict, predictions: Sequence[dict], tide: TideResult) -> list[dict]:
    """One row per class, worst AP first: name, objects, detections, AP, AP50, AP75, APs/m/l, AR100
    (COCOeval, 0..100, NaN where undefined) and recall at TIDE's t_f (top 100 per image)."""
    coco_eval = _run_cocoeval(gt, predictions, coco_iou_thresholds(), max_dets=(1, 10, MAX_DETS))
    precision = coco_eval.eval["precision"]  # (T, R, K, A, M)
    recall = coco_eval.eval["recall"]  # (T, K, A, M)
    names = _unique_names(gt["categories"])
    num_objects: dict[int, int] = {}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            num_objects[ann["category_id"]] = num_objects.get(ann["category_id"], 0) + 1
    num_dets: dict[int, int] = {}
    for pred in predictions:
        num_dets[pred["category_id"]] = num_dets.get(pred["category_id"], 0) + 1

    def mean_valid(values: np.ndarray) -> float:
        values = values[values > -1]
        return float(values.mean() * 100) if values.size else math.nan

    rows = []
    for k, category_id in enumerate(coco_eval.params.catIds):
        rows.append(
            {
                "category_id": category_id,
                "name": names[category_id],
                "objects": num_objects.get(category_id, 0),
                "detections": num_dets.get(category_id, 0),
                "AP": mean_valid(precision[:, :, k, 0, -1]),
                "AP50": mean_valid(precision[0, :, k, 0, -1]),
                "AP75": mean_valid(precision[5, :, k, 0, -1]),
                "APs": mean_valid(precision[:, :, k, 1, -1]),
                "APm": mean_valid(precision[:, :, k, 2, -1]),
                "APl": mean_valid(precision[:, :, k, 3, -1]),
                "AR100": mean_valid(recall[:, k, 0, -1]),
                f"recall@{tide.pos_threshold:g}": tide.recall.get(category_id, math.nan) * 100,
            }
        )
    rows.sort(key=lambda r: (math.inf if math.isnan(r["AP"]) else r["AP"], r["name"]))
    return rows


@dataclass
class ErrorAnalysis:
    """Everything `analyze_errors` computes. confusion: (K+1, K+1) counts (see confusion_matrix)."""

    curves: AnalyzeCurves
    tide: TideResult
    confusion: np.ndarray
    per_class: list[dict]
    category_ids: list[int]
    class_names: list[str]
    iou_threshold: float
    score_threshold: float


def analyze_errors(
    gt: dict,
    predictions: Sequence[dict],
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
    bg_threshold: float = 0.1,
) -> ErrorAnalysis:
    """All error analyses of checked COCO results `predictions` against ground truth `gt`
    (`load_ground_truth`'s dict). The inputs are not modified."""
    gt = copy.deepcopy(gt)
    category_ids = sorted(c["id"] for c in gt["categories"])
    names = _unique_names(gt["categories"])
    tide = tide_errors(gt, predictions, pos_threshold=iou_threshold, bg_threshold=bg_threshold)
    return ErrorAnalysis(
        curves=analyze_curves(gt, predictions),
        tide=tide,
        confusion=confusion_matrix(
            gt, predictions, category_ids, iou_threshold=iou_threshold, score_threshold=score_threshold
        ),
        per_class=per_class_table(gt, predictions, tide),
        category_ids=category_ids,
        class_names=[names[c] for c in category_ids],
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
    )
