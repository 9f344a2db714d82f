"""detkit-export / tools/export.py: a detkit checkpoint as one ONNX or TorchScript file.

    python tools/export.py --weights output/model_final.pth --format onnx --output model.onnx
    python tools/export.py --weights model_final.pth --config configs/shapes_r18.yaml --format torchscript \\
        --output model.pt [key=value ...]

The file takes one resized image (3, h, w) uint8 in the model's channel order (any h, w) and its
original size (2,) int64, and returns boxes (D, 4) xyxy in original pixels, scores (D,) and
labels (D,); class names, the resize rule and the rest travel in the file (README, Export).
--check SIZES runs the exported file (ONNX Runtime / TorchScript) and the PyTorch model on smooth
random images of those original sizes and reports the largest differences; a different number
of detections or different labels is an error (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from detkit.cli.common import run_cli, setup_logging
from detkit.errors import ConfigError

logger = logging.getLogger("detkit.cli.export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit-export",
        description="Export a detkit checkpoint (image in, detections out) to ONNX or TorchScript.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python tools/export.py --weights output/model_final.pth --format onnx --output model.onnx\n"
        "  python tools/export.py --weights output/model_final.pth --format torchscript --output model.pt "
        "--check 300x400,480x640",
    )
    parser.add_argument("--weights", required=True, help="detkit checkpoint (.pth); brings config and class names")
    parser.add_argument("--format", dest="fmt", choices=("onnx", "torchscript"), default="onnx", help="onnx (default)")
    parser.add_argument("--output", required=True, help="file to write (.onnx, or .pt for TorchScript)")
    parser.add_argument("--config", help="YAML config replacing the checkpoint's (e.g. another test size)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. model.roi_heads.score_thresh=0.3")
    parser.add_argument("--check", metavar="HxW,...", default="",
                        help="after exporting, compare with the PyTorch model on images of these sizes")
    return parser


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in filter(None, text.split(",")):
        try:
            h, w = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--check {text!r}: sizes are HxW separated by commas, e.g. 300x400,480x640") from None
        if h < 1 or w < 1:
            raise ConfigError(f"--check {item}: sizes must be positive")
        sizes.append((h, w))
    return sizes


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_intermixed_args(list(argv))
    setup_logging()
    sizes = parse_sizes(args.check)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise ConfigError(f"--output {output}: folder {output.parent} does not exist")
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name such as {output / 'model.onnx'}")

    from detkit.engine.predictor import Predictor
    from detkit.export.exporter import export_model, require_export_packages

    if args.fmt == "onnx":
        require_export_packages()  # before the (slow) model build
    predictor = Predictor(args.weights, config=args.config, overrides=args.overrides, device="cpu")
    export_model(predictor, output, args.fmt)
    print(f"exported {args.weights} -> {output} ({args.fmt}, {output.stat().st_size / 2**20:.1f} MB)")
    if not sizes:
        return 0

    from detkit.export.parity import compare_backends, format_parity
    from detkit.export.runtime import ExportedPredictor

    exported = ExportedPredictor(output, score_thresh=predictor.score_thresh)
    report = compare_backends(predictor, exported, sizes)
    print(format_parity(report))
    return 0 if report["same_detections"] else 1


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
