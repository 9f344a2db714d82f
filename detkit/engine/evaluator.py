"""COCO box evaluation (pycocotools or faster-coco-eval) and the inference loop that feeds it.

    evaluator = COCOEvaluator("annotations/instances_val2017.json")     # backend="auto"
    predictions = inference_on_dataset(model, loader, info.category_ids, device)
    metrics = evaluator.evaluate(predictions)  # {"AP": 41.1, "AP50": ..., "per_class": {"person": 55.2, ...}}
    print(format_metrics(metrics))

A prediction is a COCO result dict {"image_id": int, "category_id": int, "bbox": [x, y, w, h],
"score": float}: the box in original image pixels, the dataset's original category id (not detkit's
contiguous label). Extra keys (file_name, category_name, ...) are ignored.

Numbers are COCOeval's 12 summary stats times 100, as Detectron2 prints them: AP (IoU .50:.95),
AP50, AP75, APs/APm/APl (area < 32^2, 32^2..96^2, > 96^2), AR1/AR10/AR100 (max detections per image);
`per_class` is the AP of each category (area all, 100 detections), named by the ground-truth json.
A number COCO cannot define (no ground truth in that area range, or of that class) is NaN in
Python and null in metrics.json (`dump_metrics`), where COCOeval itself prints -1.

Bad input never reaches pycocotools' asserts: a predictions list with unknown image or category
ids or malformed entries raises `DataError` naming the first offenders and the fix; an empty list
is a documented zero result (AP 0 wherever there is ground truth) with a warning.

Pascal VOC's metric (test.metric: voc07 | voc12) is detkit.engine.voc_evaluator.VOCEvaluator, with
the same checks of ground truth and predictions; `build_evaluator` returns the one a config names.

Backends: `pycocotools` (the reference) and `faster_coco_eval` (C++ matching and accumulation, the
`fast-eval` extra). "auto" picks faster_coco_eval when it imports. Both give the same 12 stats: on
the tests' hand-made data (crowd, empty images, ties, > 100 detections per image) the largest
difference seen is 5.6e-17, floating-point summation order; the tests assert 1e-9.

Shapes in this file: T = 10 IoU thresholds, R = 101 recall thresholds, K categories,
A = 4 area ranges (all, small, medium, large), M = 3 max-detection settings (1, 10, 100).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from detkit.engine.distributed import unwrap
from detkit.engine.eval_common import (  # the public names re-exported (`x as x`)
    _cell,
    _markdown_table,
    _per_class_table,
    _unique_names,
)
from detkit.engine.eval_common import (
    check_predictions as check_predictions,
)
from detkit.engine.eval_common import (
    load_ground_truth as load_ground_truth,
)
from detkit.engine.eval_common import (
    load_predictions as load_predictions,
)
from detkit.engine.eval_common import (
    prepare_ground_truth as prepare_ground_truth,
)
from detkit.errors import ConfigError

logger = logging.getLogger(__name__)

# COCOeval.stats order for iouType "bbox".
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# What `evaluate` returns and metrics.json holds (plus "per_class").
METRIC_KEYS = STAT_NAMES[:9]
BACKENDS = ("pycocotools", "faster_coco_eval")


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _backend_importable(name: str) -> bool:
    try:
        importlib.import_module("pycocotools.cocoeval" if name == "pycocotools" else "faster_coco_eval")
    except Exception:  # noqa: BLE001 - a missing package or a broken binary wheel: either way not usable
        return False
    return True


def available_backends() -> list[str]:
    """The evaluation backends that import in this environment."""
    return [name for name in BACKENDS if _backend_importable(name)]


def resolve_backend(name: str = "auto") -> str:
    """'auto' -> 'faster_coco_eval' when it imports, else 'pycocotools'; a named one is checked."""
    if name == "auto":
        return "faster_coco_eval" if _backend_importable("faster_coco_eval") else "pycocotools"
    if name not in BACKENDS:
        raise ConfigError(f"test.eval_backend={name!r} is not a backend; use auto, {' or '.join(BACKENDS)}")
    if not _backend_importable(name):
        package = "faster-coco-eval" if name == "faster_coco_eval" else "pycocotools"
        raise ConfigError(
            f"test.eval_backend={name!r} but {package} does not import here; install it "
            f"(pip install {package}) or set test.eval_backend=auto"
        )
    return name


def _coco_classes(backend: str) -> tuple[type, type]:
    """(COCO, COCOeval) classes of a backend."""
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def _silent_print(*args: Any, **kwargs: Any) -> None:
    """faster-coco-eval's print_function: its progress lines are noise in detkit's logs."""


def _make_coco(backend: str, dataset: dict) -> Any:
    """A backend COCO object indexing `dataset` (not copied), without its console prints."""
    coco_cls, _ = _coco_classes(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = coco_cls()
        if backend == "faster_coco_eval":
            coco.print_function = _silent_print
        coco.dataset = dataset
        coco.createIndex()
    return coco


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Everything one evaluation computed.

    metrics:   {"AP", ..., "AR100": 0..100 or NaN, "per_class": {name: 0..100 or NaN}}
    stats:     (12,) COCOeval.stats as COCOeval returns them: 0..1, -1 where undefined
    precision: (T, R, K, A, M) COCOeval.eval["precision"], -1 where undefined
    backend:   the backend that computed it
    """

    metrics: dict
    stats: np.ndarray
    precision: np.ndarray
    backend: str


class COCOEvaluator:
    """COCO box AP of predictions against one ground-truth json, loaded once and reused.

    ann_file: a COCO instances json. backend: "auto" | "pycocotools" | "faster_coco_eval".
    """

    def __init__(self, ann_file: str | Path, backend: str = "auto"):
        self.ann_file = str(ann_file)
        self.backend = resolve_backend(backend)
        self._gt_dataset = load_ground_truth(self.ann_file)
        self._coco_gt = _make_coco(self.backend, self._gt_dataset)
        self.image_ids: list[int] = sorted(img["id"] for img in self._gt_dataset["images"])
        self.category_ids: list[int] = sorted(cat["id"] for cat in self._gt_dataset["categories"])
        self.category_names: dict[int, str] = _unique_names(self._gt_dataset["categories"])

    def evaluate(self, predictions: Sequence[dict]) -> dict:
        """Metrics dict (see module docstring) of COCO results `predictions`."""
        return self.run(predictions).metrics

    def run(self, predictions: Sequence[dict], source: str = "predictions") -> EvalResult:
        """Evaluate and return the metrics together with COCOeval's raw stats and precision."""
        start = time.perf_counter()
        checked = check_predictions(predictions, self.image_ids, self.category_ids, source)
        if not checked:
            logger.warning("%s: no predictions; every AP and AR is 0 where %s has ground truth", source, self.ann_file)
        dt_dataset = {
            "images": self._gt_dataset["images"],
            "categories": self._gt_dataset["categories"],
            "annotations": checked,
        }
        coco_dt = _make_coco(self.backend, dt_dataset)
        _, cocoeval_cls = _coco_classes(self.backend)
        with contextlib.redirect_stdout(io.StringIO()):
            if self.backend == "faster_coco_eval":
                coco_eval = cocoeval_cls(self._coco_gt, coco_dt, iouType="bbox", print_function=_silent_print)
            else:
                coco_eval = cocoeval_cls(self._coco_gt, coco_dt, iouType="bbox")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        stats = np.asarray(coco_eval.stats[: len(STAT_NAMES)], dtype=np.float64)
        precision = np.asarray(coco_eval.eval["precision"], dtype=np.float64)
        metrics: dict[str, Any] = {name: _percent(stats[i]) for i, name in enumerate(METRIC_KEYS)}
        metrics["per_class"] = self._per_class_ap(precision, list(coco_eval.params.catIds))
        logger.info(
            "Evaluated %d predictions on %d images with %s in %.2f s: AP %.3f, AP50 %.3f",
            len(checked),
            len(self.image_ids),
            self.backend,
            time.perf_counter() - start,
            metrics["AP"],
            metrics["AP50"],
        )
        return EvalResult(metrics=metrics, stats=stats, precision=precision, backend=self.backend)

    def _per_class_ap(self, precision: np.ndarray, category_ids: list[int]) -> dict[str, float]:
        """AP per category as Detectron2 computes it: mean of the valid (> -1) precisions over
        IoU thresholds and recall thresholds, area "all", 100 detections.

        precision: (T, R, K, A, M); category_ids: the K ids in precision's order.
        """
        per_class = {}
        for k, category_id in enumerate(category_ids):
            values = precision[:, :, k, 0, -1]  # (T, R)
            values = values[values > -1]
            per_class[self.category_names[category_id]] = float(values.mean() * 100) if values.size else math.nan
        return per_class


def _percent(stat: float) -> float:
    return float(stat * 100) if stat > -1 else math.nan


EVAL_METRICS = ("coco", "voc07", "voc12")


def build_evaluator(
    ground_truth: str | Path | dict, metric: str = "coco", backend: str = "auto", source: str | None = None
) -> Any:
    """The evaluator of `test.metric`: COCOEvaluator ("coco") or VOCEvaluator ("voc07", "voc12").

    Both have .run(predictions, source) -> a result with .metrics, .evaluate(predictions) -> metrics,
    .image_ids and .category_ids. ground_truth: a COCO json file (a COCO-format dict for VOC metrics
    too). backend: COCO's (pycocotools / faster_coco_eval); VOC metrics have their own code.
    """
    if metric == "coco":
        if isinstance(ground_truth, dict):
            raise ConfigError("test.metric=coco evaluates a COCO json file; write the dataset with detkit-convert-data")
        return COCOEvaluator(ground_truth, backend=backend)
    if metric in EVAL_METRICS:
        from detkit.engine.voc_evaluator import VOCEvaluator

        return VOCEvaluator(ground_truth, metric=metric, source=source)
    raise ConfigError(f"test.metric={metric!r} is not a metric; use {', '.join(EVAL_METRICS)}")


def evaluate_files(
    gt_file: str | Path, predictions_file: str | Path, backend: str = "auto", metric: str = "coco"
) -> dict:
    """Metrics of a COCO results file against a COCO instances file (tools/eval.py file mode)."""
    predictions = load_predictions(predictions_file)
    return build_evaluator(gt_file, metric, backend).run(predictions, source=str(predictions_file)).metrics


# --------------------------------------------------------------------------------------------
# Writing and printing
# --------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dump_metrics(metrics: dict, path: str | Path) -> None:
    """Write metrics as strict JSON: NaN (undefined) becomes null."""
    Path(path).write_text(json.dumps(_json_safe(metrics), indent=2, allow_nan=False) + "\n")


def dump_predictions(predictions: Sequence[dict], path: str | Path) -> None:
    """Write COCO results as a JSON list (one entry per line, so big files stay greppable)."""
    with open(path, "w") as f:
        f.write("[\n")
        for i, pred in enumerate(predictions):
            f.write(json.dumps(pred) + (",\n" if i + 1 < len(predictions) else "\n"))
        f.write("]\n")


def format_metrics(metrics: dict, columns: int = 3) -> str:
    """Markdown tables of the summary numbers and of the per-class AP (`columns` name/AP pairs a row).

    A VOC metrics dict (no "APs"; see detkit.engine.voc_evaluator) gets the VOC tables.
    """
    if "APs" not in metrics and "AP50" in metrics:
        from detkit.engine.voc_evaluator import format_voc_metrics

        return format_voc_metrics(metrics, columns)
    ap_keys, ar_keys = METRIC_KEYS[:6], METRIC_KEYS[6:]
    parts = [
        "Box AP (COCO, IoU .50:.95 unless named):",
        _markdown_table(ap_keys, [[_cell(metrics[k]) for k in ap_keys]]),
        _markdown_table(ar_keys, [[_cell(metrics[k]) for k in ar_keys]]),
    ]
    parts += _per_class_table(metrics.get("per_class", {}), columns, "Per-class AP:", "AP")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Inference over a test loader (eval model mode and the trainer's periodic evaluation)
# --------------------------------------------------------------------------------------------


def detections_to_coco(detections: dict, image_id: int, category_ids: Sequence[int]) -> list[dict]:
    """One image's model output -> COCO result dicts.

    detections: {"boxes": (D, 4) xyxy original pixels, "scores": (D,), "labels": (D,) in [0, K)},
    on the CPU. category_ids: (K,) the dataset's original id of each contiguous label.
    """
    boxes = detections["boxes"].float()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # (D, 4) xyxy -> xywh
    labels = detections["labels"].tolist()
    return [
        {"image_id": int(image_id), "category_id": int(category_ids[label]), "bbox": box, "score": score}
        for box, score, label in zip(xywh.tolist(), detections["scores"].float().tolist(), labels)
    ]


@torch.no_grad()
def inference_on_dataset(
    model: torch.nn.Module,
    loader: Iterable,
    category_ids: Sequence[int],
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
) -> list[dict]:
    """Run the model over a test loader and return COCO results.

    loader yields (images: ImageBatch, targets, metas) with meta["image_id"] per image (the
    targets are not used). category_ids: (K,) original COCO id of each contiguous label.
    amp_dtype: torch.bfloat16 / torch.float16 to run under autocast, None for full precision.

    Under torch.distributed each rank runs its own shard of the loader; the results are gathered
    to rank 0, which returns all of them sorted by image id (an image seen by two ranks counts
    once), while the other ranks return []. Logs images/s. The model's train/eval mode is restored.
    """
    device = torch.device(device)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    per_image: dict[int, list[dict]] = {}
    num_images = 0
    model_seconds = 0.0
    start = time.perf_counter()
    try:
        for batch in loader:
            images, metas = batch[0], batch[-1]
            images = images.to(device, non_blocking=True)
            model_start = time.perf_counter()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = net(images)
            # One device->host copy per batch; it also waits for the GPU, so the timing is honest.
            outputs = [{k: v.detach().to("cpu") for k, v in out.items()} for out in outputs]
            model_seconds += time.perf_counter() - model_start
            for out, meta in zip(outputs, metas):
                image_id = int(meta["image_id"])
                per_image[image_id] = detections_to_coco(out, image_id, category_ids)
            num_images += len(metas)
    finally:
        net.train(was_training)
    total_seconds = time.perf_counter() - start
    logger.info(
        "Inference on %d images: %.2f s (%.2f images/s), model alone %.2f s (%.2f images/s)",
        num_images,
        total_seconds,
        num_images / max(total_seconds, 1e-9),
        model_seconds,
        num_images / max(model_seconds, 1e-9),
    )

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size = torch.distributed.get_world_size()
        if world_size > 1:
            gathered: list[dict | None] = [None] * world_size
            torch.distributed.all_gather_object(gathered, per_image)
            if torch.distributed.get_rank() != 0:
                return []
            per_image = {}
            for shard in cast(list[dict], gathered):  # all_gather_object filled every slot
                for image_id, results in shard.items():
                    per_image.setdefault(image_id, results)
            logger.info("Gathered the results of %d images from %d ranks", len(per_image), world_size)
    return [result for image_id in sorted(per_image) for result in per_image[image_id]]
