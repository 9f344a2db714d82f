"""`detkit export` (also tools/export.py, detkit-export): a detkit checkpoint as one ONNX,
torch.export (pt2) or AOTInductor (aoti) file.

    detkit export --weights output/model_final.pth --format onnx --output model.onnx
    detkit export --weights model_final.pth --config configs/shapes_r18.yaml --format pt2 \\
        --output model.pt2 [key=value ...]
    detkit export --weights model_final.pth --format aoti --output model_aoti.pt2   # compiled for this CPU

The file takes one resized image (3, h, w) uint8 in the model's channel order (any h, w) and its
original size (2,) int64, and returns boxes (D, 4) xyxy in original pixels, scores (D,) and
labels (D,); class names, the resize rule and the rest travel in the file (README, Export).
--batched (onnx, pt2) writes a file that takes N images of their own sizes in one call (a padded
(N, 3, H, W) batch with each image's size) and gives each image its one-image detections.
--check SIZES runs the exported file (ONNX Runtime / pt2 / aoti) and the PyTorch model on smooth
random images of those original sizes and reports the largest differences; a different number
of detections or different labels is an error (exit 1).
--int8-res5 --calibration DIR (ONNX only) writes res5 in int8, calibrated on the first
--num-calibration images of DIR (detkit.export.quantize; README, Export: when it pays).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from detkit.cli.common import run_cli, setup_logging
from detkit.errors import ConfigError
from detkit.export.exporter import BATCHED_FORMATS, FORMATS, NOT_BATCHED, RETIRED_FORMATS

logger = logging.getLogger("detkit.cli.export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit export",
        description="Export a detkit checkpoint (image in, detections out) to ONNX, torch.export (pt2) "
        "or an AOTInductor package (aoti).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  detkit export --weights output/model_final.pth --format onnx --output model.onnx\n"
        "  detkit export --weights output/model_final.pth --format pt2 --output model.pt2 "
        "--check 300x400,480x640\n"
        "  detkit export --weights output/model_final.pth --format onnx --output model_int8.onnx "
        "--int8-res5 --calibration datasets/coco/val2017\n"
        "  detkit export --weights output/model_final.pth --format onnx --batched --output model_batched.onnx",
    )
    parser.add_argument("--weights", required=True, help="detkit checkpoint (.pth); brings config and class names")
    parser.add_argument(
        "--format",
        dest="fmt",
        choices=(*FORMATS, *RETIRED_FORMATS),
        metavar="{" + ",".join(FORMATS) + "}",
        default="onnx",
        help="onnx (default; ONNX Runtime), pt2 (torch.export, bit-identical to eager) or aoti (AOTInductor, "
        "compiled for this machine's CPU, loadable from C++); torchscript was retired (use pt2)",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="file to write (.onnx, or .pt2 for pt2 / aoti); an existing file is kept unless --overwrite",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output when it exists")
    parser.add_argument(
        "--batched",
        action="store_true",
        help="onnx / pt2: the file takes a batch of N images of their own sizes (padded, with their sizes) and "
        "returns (N, D, ...) detections plus num_detections; each image gets its one-image detections",
    )
    parser.add_argument("--config", help="YAML config replacing the checkpoint's (e.g. another test size)")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides key=value, e.g. model.roi_heads.score_thresh=0.3"
    )
    parser.add_argument(
        "--check",
        metavar="HxW,...",
        default="",
        help="after exporting, compare with the PyTorch model on images of these sizes",
    )
    int8 = parser.add_argument_group("int8 (ONNX only; README, Export: measured speed and AP)")
    int8.add_argument(
        "--int8-res5",
        action="store_true",
        help="quantize res5 (the per-RoI head) to int8 with ONNX Runtime's static quantization",
    )
    int8.add_argument("--calibration", metavar="DIR", help="folder of images to calibrate the int8 ranges on")
    int8.add_argument(
        "--num-calibration",
        type=int,
        default=300,
        metavar="N",
        help="calibrate on the first N images of --calibration (default 300)",
    )
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
    if args.fmt in RETIRED_FORMATS:
        raise ConfigError(f"--format {args.fmt}: {RETIRED_FORMATS[args.fmt]}")
    sizes = parse_sizes(args.check)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise ConfigError(f"--output {output}: folder {output.parent} does not exist")
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name such as {output / 'model.onnx'}")
    if output.exists() and not args.overwrite:
        raise ConfigError(f"--output {output} already exists: add --overwrite to replace it, or give another file name")
    if args.batched and args.fmt not in BATCHED_FORMATS:
        raise ConfigError(f"--batched --format {args.fmt}: {NOT_BATCHED}; drop --batched or use --format pt2")
    if args.int8_res5:
        if args.batched:
            raise ConfigError(
                "--int8-res5 with --batched: the int8 quantizer does not reach into the batched file's loop; "
                "quantize a one-image file (drop --batched)"
            )
        if args.fmt != "onnx":
            raise ConfigError("--int8-res5 needs --format onnx (the quantized file runs in ONNX Runtime)")
        if not args.calibration:
            raise ConfigError(
                "--int8-res5 needs --calibration DIR, a folder of images like the ones the model will see"
            )
        if sizes:
            raise ConfigError(
                "--check compares with the float32 PyTorch model, which int8 does not claim to match; "
                "measure an int8 file with tools/eval.py --model FILE instead"
            )
        from detkit.export.quantize import calibration_images

        calibration_images(args.calibration, args.num_calibration)  # a bad folder fails before the export
    elif args.calibration:
        raise ConfigError("--calibration is only used with --int8-res5")

    from detkit.engine.predictor import Predictor
    from detkit.export.exporter import export_model, require_export_packages

    if args.fmt == "onnx":
        require_export_packages()  # before the (slow) model build
    predictor = Predictor(args.weights, config=args.config, overrides=args.overrides, device="cpu")
    if args.int8_res5:
        import tempfile

        from detkit.export.quantize import quantize_res5

        with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as work:
            fp32 = export_model(predictor, Path(work) / "model_fp32.onnx", "onnx")
            quantize_res5(fp32, output, args.calibration, args.num_calibration)
    else:
        export_model(predictor, output, args.fmt, batched=args.batched)
    kind = "onnx, int8 res5" if args.int8_res5 else args.fmt + (", batched" if args.batched else "")
    print(f"exported {args.weights} -> {output} ({kind}, {output.stat().st_size / 2**20:.1f} MB)")
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
