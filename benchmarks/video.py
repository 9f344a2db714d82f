"""Video inference speed: frames/s of `detkit infer` on a generated 640x480 clip, per torch thread count.

    python -m benchmarks.video --weights output/model_final.pth [--threads 1 2] [--runs 3] [--frames 300]

Generates (once) datasets/shapes/bench_video/shapes_640x480_<frames>.mp4: moving circles, squares, triangles
and stars (24..80 px, the shapes dataset's sizes) on a textured background, mp4v at 30 fps. Then, for
each thread count (torch.set_num_threads; OpenCV keeps its default), it runs

  decoder only   FrameReader: decode + BGR->RGB + the test-time resize, what the reader thread does
  model only     predict_preprocessed on batches of the clip's first frames, nothing else running
  full           detkit infer --input <clip> (decoder thread, model, drawing, writing the mp4v video)

`--runs` times each and prints min / median frames/s and, from the runs' summary.json, where the time
went: the model (predict_preprocessed), drawing + encoding, and how long the model side waited for the
decoder (near 0 s: the model side is the bottleneck, not the decoder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from detkit.cli.common import run_cli
from detkit.utils.files import atomic_output

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the clip goes to its datasets/shapes/


def make_clip(path: Path, num_frames: int, width: int = 640, height: int = 480, fps: float = 30.0) -> Path:
    """Moving shapes on a fixed textured background, written with cv2.VideoWriter (mp4v)."""
    if path.is_file():
        return path
    rng = np.random.default_rng(0)
    small = rng.integers(40, 200, size=(height // 16, width // 16, 3), dtype=np.uint8)
    background = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    shapes = [
        (
            kind,
            rng.uniform(24, 80),
            rng.uniform(0, width),
            rng.uniform(0, height),
            rng.uniform(-4, 4),
            rng.uniform(-3, 3),
            tuple(int(c) for c in rng.integers(0, 256, 3)),
        )
        for kind in range(4)
        for _ in range(2)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temp:  # a half-written clip never takes the final name
        writer = cv2.VideoWriter(str(temp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        for k in range(num_frames):
            frame = background.copy()
            for kind, size, x0, y0, vx, vy, color in shapes:
                x, y = (x0 + vx * k) % width, (y0 + vy * k) % height
                r = size / 2
                if kind == 0:
                    cv2.circle(frame, (int(x), int(y)), int(r), color, -1)
                else:
                    n = {1: 4, 2: 3, 3: 10}[kind]
                    angles = np.arange(n) * 2 * np.pi / n + (np.pi / 4 if kind == 1 else -np.pi / 2)
                    radii = np.where(np.arange(n) % 2 == 1, 0.45 * r, r) if kind == 3 else np.full(n, r)
                    points = np.stack([x + radii * np.cos(angles), y + radii * np.sin(angles)], 1).astype(np.int32)
                    cv2.fillPoly(frame, [points], color)
            writer.write(frame)
        writer.release()
    return path


def decoder_only(clip: Path, weights: str) -> float:
    """Frames/s of the reader thread's work alone (decode, RGB, test-time resize), no model."""
    from detkit.data.video import FrameReader, open_video, parse_source
    from detkit.engine.checkpoint import load_checkpoint
    from detkit.engine.predictor import Preprocessor, config_with_overrides

    preprocessor = Preprocessor(config_with_overrides(load_checkpoint(weights)["config"], []))
    source = parse_source(str(clip))
    capture, info = open_video(source)
    reader = FrameReader(capture, info, source, preprocess=preprocessor)
    tic = time.perf_counter()
    with reader:
        count = sum(1 for _ in reader)
    return count / (time.perf_counter() - tic)


def model_only(clip: Path, weights: str, batch_size: int, batches: int = 4) -> list[float]:
    """Frames/s of predict_preprocessed alone on the clip's first frames (no decoder thread running)."""
    from detkit.engine.predictor import Predictor

    predictor = Predictor(weights, device="cpu", batch_size=batch_size)
    capture = cv2.VideoCapture(str(clip))
    frames = [cv2.cvtColor(capture.read()[1], cv2.COLOR_BGR2RGB) for _ in range(batch_size)]
    capture.release()
    tensors = [predictor.preprocess(frame) for frame in frames]
    sizes = [frame.shape[:2] for frame in frames]
    predictor.predict_preprocessed(tensors, sizes)  # warm-up
    rates = []
    for _ in range(batches):
        tic = time.perf_counter()
        predictor.predict_preprocessed(tensors, sizes)
        rates.append(len(frames) / (time.perf_counter() - tic))
    return rates


def full_run(clip: Path, weights: str, threads: int, batch_size: int) -> dict:
    """One `detkit infer` run in a fresh process with `threads` torch threads: its summary's video entry."""
    with tempfile.TemporaryDirectory(prefix="detkit-bench-video-") as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "detkit",
                "infer",
                "--weights",
                weights,
                "--input",
                str(clip),
                "--output",
                f"{tmp}/out",
                "--device",
                "cpu",
                "--batch-size",
                str(batch_size),
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        return json.loads(Path(f"{tmp}/out/summary.json").read_text())["videos"][0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.video", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    clip = make_clip(ROOT / "datasets" / "shapes" / "bench_video" / f"shapes_640x480_{args.frames}.mp4", args.frames)
    print(f"clip {clip.relative_to(ROOT)}: {args.frames} frames 640x480; load {os.getloadavg()[0]:.2f} at start")
    for threads in args.threads:
        torch.set_num_threads(threads)
        decode = [decoder_only(clip, args.weights) for _ in range(args.runs)]
        model = model_only(clip, args.weights, args.batch_size, batches=args.runs)
        runs = [full_run(clip, args.weights, threads, args.batch_size) for _ in range(args.runs)]
        fps = [r["frames_per_second"] for r in runs]
        median = runs[sorted(range(len(runs)), key=lambda i: fps[i])[len(runs) // 2]]
        timing, seconds = median["timing"], median["seconds"]
        print(
            f"threads {threads}: full {min(fps):.2f} / {statistics.median(fps):.2f} frames/s (min / median of "
            f"{args.runs}); decoder only {min(decode):.1f} / {statistics.median(decode):.1f}; model only "
            f"{min(model):.2f} / {statistics.median(model):.2f} (batches of {args.batch_size})"
        )
        print(
            f"  median run {seconds:.2f} s: model {timing['model_s']:.2f} s, draw+write {timing['draw_write_s']:.2f} s,"
            f" waited for decoder {timing['waited_for_decoder_s']:.2f} s; decoder thread busy "
            f"{timing['decode_s']:.2f} s"
        )
    print(f"load {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
