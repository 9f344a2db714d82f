#!/usr/bin/env python
"""Generate the synthetic shapes dataset (COCO json + JPEGs) ahead of time.

Training generates it on first use anyway; this script does it up front, for a config or for
parameters given on the command line:

    python datasets/prepare_shapes.py --config configs/shapes_r18.yaml     # every shapes entry of the config
    python datasets/prepare_shapes.py --out /data/shapes_val --split val --num-images 500 \
        --image-size 480 640 --max-objects 10 --seed 3                     # a standalone copy

With --config the files land in the cache the config uses (<root>/<split>_<hash>/) and are found
there by training. With --out they go to OUT/{annotations.json, images/}: use it like any COCO
dataset ({type: coco, ann_file: OUT/annotations.json, image_root: OUT/images}).
"""

import argparse
import os
import sys
import time
from collections.abc import Sequence

try:
    import detkit  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detkit.cli.common import run_cli, setup_logging


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", help="generate every dataset of type shapes in this config (data.train and data.test)"
    )
    parser.add_argument("--out", help="write one split to this folder instead (parameters from the flags below)")
    parser.add_argument("--split", default="train", help="split name, part of the seed (default: train)")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--image-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    parser.add_argument(
        "--num-classes", type=int, default=6, help="1..8: circle square triangle star hexagon cross ring arrow"
    )
    parser.add_argument("--max-objects", type=int, default=6)
    parser.add_argument("--min-object-size", type=int, default=12)
    parser.add_argument("--max-object-size", type=int, default=0, help="0: half the short side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: up to 8 for 400+ images)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides with --config")
    args = parser.parse_args(argv)
    setup_logging()

    from detkit.config import load_config
    from detkit.data.datasets import dataset_files
    from detkit.data.synthetic import ShapesParams, generate_shapes, params_from_config
    from detkit.errors import ConfigError

    if bool(args.config) == bool(args.out):
        raise ConfigError("give exactly one of --config CONFIG (generate its shapes datasets) or --out DIR (one split)")
    start = time.perf_counter()
    if args.out:
        params = ShapesParams(
            split=args.split,
            num_images=args.num_images,
            image_size=tuple(args.image_size),
            num_classes=args.num_classes,
            max_objects=args.max_objects,
            min_object_size=args.min_object_size,
            max_object_size=args.max_object_size,
            seed=args.seed,
        )
        ann_file = generate_shapes(params, args.out, workers=args.workers)
        print(
            f"{params.num_images} images: {ann_file} (images in {os.path.join(args.out, 'images')}) in {time.perf_counter() - start:.1f} s"
        )
        return 0
    cfg = load_config(args.config, args.overrides)
    entries = [
        (f"data.{split}[{i}]", ds)
        for split in ("train", "test")
        for i, ds in enumerate(getattr(cfg.data, split))
        if ds.type == "shapes"
    ]
    if not entries:
        raise ConfigError(f"{args.config} has no dataset of type shapes under data.train or data.test")
    for key, ds in entries:
        params_from_config(ds)  # validate before the slow part
        ann_file, _image_root = dataset_files(ds)
        print(f"{key} {ds.name or ds.split}: {ds.num_images} images, {ann_file}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
