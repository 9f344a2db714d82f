"""Evaluation speed: COCO box evaluation of a generated COCO-val-like set, pycocotools' COCOeval
used directly vs detkit's COCOEvaluator with each backend.

    result = run_eval_benchmark(num_images=5000, dets_per_image=100)   # {"rows", "max_ap_difference", ...}
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)


# COCO's 80 category ids (1..90 with gaps), so the synthetic set looks like val2017 to the tools.
COCO_CATEGORY_IDS = [
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    27,
    28,
    31,
    32,
    33,
    34,
    35,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    63,
    64,
    65,
    67,
    70,
    72,
    73,
    74,
    75,
    76,
    77,
    78,
    79,
    80,
    81,
    82,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
]


def make_synthetic_coco(num_images: int = 5000, dets_per_image: int = 100, seed: int = 0) -> tuple[dict, list[dict]]:
    """A COCO-val-like ground truth and a detector-like result list, generated.

    Ground truth: `num_images` images of 640 x 480 / 480 x 640 / 640 x 427, 0..20 boxes each
    (mean ~7, COCO val2017 has 7.3), sides log-uniform in 4..~0.9 x the image (small, medium and
    large all occur), 80 categories with COCO's ids, 1% crowd.
    Results: exactly `dets_per_image` per image: up to 3 jittered copies of each GT box with its
    category (scores 0.3..1), the rest random boxes of random categories (scores 0..0.6).
    Returns (gt_dataset_dict, predictions).
    """
    rng = np.random.default_rng(seed)
    sizes = np.array([[480, 640], [640, 480], [427, 640]])
    images: list[dict] = []
    annotations: list[dict] = []
    predictions: list[dict] = []
    categories = [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in COCO_CATEGORY_IDS]
    cat_ids = np.array(COCO_CATEGORY_IDS)
    for image_id in range(1, num_images + 1):
        h, w = (int(v) for v in sizes[rng.integers(len(sizes))])
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id:012d}.jpg"})
        num_gt = int(min(rng.poisson(7.0), 20))
        side_max = np.array([w, h]) * 0.9
        bw = np.exp(rng.uniform(np.log(4), np.log(side_max[0]), num_gt))
        bh = np.clip(bw * np.exp(rng.normal(0, 0.5, num_gt)), 4, side_max[1])
        x = rng.uniform(0, 1, num_gt) * (w - bw)
        y = rng.uniform(0, 1, num_gt) * (h - bh)
        gt_cats = cat_ids[rng.integers(len(cat_ids), size=num_gt)]
        crowd = rng.uniform(size=num_gt) < 0.01
        for i in range(num_gt):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(gt_cats[i]),
                    "bbox": [
                        round(float(x[i]), 2),
                        round(float(y[i]), 2),
                        round(float(bw[i]), 2),
                        round(float(bh[i]), 2),
                    ],
                    "area": float(bw[i] * bh[i]),
                    "iscrowd": int(crowd[i]),
                }
            )
        # Detections: jittered copies of the GT first, then random boxes.
        copies = rng.integers(1, 4, size=num_gt) if num_gt else np.zeros(0, dtype=np.int64)
        src = np.repeat(np.arange(num_gt), copies)[:dets_per_image]
        num_true = len(src)
        jitter = rng.normal(0, 0.08, (num_true, 4))
        det_w = bw[src] * np.exp(jitter[:, 2])
        det_h = bh[src] * np.exp(jitter[:, 3])
        det_x = x[src] + jitter[:, 0] * bw[src]
        det_y = y[src] + jitter[:, 1] * bh[src]
        det_cat = gt_cats[src]
        det_score = rng.uniform(0.3, 1.0, num_true)
        num_rand = dets_per_image - num_true
        rand_w = np.exp(rng.uniform(np.log(4), np.log(side_max[0]), num_rand))
        rand_h = np.clip(rand_w * np.exp(rng.normal(0, 0.5, num_rand)), 4, side_max[1])
        det_x = np.concatenate((det_x, rng.uniform(0, 1, num_rand) * (w - rand_w)))
        det_y = np.concatenate((det_y, rng.uniform(0, 1, num_rand) * (h - rand_h)))
        det_w = np.concatenate((det_w, rand_w))
        det_h = np.concatenate((det_h, rand_h))
        det_cat = np.concatenate((det_cat, cat_ids[rng.integers(len(cat_ids), size=num_rand)]))
        det_score = np.concatenate((det_score, rng.uniform(0.0, 0.6, num_rand)))
        boxes = np.round(np.stack((det_x, det_y, det_w, det_h), axis=1), 2).tolist()
        predictions.extend(
            {"image_id": image_id, "category_id": c, "bbox": b, "score": round(s, 5)}
            for b, c, s in zip(boxes, det_cat.tolist(), det_score.tolist())
        )
    gt = {
        "info": {"description": "detkit synthetic COCO-like set"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    return gt, predictions


def _quiet() -> contextlib.redirect_stdout[io.StringIO]:
    return contextlib.redirect_stdout(io.StringIO())


def time_pycocotools(gt_file: str, predictions: list[dict]) -> dict:
    """COCOeval used directly (the usual script): loadRes + evaluate + accumulate + summarize.
    Returns {"load_gt_s", "eval_s", "AP"}."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    start = time.perf_counter()
    with _quiet():
        coco_gt = COCO(gt_file)
    load_gt = time.perf_counter() - start
    results = [dict(p) for p in predictions]  # loadRes adds keys to the dicts it gets
    start = time.perf_counter()
    with _quiet():
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {"load_gt_s": load_gt, "eval_s": time.perf_counter() - start, "AP": float(coco_eval.stats[0] * 100)}


def time_detkit_evaluator(gt_file: str, predictions: list[dict], backend: str) -> dict:
    """detkit's COCOEvaluator: construction (reads and checks the GT) and `evaluate` (checks the
    predictions, indexes them, runs the backend). Returns {"load_gt_s", "eval_s", "AP"}."""
    from detkit.engine.evaluator import COCOEvaluator

    start = time.perf_counter()
    evaluator = COCOEvaluator(gt_file, backend=backend)
    load_gt = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluator.evaluate(predictions)
    return {"load_gt_s": load_gt, "eval_s": time.perf_counter() - start, "AP": float(metrics["AP"])}


def run_eval_benchmark(
    num_images: int = 5000,
    dets_per_image: int = 100,
    repeats: int = 1,
    backends: Sequence[str] = ("pycocotools", "faster_coco_eval"),
    workdir: str | None = None,
    seed: int = 0,
) -> dict:
    """Time COCO box evaluation of a generated set (see `make_synthetic_coco`): pycocotools'
    COCOeval directly, then detkit's COCOEvaluator with each backend, `repeats` times each,
    interleaved. Returns {"settings", "rows": [{"evaluator", "eval_s_min", "eval_s_median",
    "load_gt_s", "AP"}], "max_ap_difference"}."""
    import json
    import tempfile
    from pathlib import Path

    from detkit.engine.evaluator import available_backends

    start = time.perf_counter()
    gt, predictions = make_synthetic_coco(num_images, dets_per_image, seed)
    generate_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        gt_file = str(Path(tmp) / "synthetic_gt.json")
        Path(gt_file).write_text(json.dumps(gt))
        runs: dict[str, Callable[[], dict]] = {
            "pycocotools COCOeval (direct)": lambda: time_pycocotools(gt_file, predictions)
        }
        usable = available_backends()
        for backend in backends:
            if backend not in usable:
                logger.warning("backend %s does not import here: not timed", backend)
                continue
            runs[f"detkit COCOEvaluator ({backend})"] = functools.partial(
                time_detkit_evaluator, gt_file, predictions, backend
            )
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                results[name].append(run())
                logger.info("%s: %.2f s", name, results[name][-1]["eval_s"])
    rows = []
    for name, rs in results.items():
        times = [r["eval_s"] for r in rs]
        rows.append(
            {
                "evaluator": name,
                "eval_s_min": min(times),
                "eval_s_median": statistics.median(times),
                "load_gt_s": statistics.median(r["load_gt_s"] for r in rs),
                "AP": rs[0]["AP"],
                "repeats": len(rs),
            }
        )
    aps = [r["AP"] for r in rows]
    return {
        "settings": {
            "num_images": num_images,
            "dets_per_image": dets_per_image,
            "num_predictions": len(predictions),
            "num_gt_boxes": len(gt["annotations"]),
            "repeats": repeats,
            "generate_s": generate_s,
            "seed": seed,
        },
        "rows": rows,
        "max_ap_difference": max(aps) - min(aps) if aps else None,
    }
