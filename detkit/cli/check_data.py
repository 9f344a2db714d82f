"""`detkit check-data` (also tools/check_data.py, detkit-check-data): one check of a dataset before training.

    detkit check-data annotations.json --images images/            # a COCO json and its image folder
    detkit check-data DATASET --format voc|yolo|labelme|cvat [--split S] # a labelling tool's export
    detkit check-data --config configs/my_data.yaml [key=value ...] # every data.train and data.test entry

Prints a table per dataset (images, boxes, crowd regions, images without boxes, classes), the boxes
per class and per COCO size, how well the RPN's anchors cover the boxes (anchors and input scale
from --config, else configs/base.yaml's), then every problem with its file and line or annotation
id. --json PATH writes all of it (every problem, not only the first of each kind).

Exit status: 0 when training can proceed (warnings only: boxes the loaders drop or clip, classes
without boxes, EXIF-rotated images), 2 when it cannot (the errors listed; see detkit.data.check for
which problems are errors). --strict makes warnings block too. Images are decoded as training
decodes them (a truncated JPEG is caught); --no-decode only checks that the files exist.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from detkit.cli.common import run_cli, setup_logging
from detkit.errors import ConfigError, DataError

logger = logging.getLogger("detkit.cli.check_data")

FORMATS = ("coco", "voc", "yolo", "labelme", "cvat")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit check-data",
        description="Check a dataset before training: counts per split and class, box sizes against the anchors, "
        "and every problem with its file and line or annotation id. Exit 0: training can proceed; 2: it cannot.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  detkit check-data train.json --images train_images/ --json report.json\n"
        "  detkit check-data VOCdevkit/VOC2007 --format voc\n"
        "  detkit check-data --config configs/shapes_r18.yaml",
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="PATH | key=value",
        help="the dataset (a COCO json, or what --format reads); with --config: config overrides",
    )
    parser.add_argument("--format", choices=FORMATS, default="coco", help="the dataset's format (default: coco)")
    parser.add_argument(
        "--images", help="image folder of a COCO json (default: the json's 'image_root', else its folder)"
    )
    parser.add_argument("--config", help="YAML config: check its data.train and data.test entries, with its anchors")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write the whole report as JSON")
    parser.add_argument("--no-decode", action="store_true", help="only check that the image files exist (faster)")
    parser.add_argument("--strict", action="store_true", help="warnings block too (exit 2)")
    parser.add_argument(
        "--split",
        default="",
        help="--format voc: ImageSets/Main/<split>.txt (default every XML); yolo: the data.yaml key",
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="--format readers: skip unparseable annotations (listed as warnings)"
    )
    parser.add_argument("--workers", type=int, default=0, help="image decoding threads (default: cores, at most 8)")
    parser.add_argument("--max-listed", type=int, default=5, help="problems of each kind shown per dataset")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    setup_logging()
    from detkit.data.check import check_dataset, format_report, split_problems

    cfg, entries = _resolve(args)
    from detkit.data.check import anchor_spec

    anchors = anchor_spec(cfg)
    checks = []
    for split, name, source, data, image_root in entries:
        checks.append(
            (
                split,
                check_dataset(
                    data,
                    image_root,
                    name=name,
                    source=source,
                    decode_images=not args.no_decode,
                    anchors=anchors,
                    workers=args.workers,
                ),
            )
        )
    extra = split_problems(checks, cfg.model.num_classes if args.config else None)
    blocking = [f"{s} {c.name}: {line}" for s, c in checks for line in c.blocking] + [str(p) for p in extra]
    if args.strict:
        blocking += [f"{s} {c.name}: {p} (--strict)" for s, c in checks for p in c.warnings]
    print(format_report(checks, extra, max_listed=args.max_listed))
    if args.json_path:
        from detkit.analysis.report import write_json_atomic

        report = {
            "ok": not blocking,
            "strict": args.strict,
            "blocking": blocking,
            "datasets": [{"split": s, **c.to_dict()} for s, c in checks],
            "problems": [p.to_dict() for p in extra],
        }
        print(f"JSON report: {write_json_atomic(args.json_path, report)}")
    if blocking:
        listing = "\n  - ".join(blocking)
        print(f"\ntraining cannot proceed: {len(blocking)} problem(s) to fix:\n  - {listing}", file=sys.stderr)
        return 2
    print("\ntraining can proceed" + (" (see the warnings above)" if any(c.warnings for _, c in checks) else ""))
    return 0


def _resolve(args):
    """(config, [(split, name, source, COCO dict, image_root)]) of the command line."""
    from detkit.config import load_config

    if args.config:
        if args.images or args.format != "coco":
            raise ConfigError(
                "with --config the datasets come from data.train / data.test: leave out --images and --format"
            )
        cfg = load_config(args.config, args.inputs)
        entries = []
        for split in ("train", "test"):
            for ds in cfg.data.train if split == "train" else cfg.data.test:
                entries.append((split, *_read_entry(ds)))
        if not entries:
            raise ConfigError(f"{args.config} has no data.train or data.test dataset to check")
        return cfg, entries
    if len(args.inputs) != 1:
        raise ConfigError(
            "give one dataset path (a COCO json with --images, or a folder/file with --format), or --config CONFIG"
        )
    path = args.inputs[0]
    if "=" in path and not Path(path).exists():
        raise ConfigError(f"{path!r} looks like a config override; overrides need --config CONFIG")
    cfg = load_config(None)
    if args.format == "coco":
        from detkit.data.coco import read_coco_dict

        data = read_coco_dict(path)
        image_root = args.images or data.get("image_root") or str(Path(path).parent)
        return cfg, [("data", Path(path).stem, str(path), data, image_root)]
    options = {"skip_bad": args.skip_bad}
    if args.images:
        options["image_root"] = args.images
    if args.split:
        options["split"] = args.split
    data = _read_format(args.format, path, options)
    return cfg, [("data", Path(path).stem or Path(path).name, str(path), data, data.get("image_root"))]


def _read_format(fmt: str, path: str, options: dict) -> dict:
    """A labelling tool's export -> the COCO-format dict of detkit.data.formats (imported here: only
    this path needs the readers)."""
    try:
        formats = importlib.import_module("detkit.data.formats")
    except ImportError as exc:
        raise DataError(
            f"--format {fmt}: this detkit has no dataset readers (detkit.data.formats: {exc}); "
            "convert the data to COCO json first"
        ) from None
    return formats.read_dataset(fmt, path, **options)


def _read_entry(ds) -> tuple[str, str, dict, str | None]:
    """(name, source, COCO dict, image_root) of a config dataset entry, read as training reads it:
    the shapes set generated, another format's entry converted to its cached COCO json (which keeps
    the reader's "source" of every image and box, and the annotations it skipped)."""
    from detkit.data.coco import read_coco_dict
    from detkit.data.datasets import dataset_files

    ann_file, image_root = dataset_files(ds)
    source = str(getattr(ds, "path", "") or ann_file)
    return ds.name or Path(ann_file).stem, source, read_coco_dict(ann_file), image_root


def entry_point() -> None:
    sys.exit(run_cli(main))
