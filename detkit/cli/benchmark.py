"""`detkit benchmark` (also tools/benchmark.py, detkit-benchmark): detkit vs torchvision speed, COCO
evaluation speed, data-loader speed, exported files' speed.

    detkit benchmark --device cuda --batch-size 1 8 --precision fp32 bf16      # speed
    detkit benchmark --device cpu --image-size 480 640 --step infer --iters 3 --warmup 1
    detkit benchmark --mode eval                     # 5000 images x 100 detections
    detkit benchmark --mode loader --workers 0 2 4   # the training loader alone
    detkit benchmark --mode export --image-size 480 640 --iters 3 --warmup 1 --threads 2  # eager/pt2/ORT

Speed mode times, on identical inputs and shared (calibrated random) weights, one inference and
one training step (forward, backward, SGD) of detkit's R101-C4 and of torchvision's FasterRCNN
assembled as the same R101-C4 (detkit/benchmark/tv_reference.py), interleaved A, B, A, B, ... in one
process; prints a markdown table (images/s min and median over the repeats, peak memory, RoIs per
image each model ran, detkit/torchvision ratio), the detection agreement and the FLOPs, and writes
everything as JSON (--json). Trailing `key=value` arguments are detkit config overrides, e.g.
`model.rpn.post_nms_topk_test=1000`; they apply to both models.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from detkit.cli.common import command_line, run_cli, setup_logging
from detkit.errors import ConfigError

logger = logging.getLogger("detkit.benchmark")


# The help ends with the examples: the docstring's explanation first, then its command lines.
_EPILOG = (
    __doc__.split("\n\n", 2)[2].rstrip()
    + "\n\nexamples:\n"
    + "\n".join("  " + line.strip() for line in __doc__.split("\n\n")[1].splitlines())
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    parser.add_argument(
        "--mode",
        choices=("speed", "eval", "loader", "accuracy", "export"),
        default="speed",
        help="what to time (default: speed)",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="write the results as JSON here (default: print them after the table)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and the calibrated weights (default 0)")
    speed = parser.add_argument_group("speed mode")
    speed.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: cuda when visible)")
    speed.add_argument("--depth", type=int, default=101, help="ResNet depth (default 101)")
    speed.add_argument(
        "--image-size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"), help="input size (default 800 1333)"
    )
    speed.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[1],
        help="images per step; several values = several rows (default 1)",
    )
    speed.add_argument(
        "--step",
        choices=("infer", "train"),
        nargs="+",
        default=["infer", "train"],
        help="which steps to time (default both)",
    )
    speed.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        nargs="+",
        default=["fp32"],
        help="autocast precision(s) (default fp32)",
    )
    speed.add_argument("--channels-last", action="store_true", help="both models in channels_last memory format")
    speed.add_argument(
        "--compile", action="store_true", help="torch.compile the trunk and the res5 head of both models"
    )
    speed.add_argument("--iters", type=int, default=10, help="timed repeats per model (default 10)")
    speed.add_argument("--warmup", type=int, default=3, help="untimed rounds first, the first counts RoIs (default 3)")
    speed.add_argument("--num-classes", type=int, default=80, help="foreground classes K (default 80)")
    speed.add_argument(
        "--models",
        choices=("detkit", "torchvision"),
        nargs="+",
        default=["detkit", "torchvision"],
        help="which models (default both)",
    )
    speed.add_argument(
        "--no-flops", action="store_true", help="skip the FLOP count (one more detkit step per step kind)"
    )
    speed.add_argument(
        "--res5-timing",
        choices=("auto", "on", "off"),
        default="auto",
        help="time res5 alone for its fraction of peak (auto: on for cuda)",
    )
    speed.add_argument(
        "--profile",
        metavar="DIR",
        help="also write a torch.profiler table and Chrome trace of one step of each model and row to DIR",
    )
    speed.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the CPU memory measurement (one more profiled step per model on the CPU)",
    )
    export = parser.add_argument_group(
        "export mode (detkit.export.benchmark; also uses --depth --image-size --iters "
        "--warmup --num-classes --models --threads)"
    )
    export.add_argument(
        "--export-dir", metavar="DIR", help="keep the exported .onnx / .pt2 here (default: a temporary folder)"
    )
    export.add_argument("--aoti", action="store_true", help="also compile an AOTInductor package (minutes) and time it")
    export.add_argument(
        "--int8", action="store_true", help="also quantize res5 to int8 (detkit export --int8-res5) and time that file"
    )
    export.add_argument(
        "--int8-images", type=int, default=16, metavar="N", help="calibration images for --int8 (default 16)"
    )
    export.add_argument(
        "--int8-calibration",
        metavar="DIR",
        help="calibrate --int8 on images of DIR (default: images generated like the timed one)",
    )
    evaluation = parser.add_argument_group("eval mode")
    evaluation.add_argument("--eval-images", type=int, default=5000, help="generated images (default 5000)")
    evaluation.add_argument("--dets-per-image", type=int, default=100, help="detections per image (default 100)")
    evaluation.add_argument("--eval-repeats", type=int, default=1, help="timed runs of each evaluator (default 1)")
    evaluation.add_argument(
        "--backends", nargs="+", default=["pycocotools", "faster_coco_eval"], help="detkit evaluator backends to time"
    )
    loader = parser.add_argument_group(
        "loader mode (detkit.benchmark.loader, as python -m benchmarks.loader) and accuracy mode"
    )
    loader.add_argument(
        "--config",
        help="loader: time this config's training data instead of generated shapes images; "
        "accuracy: the config to train with both models (e.g. configs/shapes_r101.yaml)",
    )
    loader.add_argument(
        "--output-dir", default="output/benchmark_accuracy", help="accuracy: runs go to DIR/detkit and DIR/torchvision"
    )
    loader.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="worker counts (default 0 2 4)")
    loader.add_argument("--batches", type=int, default=40, help="timed batches per worker count (default 40)")
    loader.add_argument("--loader-batch-size", type=int, default=2, help="images per batch (default 2)")
    loader.add_argument("--num-images", type=int, default=256, help="shapes images to generate (default 256)")
    loader.add_argument(
        "--shapes-size",
        type=int,
        nargs=2,
        default=[480, 640],
        metavar=("H", "W"),
        help="shapes image size (default 480 640)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted detkit config overrides (speed and loader modes), anywhere on the line",
    )
    return parser


def environment(device_name: str) -> dict:
    """Where and when: for the BENCHMARKS.md line."""
    import torch
    import torchvision

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": (commit + ("+uncommitted changes" if dirty else "")) if commit else None,
        "host": platform.node(),
        "device": device_name,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
        "command": command_line(),
    }


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def speed_table(result: dict) -> str:
    ratios = {(r["mode"], r["batch_size"], r["precision"]): r for r in result["ratios"]}
    lines = [
        "| step | batch | precision | model | RoIs/img | dets/img | ms min | ms median | img/s median | img/s best | peak MB | TFLOP/s | % peak | detkit/tv (median) |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        ratio = ratios.get((r["mode"], r["batch_size"], r["precision"])) if r["model"] == "detkit" else None
        frac = r.get("fraction_of_peak")
        lines.append(
            f"| {r['mode']} | {r['batch_size']} | {r['precision']} | {r['model']} | {_fmt(r['rois_per_image'], 0)} "
            f"| {_fmt(r.get('detections_per_image'), 0)} | {_fmt(r['time_ms_min'])} | {_fmt(r['time_ms_median'])} "
            f"| {_fmt(r['ims_per_s_median'], 3)} | {_fmt(r['ims_per_s_best'], 3)} | {_fmt(r['peak_mem_mb'], 0)} "
            f"| {_fmt(r.get('achieved_tflops'), 3)} | {_fmt(100 * frac if frac is not None else None)} "
            f"| {_fmt(ratio['speedup_median'], 2) + 'x' if ratio else ''} |"
        )
    parts = ["\n".join(lines)]
    if result["agreement"]:
        parts.append("Detection agreement (matched = same label, IoU >= 0.99 (0.9 for precision vs fp32)):")
        for a in result["agreement"]:
            parts.append(
                f"- {a['what']}, batch {a['batch_size']}: {a['matched']} of {a['num_a']} / {a['num_b']} detections matched "
                f"({100 * a['match_fraction']:.1f}%), max box diff {a['max_box_diff']:.2g} px, max score diff {a['max_score_diff']:.2g}"
            )
    for mode, f in result["flops"].items():
        parts.append(
            f"FLOPs ({mode}, detkit, fp32, {_fmt(f['rois_per_image'], 0)} RoIs/image): {f['gflops_per_image']:.1f} GFLOP per image, "
            f"res5 {f['res5_gflops_per_image']:.1f} GFLOP ({100 * f['res5_share']:.1f}%, {f['res5_gflops_per_roi']:.2f} GFLOP per RoI)"
        )
    for r in result["rows"]:
        if r.get("res5_ms") is not None:
            frac = r.get("res5_fraction_of_peak")
            parts.append(
                f"res5 alone ({r['mode']}, batch {r['batch_size']}, {r['precision']}): {r['res5_ms']:.1f} ms, "
                f"{r['res5_achieved_tflops']:.2f} TFLOP/s"
                + (f", {100 * frac:.1f}% of peak" if frac is not None else "")
            )
    return "\n\n".join(parts)


def eval_table(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"COCO box evaluation of {s['num_images']} generated images, {s['num_predictions']} detections, {s['num_gt_boxes']} GT boxes:",
        "",
        "| evaluator | eval s (min) | eval s (median) | load GT s | AP |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['evaluator']} | {r['eval_s_min']:.2f} | {r['eval_s_median']:.2f} | {r['load_gt_s']:.2f} | {r['AP']:.3f} |"
        )
    return "\n".join(lines)


def accuracy_table(summaries: dict) -> str:
    lines = [
        "| model | iterations | train wall s | s/iter | AP | AP50 | AP75 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in summaries.items():
        ev = s.get("eval", {})
        lines.append(
            f"| {name} | {s['iterations']} | {_fmt(float(s['wall_time_s']))} | {_fmt(s['s_per_iter'], 3)} | {_fmt(ev.get('bbox/AP'), 2)} "
            f"| {_fmt(ev.get('bbox/AP50'), 2)} | {_fmt(ev.get('bbox/AP75'), 2)} |"
        )
    return "\n".join(lines)


def run_loader(args: argparse.Namespace) -> dict:
    """The training loader alone, via detkit.benchmark.loader.benchmark_loader (python -m benchmarks.loader in a checkout)."""
    from detkit.benchmark.loader import benchmark_loader
    from detkit.config import DatasetConfig, load_config, replace

    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        shapes = DatasetConfig(
            type="shapes",
            name="shapes_bench",
            root="datasets/shapes",
            split="bench",
            num_images=args.num_images,
            image_size=tuple(args.shapes_size),
            num_classes=6,
            max_objects=10,
            seed=0,
        )
        cfg = replace(load_config(None, args.overrides), **{"data.train": (shapes,), "model.num_classes": 6})
    cfg = replace(cfg, **{"solver.ims_per_batch": args.loader_batch_size, "device": "cpu"})
    rows = benchmark_loader(cfg, workers=args.workers, num_batches=args.batches, warmup_batches=5)
    return {
        "settings": {"config": args.config, "batch_size": args.loader_batch_size, "batches": args.batches},
        "rows": rows,
    }


def main(argv: Sequence[str]) -> int:
    # `key=value` words are config overrides wherever they stand (a multi-value flag before them
    # would otherwise swallow them).
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = build_parser().parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    setup_logging()
    import torch

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)  # main() also runs inside other processes (tests)


def _run(args: argparse.Namespace) -> int:
    import torch

    if args.mode == "speed":
        from detkit.benchmark.speed import SpeedOptions, run_speed_benchmark
        from detkit.utils.env import resolve_device

        for name, value in (
            ("--iters", args.iters),
            ("--batch-size", min(args.batch_size)),
            ("--image-size", min(args.image_size)),
        ):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        device = resolve_device(args.device)
        if "fp16" in args.precision and device.type != "cuda":
            raise ConfigError("--precision fp16 needs --device cuda (CPU autocast: fp32 or bf16)")
        env = environment(
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()})"
        )
        speed_options = SpeedOptions(
            device=str(device.type),
            depth=args.depth,
            image_size=tuple(args.image_size),
            batch_sizes=tuple(args.batch_size),
            modes=tuple(args.step),
            precisions=tuple(args.precision),
            channels_last=args.channels_last,
            compile=args.compile,
            warmup=args.warmup,
            repeats=args.iters,
            num_classes=args.num_classes,
            overrides=tuple(args.overrides),
            models=tuple(args.models),
            flops=not args.no_flops,
            res5_timing={"auto": None, "on": True, "off": False}[args.res5_timing],
            memory=not args.no_memory,
            profile_dir=args.profile,
            seed=args.seed,
        )
        result = run_speed_benchmark(speed_options)
        table = speed_table(result)
    elif args.mode == "export":
        from detkit.export.benchmark import ExportBenchOptions, export_table, run_export_benchmark

        env = environment(f"cpu ({platform.processor() or platform.machine()})")
        export_options = ExportBenchOptions(
            depth=args.depth,
            num_classes=args.num_classes,
            image_size=tuple(args.image_size),
            warmup=args.warmup,
            repeats=args.iters,
            threads=args.threads,
            overrides=tuple(args.overrides),
            torchvision="torchvision" in args.models,
            seed=args.seed,
            keep_dir=args.export_dir,
            int8=args.int8,
            aoti=args.aoti,
            int8_calibration=args.int8_calibration,
            int8_images=args.int8_images,
        )
        result = run_export_benchmark(export_options)
        table = export_table(result)
    elif args.mode == "eval":
        from detkit.benchmark.eval_speed import run_eval_benchmark

        env = environment("cpu")
        result = run_eval_benchmark(
            args.eval_images, args.dets_per_image, args.eval_repeats, args.backends, seed=args.seed
        )
        table = eval_table(result)
    elif args.mode == "accuracy":
        from detkit.benchmark.accuracy import run_accuracy_comparison
        from detkit.config import load_config

        if not args.config:
            raise ConfigError(
                "--mode accuracy needs --config (e.g. configs/shapes_r101.yaml) and optionally key=value overrides"
            )
        cfg = load_config(args.config, args.overrides)
        env = environment(torch.cuda.get_device_name(0) if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
        summaries = run_accuracy_comparison(cfg, args.output_dir)
        result = {
            "settings": {"config": args.config, "overrides": args.overrides, "output_dir": args.output_dir},
            "runs": summaries,
        }
        table = accuracy_table(summaries)
    else:
        env = environment("cpu")
        result = run_loader(args)
        table = "\n".join(
            ["| workers | images/s | ms/batch |", "| ---: | ---: | ---: |"]
            + [
                f"| {r['workers']} | {r['images_per_s']:.1f} | {1000 * r['seconds'] / r['batches']:.1f} |"
                for r in result["rows"]
            ]
        )
    env["load_average_end"] = list(os.getloadavg())
    result = {"environment": env, **result}
    print(
        f"\n{env['date']}, commit {env['commit']}, {env['device']}, torch {env['torch']} ({env['torch_threads']} threads), "
        f"load average {env['load_average_start'][0]:.1f} -> {env['load_average_end'][0]:.1f}\n{env['command']}\n"
    )
    print(table)
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        print(f"\nJSON written to {args.json}")
    else:
        print("\n" + text)
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))
