"""int8 res5 against float32: ONNX Runtime time per image of two detkit ONNX files, interleaved.

The int8 file is `--int8 FILE` (from detkit export --int8-res5), or written here next to the
float32 file with detkit.export.quantize (`--calibration DIR`, the first --num-calibration images),
which also quantizes the export benchmark's calibrated model that has no checkpoint. Then both files
run the first --num-timing images of --timing, fp32 and int8 alternating per round (one warm-up
round first; detkit.benchmark.timing.time_interleaved), with --threads intra-op threads; prints min / median ms per image and the per-round ratio.
Evaluate accuracy with detkit eval --model FILE.

Shapes R18, configs/shapes_r18.yaml trained 800 iterations into output/shapes_amp (AP from detkit eval):

    detkit export --weights output/shapes_amp/model_final.pth --format onnx --output output/int8/model.onnx
    detkit export --weights output/shapes_amp/model_final.pth --format onnx --output output/int8/model_int8.onnx \\
        --int8-res5 --calibration datasets/shapes/train_a88f2c9112a6/images
    python -m benchmarks.int8 output/int8/model.onnx --int8 output/int8/model_int8.onnx --timing datasets/shapes/val_59772c7e3d27/images

The export benchmark's R101-C4 (random calibrated weights, so speed only), timed on images
stretched to the benchmark's 480 x 640 network input:

    detkit benchmark --mode export --depth 101 --image-size 480 640 --threads 2 --export-dir r101/
    python -m benchmarks.int8 r101/model.onnx --calibration datasets/shapes/train_a88f2c9112a6/images --num-calibration 16 \\
        --timing datasets/shapes/val_59772c7e3d27/images --num-timing 3 --input-size 480 640 --threads 2
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from detkit.benchmark.timing import time_interleaved
from detkit.cli.common import run_cli
from detkit.data import read_image
from detkit.export.quantize import calibration_images, quantize_res5
from detkit.export.runtime import ExportedPredictor


def timing_inputs(predictor: ExportedPredictor, folder: Path, count: int, input_size) -> list[tuple]:
    """(image (3, h, w) uint8 tensor, original size) pairs: resized by the file's own rule, or
    (input_size given) stretched to exactly (h, w) and fed as a resized image of that size."""
    out = []
    for path in calibration_images(folder, count, "--timing", "--num-timing"):
        image = read_image(path)
        if input_size:
            resized = cv2.resize(image, tuple(input_size[::-1]), interpolation=cv2.INTER_LINEAR)
            out.append((torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))), tuple(input_size)))
        else:
            out.append((predictor.preprocess(image), image.shape[:2]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.int8", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a float32 detkit ONNX file (detkit export --format onnx)")
    parser.add_argument("--int8", type=Path, default=None, help="its int8 res5 file (default: quantize it here)")
    parser.add_argument("--calibration", type=Path, default=None, help="folder of calibration images (without --int8)")
    parser.add_argument("--num-calibration", type=int, default=300)
    parser.add_argument("--timing", type=Path, required=True, help="folder of images to time on")
    parser.add_argument("--num-timing", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="feed every image stretched to H x W as the network input (default: the file's resize)",
    )
    args = parser.parse_args(argv)

    int8_path = args.int8
    if int8_path is None:
        if args.calibration is None:
            parser.error("give --int8 FILE or --calibration DIR")
        int8_path = Path(args.model).with_name(Path(args.model).stem + "_int8_res5.onnx")
        start = time.perf_counter()
        quantize_res5(args.model, int8_path, args.calibration, args.num_calibration)
        print(f"quantized res5 on {args.num_calibration} images in {time.perf_counter() - start:.1f} s -> {int8_path}")
    predictors = {
        name: ExportedPredictor(path, num_threads=args.threads)
        for name, path in (("fp32", args.model), ("int8", int8_path))
    }
    print("int8 file:", json.loads(predictors["int8"].metadata.get("quantization", "null")))
    inputs = timing_inputs(predictors["fp32"], args.timing, args.num_timing, args.input_size)

    def run_all(predictor: ExportedPredictor) -> None:
        for image, size in inputs:
            predictor.run(image, size)

    timed = time_interleaved(
        {name: (lambda p=p: run_all(p)) for name, p in predictors.items()},
        torch.device("cpu"),
        warmup=1,
        repeats=args.rounds,
    )
    times = {name: [t / len(inputs) * 1000 for t in timed[name]["times_s"]] for name in predictors}  # ms per image
    for name, values in times.items():
        print(
            f"{name}: {min(values):.2f} / {statistics.median(values):.2f} ms per image (min / median); "
            f"rounds {[round(v, 2) for v in values]}"
        )
    print("int8 / fp32 per round:", [round(b / a, 3) for a, b in zip(times["fp32"], times["int8"])])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
