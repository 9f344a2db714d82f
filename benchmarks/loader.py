"""Data-loader throughput (images/s) for 0, 2 and 4 workers on the shapes data at COCO-like sizes.

    python -m benchmarks.loader                          # 480x640 shapes, short side 640..800, max 1333
    python -m benchmarks.loader --workers 0 1 2 --batches 60 --batch-size 2
    python -m benchmarks.loader --config configs/frcnn_r101.yaml   # your own data instead of shapes

Prints a markdown table for BENCHMARKS.md. The timing itself is detkit.benchmark.loader.benchmark_loader
(also `detkit benchmark --mode loader`).
"""

import argparse
import datetime
import os
import platform
import sys
from collections.abc import Sequence

from detkit.cli.common import run_cli, setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loader",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", help="use this config's training data and data settings instead of the shapes benchmark set"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2, 4], help="worker counts to time (default: 0 2 4)"
    )
    parser.add_argument("--batches", type=int, default=40, help="timed batches per setting (default: 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first (default: 5)")
    parser.add_argument(
        "--batch-size", type=int, default=2, help="images per batch (default: 2, one GPU's share of COCO's 16)"
    )
    parser.add_argument("--num-images", type=int, default=256, help="shapes images to generate (default: 256)")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=[480, 640],
        metavar=("H", "W"),
        help="shapes image size (default: 480 640)",
    )
    parser.add_argument("--root", default="datasets/shapes", help="where the shapes set is generated/cached")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.augment=[{name: ColorJitter}]")
    args = parser.parse_args(argv)
    setup_logging()

    from detkit.benchmark.loader import benchmark_loader
    from detkit.config import DatasetConfig, load_config, replace

    if args.config:
        cfg = load_config(args.config, args.overrides)
        what = f"training data of {args.config}"
    else:
        shapes = DatasetConfig(
            type="shapes",
            name="shapes_bench",
            root=args.root,
            split="bench",
            num_images=args.num_images,
            image_size=tuple(args.image_size),
            num_classes=6,
            max_objects=10,
            seed=0,
        )
        cfg = replace(load_config(None, args.overrides), **{"data.train": (shapes,), "model.num_classes": 6})
        h, w = args.image_size
        what = f"{args.num_images} shapes JPEGs of {h}x{w}"
    cfg = replace(cfg, **{"solver.ims_per_batch": args.batch_size, "device": "cpu"})
    rows = benchmark_loader(cfg, workers=args.workers, num_batches=args.batches, warmup_batches=args.warmup)

    d = cfg.data
    print(
        f"\nData loader throughput, {datetime.date.today().isoformat()}, {platform.node()} ({os.cpu_count()} CPUs visible), {what}"
    )
    print(
        f"train transform: short side {list(d.min_size_train)}, max {d.max_size_train}, flip {d.flip_prob}, augment {list(d.augment)}; "
        f"batch {args.batch_size}, padded to /{d.size_divisibility}; {args.batches} batches timed after {args.warmup} warm-up\n"
    )
    print("| workers | images/s | ms/batch | mean resized size (h x w) |")
    print("| ---: | ---: | ---: | :--- |")
    for r in rows:
        print(
            f"| {r['workers']} | {r['images_per_s']:.1f} | {1000 * r['seconds'] / r['batches']:.1f} | {r['mean_hw'][0]:.0f} x {r['mean_hw'][1]:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
