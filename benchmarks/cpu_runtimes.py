"""The fastest CPU runtime: one detector, every CPU runtime detkit can run it on, in one interleaved run.

The model is the export benchmark's (detkit.export.benchmark.calibrated_model: R101-C4, random
weights calibrated so that the RPN keeps 1000 proposals per image at 480 x 640). It is exported
once to ONNX and its res5 quantized to int8 (detkit.export.quantize, calibrated on --int8-images
images generated like the timed one); then these runtimes run the same timed image:

- pytorch eager (torch.set_num_threads(--threads));
- with --programs pt2 aoti: the torch.export file (torch.export.load, the same kernels as eager)
  and the AOTInductor package compiled on this machine (tens of minutes on 2 cores for R101-C4);
- ONNX Runtime float32 at each --ort-levels graph optimisation level (intra-op threads = --threads,
  inter-op 1, sequential execution);
- ONNX Runtime on the int8 res5 file;
- OpenVINO reading the same float32 ONNX file (float32 arithmetic forced, one stream, --threads
  inference threads; detkit.export.runtime's `openvino` backend) and the int8 res5 file (its QDQ
  nodes run as OpenVINO's int8 kernels).

Each runtime's detections on the timed image (and on --parity-sizes) are compared with eager's:
"same 100" means every eager detection has a twin of the same label at IoU >= 0.99 and the counts
are equal (detkit.structures.compare.diff_detections). Timing: --warmup rounds, then --rounds
rounds of A, B, C, ... interleaved (detkit.benchmark.timing.time_interleaved); min and median per
runtime and the ratio of each round to eager's in the same round.

    python -m benchmarks.cpu_runtimes --depth 101 --image-size 480 640 --threads 2 --rounds 3 \\
        --export-dir r101_runtimes/ --json cpu_runtimes.json

With --export-dir the files are kept there and reused by the next run with the same options
(the calibrated model is rebuilt from the options alone, so the files hold the same weights).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from detkit.cli.common import run_cli

logger = logging.getLogger(__name__)

ORT_LEVELS = ("all", "extended", "basic", "disabled")
PROGRAM_FILES = {"pt2": "model.pt2", "aoti": "model_aoti.pt2"}  # the torch.export formats, by name


def ort_runner(path: Path, threads: int, level: str) -> Callable:
    """An ONNX Runtime CPU session on `path` at graph optimisation `level` (ORT_LEVELS), called as
    (image (3, h, w) uint8, original_size (2,) int64) -> (boxes, scores, labels)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(image: torch.Tensor, original_size: torch.Tensor):
        return session.run(None, {"image": image.numpy(), "original_size": original_size.numpy()})

    return run


def build_files(
    options, folder: Path, int8_images: int, reuse: bool, programs: Sequence[str] = ()
) -> tuple[Path, Path, dict]:
    """model.onnx and model_int8_res5.onnx of the calibrated model in `folder`, and model.pt2 /
    model_aoti.pt2 for "pt2" / "aoti" in `programs` (each kept when `reuse` and present); returns
    the two ONNX paths and the seconds each step took."""
    from detkit.export.benchmark import calibrated_model, write_calibration_images
    from detkit.export.exporter import export_model
    from detkit.export.quantize import quantize_res5

    fp32, int8 = folder / "model.onnx", folder / "model_int8_res5.onnx"
    seconds: dict[str, float] = {}
    if not (reuse and fp32.is_file()):
        start = time.perf_counter()
        export_model(calibrated_model(options), fp32, "onnx")
        seconds["onnx export"] = time.perf_counter() - start
    if not (reuse and int8.is_file()):
        start = time.perf_counter()
        calibration = write_calibration_images(options, folder / "int8_calibration")
        quantize_res5(fp32, int8, calibration, int8_images)
        seconds["int8 res5 quantization"] = time.perf_counter() - start
    for fmt in programs:
        path = folder / PROGRAM_FILES[fmt]
        if not (reuse and path.is_file()):
            start = time.perf_counter()
            export_model(calibrated_model(options), path, fmt)
            seconds[f"{fmt} export"] = time.perf_counter() - start
    return fp32, int8, seconds


def run_cpu_runtimes(
    options,
    folder: Path,
    ort_levels: Sequence[str] = ("all", "basic"),
    openvino: bool = True,
    int8_images: int = 16,
    reuse: bool = False,
    programs: Sequence[str] = (),
) -> dict:
    """Returns {"threads", "files_s", "parity": [...], "rows": [...]} (rows in the order run)."""
    from detkit.benchmark.timing import summarize_times, time_interleaved
    from detkit.export.benchmark import _compare, _eager_detections, benchmark_images, calibrated_model
    from detkit.export.runtime import load_exported

    threads = options.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    fp32, int8, files_s = build_files(options, folder, int8_images, reuse, programs)
    model = calibrated_model(options).model

    runners: dict[str, Callable] = {}
    for fmt in programs:
        runners[{"pt2": "torch.export (pt2)", "aoti": "AOTInductor"}[fmt]] = load_exported(
            folder / PROGRAM_FILES[fmt], fmt, threads
        )
    for level in ort_levels:
        runners[f"onnxruntime fp32 ({level})"] = ort_runner(fp32, threads, level)
    runners["onnxruntime int8 res5"] = ort_runner(int8, threads, "all")
    if openvino:
        runners["openvino fp32"] = load_exported(fp32, "openvino", threads)
        runners["openvino int8 res5"] = load_exported(int8, "openvino", threads)

    def detections(name: str, image: torch.Tensor) -> dict:
        boxes, scores, labels = runners[name](image, torch.tensor(image.shape[1:], dtype=torch.int64))
        return {"boxes": np.asarray(boxes), "scores": np.asarray(scores), "labels": np.asarray(labels).astype(np.int64)}

    images = benchmark_images(options)
    parity = []
    for image in images:
        ref = _eager_detections(model, image)
        for name in runners:
            row = _compare(ref, detections(name, image))
            matched = row["eager"] if row["same_count_and_labels"] else row["matched_iou_0.99"]
            row["same_detections"] = row["eager"] == row["exported"] == matched
            parity.append({"size": list(image.shape[1:]), "backend": name, **row})
            logger.info("parity %s %s: %s", parity[-1]["size"], name, row)

    timed_image = images[0]
    steps: dict[str, Callable[[], object]] = {"pytorch eager": lambda: _eager_detections(model, timed_image)}
    for name in runners:
        steps[name] = functools.partial(detections, name, timed_image)
    logger.info(
        "timing %s: %d warm-up + %d rounds, %d threads", ", ".join(steps), options.warmup, options.repeats, threads
    )
    with torch.no_grad():
        timed = time_interleaved(steps, torch.device("cpu"), options.warmup, options.repeats)
    eager_times = timed["pytorch eager"]["times_s"]
    rows = []
    for name in steps:
        times = timed[name]["times_s"]
        rows.append(
            {
                "backend": name,
                **summarize_times(times, 1),
                "times_s": times,
                "vs_eager_median": statistics.median(times) / statistics.median(eager_times),
                "vs_eager_per_round": [t / e for t, e in zip(times, eager_times)],
            }
        )
    return {"threads": threads, "files_s": files_s, "parity": parity, "rows": rows}


def table(result: dict) -> str:
    """Markdown: the timing table (with each runtime's detections check on the timed image), then
    the parity of every image."""
    timed_size = result["parity"][0]["size"]
    same = {p["backend"]: p for p in result["parity"] if p["size"] == timed_size}
    lines = [
        "| runtime | s min | s median | x eager (median) | x eager per round | detections vs eager (timed image) |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in result["rows"]:
        p = same.get(r["backend"])
        check = "-" if p is None else describe(p)
        per_round = ", ".join(f"{v:.2f}" for v in r["vs_eager_per_round"]) if p is not None else ""
        lines.append(
            f"| {r['backend']} | {r['time_ms_min'] / 1000:.2f} | {r['time_ms_median'] / 1000:.2f} | "
            f"{r['vs_eager_median']:.2f} | {per_round} | {check} |"
        )
    lines += ["", "| image (h x w) | runtime | detections vs eager |", "| --- | --- | --- |"]
    for p in result["parity"]:
        lines.append(f"| {p['size'][0]} x {p['size'][1]} | {p['backend']} | {describe(p)} |")
    return "\n".join(lines)


def describe(p: dict) -> str:
    """One parity row in words: the same detections (count, labels at IoU >= 0.99) or how many match."""
    if p["same_count_and_labels"]:
        return (
            f"same {p['eager']} in the same order; max box diff {p['max_box_diff_px']:.1e} px, "
            f"score {p['max_score_diff']:.1e}"
        )
    head = (
        f"same {p['eager']}"
        if p["same_detections"]
        else f"{p['matched_iou_0.99']} of {p['eager']} (vs {p['exported']})"
    )
    return (
        f"{head} at IoU >= 0.99 + same label, {p['matched_iou_0.5']} at IoU >= 0.5; matched max box diff "
        f"{p['matched_max_box_diff_px']:.1e} px, score {p['matched_max_score_diff']:.1e}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    from detkit.export.benchmark import ExportBenchOptions

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cpu_runtimes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--depth", type=int, default=101)
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=(480, 640))
    parser.add_argument(
        "--parity-sizes", type=int, nargs="*", default=[], metavar="H W", help="more images to check (pairs H W)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--ort-levels", nargs="+", choices=ORT_LEVELS, default=["all", "basic"], help="ONNX Runtime levels to time"
    )
    parser.add_argument("--no-openvino", action="store_true", help="leave OpenVINO out (when it is not installed)")
    parser.add_argument(
        "--programs",
        nargs="*",
        choices=sorted(PROGRAM_FILES),
        default=[],
        help="also time the torch.export file (pt2) and the AOTInductor package (aoti: a long compile)",
    )
    parser.add_argument("--int8-images", type=int, default=16, help="int8 res5 calibration images (generated)")
    parser.add_argument("--export-dir", type=Path, required=True, help="folder for the ONNX files")
    parser.add_argument("--reuse", action="store_true", help="reuse the files already in --export-dir")
    parser.add_argument("--overrides", nargs="*", default=[], help="config overrides of the model (key=value)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    if len(args.parity_sizes) % 2:
        parser.error("--parity-sizes takes pairs H W")
    options = ExportBenchOptions(
        depth=args.depth,
        image_size=tuple(args.image_size),
        parity_sizes=tuple(zip(args.parity_sizes[::2], args.parity_sizes[1::2])),
        warmup=args.warmup,
        repeats=args.rounds,
        threads=args.threads,
        overrides=tuple(args.overrides),
        int8_images=args.int8_images,
    )
    start = time.perf_counter()
    result = run_cpu_runtimes(
        options, args.export_dir, args.ort_levels, not args.no_openvino, args.int8_images, args.reuse, args.programs
    )
    result["settings"] = vars(args) | {"export_dir": str(args.export_dir), "json": str(args.json)}
    result["total_s"] = time.perf_counter() - start
    print(table(result))
    print(f"\nthreads {result['threads']}; files (s): {result['files_s']}; total {result['total_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
