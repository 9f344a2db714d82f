"""CPU inference of one model several ways: PyTorch eager, the torch.export (pt2) file, ONNX
Runtime, optionally the AOTInductor package and int8 res5 (`tools/benchmark.py --mode export`).

The model is the speed benchmark's (detkit.benchmark): random weights calibrated so that the
RPN keeps the full post-NMS top-k (1000 proposals per image for the R101-C4 defaults) and the box
head passes a realistic number of candidates to NMS. It is exported to each format in a temporary
folder, then
- parity: each backend runs images of `parity_sizes` (and the timing image); detections are
  compared with eager's (count, labels, max box and score differences);
- speed: the backends (optionally also the AOTInductor package, the int8 res5 file of
  detkit.export.quantize and torchvision's reference model) run the timing image interleaved A, B, C, A, B, C, ... with the
  same number of threads, min and median over repeats.

Shapes: (h, w) image sizes; D detections.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class ExportBenchOptions:
    depth: int = 101
    num_classes: int = 80
    image_size: tuple[int, int] = (480, 640)  # (h, w) of the timed image
    parity_sizes: tuple[tuple[int, int], ...] = ((384, 512), (600, 450), (320, 704))
    warmup: int = 1
    repeats: int = 3
    threads: int | None = None  # None: torch's current setting, used for ONNX Runtime too
    overrides: tuple[str, ...] = ()
    torchvision: bool = False  # also time the torchvision reference model (detkit.benchmark.tv_reference)
    seed: int = 0
    keep_dir: str | None = None  # write the exported files here instead of a temporary folder
    int8: bool = False  # also quantize res5 to int8 (detkit.export.quantize) and time that file
    int8_images: int = 16  # calibration images for int8 (each runs the whole model once)
    int8_calibration: str | None = None  # a folder of calibration images; None: generated like the timed image
    aoti: bool = False  # also compile the AOTInductor package (minutes on 2 cores) and time it


def _eager_detections(model, image: torch.Tensor) -> dict:
    with torch.no_grad():
        out = model([image])[0]
    return {k: v.numpy() for k, v in out.items()}


def _compare(ref: dict, got: dict) -> dict:
    """Detections of one image (detkit.structures.compare.diff_detections): exact comparison in
    order, and (when that fails) IoU >= 0.99 and IoU >= 0.5 same-label matchings that tolerate
    reordering."""
    from detkit.structures.compare import diff_detections

    diff = diff_detections(ref, got)
    row = {"eager": diff["reference"], "exported": diff["candidate"], "same_count_and_labels": diff["same"]}
    if diff["same"]:
        row["max_box_diff_px"] = diff["max_box_diff_px"]
        row["max_score_diff"] = diff["max_score_diff"]
    else:
        row.update(
            {
                "matched_iou_0.99": diff["matched"],
                "matched_max_box_diff_px": diff["matched_max_box_diff_px"],
                "matched_max_score_diff": diff["matched_max_score_diff"],
                "matched_iou_0.5": diff_detections(ref, got, iou_thresh=0.5)["matched"],
            }
        )
    return row


def calibrated_model(options: ExportBenchOptions) -> SimpleNamespace:
    """The benchmark's model: detkit R101-C4 (options.depth) with random weights calibrated on two
    generated images (detkit.benchmark.calibration), eval mode, on the CPU. Returns what
    export_model takes: model, cfg, iteration, class_names, category_ids. Same options, same weights."""
    from detkit.benchmark.calibration import calibrate_, make_inputs
    from detkit.config import load_config
    from detkit.modeling import build_model
    from detkit.utils.env import seed_all

    height, width = options.image_size
    cfg = load_config(
        None,
        [
            f"model.depth={options.depth}",
            f"model.num_classes={options.num_classes}",
            "model.roi_heads.aligned=false",
            *options.overrides,
            "model.channels_last=false",
            "model.compile=false",
            "device=cpu",
        ],
    )
    seed_all(options.seed)
    model = build_model(cfg, device="cpu").eval()
    calibrate_(model, make_inputs(2, height, width, options.num_classes, seed=options.seed + 1).images)
    model.eval()
    return SimpleNamespace(
        model=model,
        cfg=cfg,
        iteration=0,
        class_names=[f"class{k}" for k in range(options.num_classes)],
        category_ids=list(range(1, options.num_classes + 1)),
    )


def benchmark_images(options: ExportBenchOptions) -> list[torch.Tensor]:
    """The timed image (options.image_size) first, then one image per parity size: (3, h, w) uint8."""
    from detkit.benchmark.calibration import make_inputs

    height, width = options.image_size
    images = [make_inputs(1, height, width, options.num_classes, seed=options.seed).images[0]]
    for index, (h, w) in enumerate(options.parity_sizes, start=1):
        images.append(make_inputs(1, h, w, options.num_classes, seed=options.seed + 10 + index).images[0])
    return images


def write_calibration_images(options: ExportBenchOptions, folder: Path) -> Path:
    """options.int8_images PNGs generated like the timed image (make_inputs, other seeds) in
    `folder`: int8 ranges calibrated on the kind of image the benchmark runs."""
    import cv2

    from detkit.benchmark.calibration import make_inputs

    folder.mkdir(parents=True, exist_ok=True)
    height, width = options.image_size
    for index in range(options.int8_images):
        image = make_inputs(1, height, width, options.num_classes, seed=options.seed + 1000 + index).images[0]
        cv2.imwrite(str(folder / f"{index:04d}.png"), image.permute(1, 2, 0).numpy()[:, :, ::-1])  # RGB -> BGR
    return folder


def run_export_benchmark(options: ExportBenchOptions) -> dict:
    """Returns {"settings", "export_s", "proposals_per_image", "parity": [...], "rows": [...]}."""
    from detkit.benchmark.timing import summarize_times, time_interleaved
    from detkit.export.exporter import export_model
    from detkit.export.runtime import load_exported

    threads = options.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    height, width = options.image_size
    source = calibrated_model(options)
    model = source.model

    result: dict = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.__dict__.items()},
        "threads": threads,
        "export_s": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(options.keep_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        runners = {}
        formats = [("pt2", "pt2", "model.pt2"), ("onnx", "onnxruntime", "model.onnx")]
        if options.aoti:
            formats.append(("aoti", "aoti", "model_aoti.pt2"))
        for fmt, name, file_name in formats:
            start = time.perf_counter()
            path = export_model(source, folder / file_name, fmt)
            result["export_s"][fmt] = time.perf_counter() - start
            runners[name] = load_exported(path, num_threads=threads)
        if options.int8:
            from detkit.export.quantize import quantize_res5

            start = time.perf_counter()
            calibration = options.int8_calibration or write_calibration_images(options, folder / "int8_calibration")
            path = quantize_res5(
                folder / "model.onnx", folder / "model_int8_res5.onnx", calibration, options.int8_images
            )
            result["export_s"]["int8 res5"] = time.perf_counter() - start
            runners["onnxruntime int8 res5"] = load_exported(path, num_threads=threads)

        def exported_detections(name: str, image: torch.Tensor) -> dict:
            boxes, scores, labels = runners[name](image, torch.tensor(image.shape[1:], dtype=torch.int64))
            return {
                "boxes": np.asarray(boxes),
                "scores": np.asarray(scores),
                "labels": np.asarray(labels).astype(np.int64),
            }

        images = benchmark_images(options)
        timed_image = images[0]
        proposals = []
        hook = model.rpn.register_forward_hook(lambda m, a, out: proposals.append(int(out[1].sum())))
        parity = []
        for image in images:
            h, w = image.shape[1:]
            ref = _eager_detections(model, image)
            for name in runners:
                parity.append({"size": [h, w], "backend": name, **_compare(ref, exported_detections(name, image))})
                logger.info("parity %dx%d %s: %s", h, w, name, parity[-1])
        hook.remove()
        result["proposals_per_image"] = proposals
        result["parity"] = parity

        steps: dict[str, Callable[[], object]] = {"pytorch eager": lambda: _eager_detections(model, timed_image)}
        for name in runners:
            steps[name] = functools.partial(exported_detections, name, timed_image)
        if options.torchvision:
            from detkit.benchmark.tv_reference import build_torchvision_reference, to_torchvision_images

            reference = build_torchvision_reference(model, (height, width)).eval()
            tv_images = to_torchvision_images(timed_image[None])
            steps["torchvision reference"] = lambda: reference(tv_images)
        logger.info(
            "timing %s: %d warm-up + %d timed rounds, %d threads",
            ", ".join(steps),
            options.warmup,
            options.repeats,
            threads,
        )
        with torch.no_grad():
            timed = time_interleaved(steps, torch.device("cpu"), options.warmup, options.repeats)
    rows = [
        {"backend": name, **summarize_times(timed[name]["times_s"], 1), "times_s": timed[name]["times_s"]}
        for name in steps
    ]
    eager_median = rows[0]["time_ms_median"]
    for row in rows:
        row["vs_eager_median"] = row["time_ms_median"] / eager_median
    result["rows"] = rows
    return result


def export_table(result: dict) -> str:
    lines = ["| backend | ms min | ms median | x eager (median) |", "| --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(
            f"| {r['backend']} | {r['time_ms_min']:.0f} | {r['time_ms_median']:.0f} | {r['vs_eager_median']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"proposals per image (eager RPN): {result['proposals_per_image']}; threads {result['threads']}; "
        f"export s: " + ", ".join(f"{k} {v:.0f}" for k, v in result["export_s"].items())
    )
    lines.append("")
    lines.append(
        "| image (h x w) | backend | eager dets | exported dets | same count + labels (in order) | "
        "max box diff px | max score diff |"
    )
    lines.append("| --- | --- | ---: | ---: | --- | ---: | ---: |")
    for p in result["parity"]:
        if p["same_count_and_labels"]:
            same, box, score = "yes", p["max_box_diff_px"], p["max_score_diff"]
        else:
            same = (
                f"no: {p['matched_iou_0.99']} matched (IoU >= 0.99, same label), {p['matched_iou_0.5']} at IoU >= 0.5"
            )
            box, score = p["matched_max_box_diff_px"], p["matched_max_score_diff"]
        lines.append(
            f"| {p['size'][0]} x {p['size'][1]} | {p['backend']} | {p['eager']} | {p['exported']} | {same} | "
            f"{box:.2e} | {score:.2e} |"
        )
    return "\n".join(lines)
