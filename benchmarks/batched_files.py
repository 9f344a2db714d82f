"""A batched exported file against the one-image file: same detections, and what one call per batch saves.

For a detkit checkpoint, writes the one-image and the batched (`detkit export --batched`) ONNX
files (and, with --pt2, both pt2 files) into --export-dir, then runs --batch-size images of mixed
sizes (smooth random images at the original sizes of --sizes, resized by the model's own rule)
through each runtime two ways, interleaved A, B, A, B, ...: the one-image file called image by image
(what `detkit infer --batch-size N` does with it) and the batched file called once. Checks that
every image's boxes, scores and labels are equal bit for bit; reports min and median seconds per
batch and the ratio batched / one-image per round.

    python -m benchmarks.batched_files output/demo/model_final.pth --export-dir batched_files/ \\
        --batch-size 8 --threads 2 --rounds 7 --json batched_files.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from detkit.cli.common import run_cli

logger = logging.getLogger(__name__)

# Original (h, w) of the timed images, cycled: COCO-like shapes, landscape and portrait.
DEFAULT_SIZES = ((480, 640), (640, 480), (427, 640), (500, 375), (375, 500), (640, 640), (333, 500), (480, 360))


def build_files(weights: Path, folder: Path, formats: Sequence[str]) -> dict[str, tuple[Path, Path]]:
    """{format: (one-image file, batched file)} in `folder`, each exported unless it is there already."""
    from detkit.engine.predictor import Predictor
    from detkit.export.exporter import export_model

    folder.mkdir(parents=True, exist_ok=True)
    predictor = None
    files = {}
    for fmt in formats:
        suffix = ".onnx" if fmt == "onnx" else ".pt2"
        pair = (folder / f"model{suffix}", folder / f"model_batched{suffix}")
        for path, batched in zip(pair, (False, True)):
            if not path.is_file():
                predictor = predictor or Predictor(weights, device="cpu")
                export_model(predictor, path, fmt, batched=batched)
        files[fmt] = pair
    return files


def run(args: argparse.Namespace) -> dict:
    from detkit.benchmark.timing import summarize_times, time_interleaved
    from detkit.export.exporter import smooth_random_image
    from detkit.export.runtime import ExportedPredictor

    torch.set_num_threads(args.threads)
    formats = ["onnx", "pt2"] if args.pt2 else ["onnx"]
    files = build_files(args.weights, args.export_dir, formats)
    runtimes = [("onnxruntime", "onnx"), ("openvino", "onnx")] + ([("pt2", "pt2")] if args.pt2 else [])
    sizes = [DEFAULT_SIZES[i % len(DEFAULT_SIZES)] for i in range(args.batch_size)]
    steps, checks = {}, {}
    for backend, fmt in runtimes:
        one = ExportedPredictor(files[fmt][0], backend=backend, batch_size=1, num_threads=args.threads)
        many = ExportedPredictor(files[fmt][1], backend=backend, batch_size=args.batch_size, num_threads=args.threads)
        images = [one.preprocess(smooth_random_image(h, w, seed=i)) for i, (h, w) in enumerate(sizes)]
        ref = one.predict_preprocessed(images, sizes)
        got = many.predict_preprocessed(images, sizes)
        checks[backend] = {
            "detections": [len(d) for d in ref],
            "bit_identical": all(
                np.array_equal(a.boxes, b.boxes)
                and np.array_equal(a.scores, b.scores)
                and np.array_equal(a.labels, b.labels)
                for a, b in zip(ref, got)
            ),
            "resized_sizes": [list(t.shape[1:]) for t in images],
        }
        logger.info("%s: %s", backend, checks[backend])
        steps[f"{backend} one-image file"] = lambda p=one, x=images: p.predict_preprocessed(x, sizes)
        steps[f"{backend} batched file"] = lambda p=many, x=images: p.predict_preprocessed(x, sizes)
    with torch.no_grad():
        timed = time_interleaved(steps, torch.device("cpu"), args.warmup, args.rounds)
    rows = []
    for backend, _ in runtimes:
        one_t = timed[f"{backend} one-image file"]["times_s"]
        many_t = timed[f"{backend} batched file"]["times_s"]
        for name, times in ((f"{backend} one-image file", one_t), (f"{backend} batched file", many_t)):
            rows.append({"runtime": name, **summarize_times(times, args.batch_size), "times_s": times})
        rows[-1]["batched_vs_one_per_round"] = [b / a for a, b in zip(one_t, many_t)]
        rows[-1]["batched_vs_one_median"] = statistics.median(many_t) / statistics.median(one_t)
    return {"checks": checks, "rows": rows}


def table(result: dict) -> str:
    lines = [
        "| runtime, file | s / batch min | s / batch median | batched / one-image (median) | per round |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        ratio = f"{r['batched_vs_one_median']:.2f}" if "batched_vs_one_median" in r else ""
        per_round = ", ".join(f"{v:.2f}" for v in r.get("batched_vs_one_per_round", []))
        lines.append(
            f"| {r['runtime']} | {r['time_ms_min'] / 1000:.3f} | {r['time_ms_median'] / 1000:.3f} | {ratio} | {per_round} |"
        )
    lines.append("")
    for backend, check in result["checks"].items():
        same = "bit-identical" if check["bit_identical"] else "DIFFERENT"
        lines.append(f"- {backend}: detections per image {check['detections']}, batched vs one-image file: {same}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batched_files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("weights", type=Path, help="detkit checkpoint")
    parser.add_argument("--export-dir", type=Path, required=True, help="folder for the four files (reused)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pt2", action="store_true", help="also the pt2 files (torch.export)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    result = run(args)
    result["settings"] = {k: str(v) for k, v in vars(args).items()}
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all(c["bit_identical"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
