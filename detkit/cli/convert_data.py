"""`detkit convert-data` (also tools/convert_data.py, detkit-convert-data): a labelling tool's
annotations (Pascal VOC, YOLO, LabelMe, CVAT; or COCO, to select or rename classes) -> one COCO json.

    detkit convert-data --format voc VOCdevkit/VOC2007 --split trainval --output voc07_trainval.json
    detkit convert-data --format yolo mydata/data.yaml --split val --output val.json
    detkit convert-data --format labelme annotated/ --output train.json --rename Car=car --classes car,bus
    detkit convert-data --format cvat export/annotations.xml --output all.json --skip-bad
    detkit convert-data --format coco export.json --images export/ --output clean.json --drop-empty-classes

The json (written atomically) is what pycocotools and `detkit train` (type: coco) read; its
`image_root` key names the folder its file_names are relative to (pass it as image_root). Input that
cannot be parsed stops with one line naming the file and line or shape (exit status 2), or with
--skip-bad is skipped, counted and listed under the json's "problems". The console shows the
images, boxes per class and classes without a box.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence

from detkit.cli.common import run_cli, setup_logging
from detkit.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from detkit.data.formats import FORMATS

    parser = argparse.ArgumentParser(
        prog="detkit convert-data",
        description="Convert Pascal VOC, YOLO, LabelMe or CVAT annotations (or a COCO file, to select, rename "
        "or drop classes) into one COCO json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  detkit convert-data --format voc VOCdevkit/VOC2007 --split trainval --output voc07_trainval.json\n"
        "  detkit convert-data --format yolo mydata/data.yaml --split val --output val.json\n"
        "  detkit convert-data --format labelme annotated/ --output train.json --rename Car=car\n"
        "  detkit convert-data --format cvat export/annotations.xml --output all.json --skip-bad",
    )
    parser.add_argument("input", help="VOC folder, YOLO data.yaml, LabelMe folder or file, CVAT XML, COCO json")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the input's format")
    parser.add_argument("--output", required=True, help="the COCO json to write")
    parser.add_argument(
        "--split",
        default="",
        help="VOC: ImageSets/Main/<split>.txt (default: every XML); YOLO: data.yaml key (default: train)",
    )
    parser.add_argument("--subset", default="", help="CVAT: only the images of this subset")
    parser.add_argument(
        "--images", default="", help="image folder, when not the format's default (COCO: the json's folder)"
    )
    parser.add_argument("--classes", default="", help="comma-separated classes to keep, in this order (ids 1..K)")
    parser.add_argument(
        "--rename", action="append", default=[], metavar="OLD=NEW", help="rename a class (repeatable; same NEW merges)"
    )
    parser.add_argument("--drop-empty-classes", action="store_true", help="remove classes without a single box")
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip unparseable annotations, listing them, instead of stopping"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    from detkit.data.formats import read_dataset, write_coco_json

    args = build_parser().parse_args(list(argv))
    setup_logging()
    rename = {}
    for item in args.rename:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise ConfigError(f"--rename {item!r}: expected OLD=NEW, e.g. --rename Car=car")
        rename[old] = new
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    data = read_dataset(
        args.format,
        args.input,
        split=args.split,
        image_root=args.images,
        subset=args.subset,
        classes=classes,
        rename=rename,
        drop_empty_classes=args.drop_empty_classes,
        skip_bad=args.skip_bad,
    )
    out = write_coco_json(data, args.output)
    counts = Counter(a["category_id"] for a in data["annotations"])
    print(f"{out}: {len(data['images'])} images, {len(data['annotations'])} boxes, {len(data['categories'])} classes")
    for cat in data["categories"]:
        print(f"  {cat['id']:>3}  {cat['name']:<24} {counts[cat['id']]:>7} boxes")
    report = data.get("class_report", {})
    if report.get("empty"):
        dropped = " (dropped)" if report.get("dropped") else " (--drop-empty-classes removes them)"
        print(f"classes without a box: {', '.join(report['empty'])}{dropped}")
    if data.get("problems"):
        print(f"{len(data['problems'])} bad annotations skipped (listed under 'problems' in the json); first:")
        for p in data["problems"][:5]:
            print(f"  {p['source']}: {p['message']}")
    print(f"image_root: {data['image_root']}")
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
