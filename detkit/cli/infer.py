"""detkit-infer / tools/infer.py: detect objects in an image, a folder or a glob, draw them.

    python tools/infer.py --weights output/model_final.pth --input photos/ --output out/ [--recursive]
    python tools/infer.py --backend onnxruntime --model model.onnx --input photos/ --output out/

Writes into --output:
  <same relative path as the input>   each image with boxes, class names and scores (a colour per class)
  predictions.json                    COCO results plus "file_name" (relative to the input root) and
                                      "category_name"; image_id is the image's 1-based index in the
                                      sorted input list
  summary.json                        counts, images/s, skipped and ignored files, the files written

Inputs: files with an image extension (.jpg .jpeg .png .bmp .tif .tiff .webp, any case); other files
are ignored and counted. An image that cannot be decoded is reported as skipped and the run goes on.

Output safety: --output may not be the input folder (nor lie inside it with --recursive, where its
drawings would become inputs of the next run). A non-empty --output is refused; --overwrite first
deletes the files a previous detkit-infer run wrote there (listed in its summary.json) and still
refuses if anything else is left, so results of two runs are never mixed.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from detkit.cli.common import run_cli, setup_logging
from detkit.errors import ConfigError, DataError, ImageReadError

logger = logging.getLogger("detkit.cli.infer")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SUMMARY_NAME = "summary.json"
PREDICTIONS_NAME = "predictions.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit-infer",
        description="Detect objects in images with a detkit checkpoint; write drawn images and predictions.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python tools/infer.py --weights output/model_final.pth --input photos/ --output out/ "
        "--score-thresh 0.5",
    )
    parser.add_argument("--weights", help="detkit checkpoint (.pth); brings config and class names (--backend pytorch)")
    parser.add_argument("--backend", choices=("pytorch", "onnxruntime", "torchscript"), default="pytorch",
                        help="pytorch: the checkpoint in --weights; onnxruntime / torchscript: the file in --model "
                        "written by tools/export.py (README, Export)")
    parser.add_argument("--model", help="exported model (.onnx, .pt) for --backend onnxruntime / torchscript")
    parser.add_argument("--input", required=True, help="an image file, a folder, or a glob such as 'photos/*.jpg'")
    parser.add_argument("--output", required=True, help="folder for the drawn images, predictions.json, summary.json")
    parser.add_argument("--config", help="YAML config replacing the checkpoint's (e.g. another test size)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.min_size_test=600")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring >= this (0.5)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (8)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when a GPU is visible")
    parser.add_argument("--recursive", action="store_true", help="also look in sub-folders (and let ** match in globs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of a previous detkit-infer run in --output")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes (0: in this process)")
    return parser


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


@dataclass
class InputSet:
    """root: the folder that relative output paths start from; images: sorted image files;
    ignored: files without an image extension."""

    root: Path
    images: list[Path]
    ignored: list[Path] = field(default_factory=list)

    def relative(self, path: Path) -> Path:
        return path.relative_to(self.root)


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def collect_inputs(spec: str, recursive: bool = False) -> InputSet:
    """Expand --input (a file, a folder or a glob) into image files; DataError when none."""
    if glob.has_magic(spec):
        # The root is the longest leading part without wildcards: 'photos/2024/*.jpg' -> photos/2024.
        parts = Path(spec).parts
        fixed = parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))]
        root = Path(*fixed) if fixed else Path(".")
        files = [Path(p) for p in glob.glob(spec, recursive=recursive) if os.path.isfile(p)]
        if not files:
            raise DataError(f"--input {spec!r} matches no files")
    else:
        path = Path(spec)
        if path.is_dir():
            root = path
            candidates = path.rglob("*") if recursive else path.iterdir()
            files = [p for p in candidates if p.is_file()]
        elif path.is_file():
            if not _is_image_name(path):
                raise DataError(f"--input {spec} is not an image file (extensions: {' '.join(IMAGE_EXTENSIONS)})")
            root, files = path.parent, [path]
        else:
            raise DataError(f"--input {spec}: no such file or folder")
    files = sorted(files, key=lambda p: p.relative_to(root).as_posix())
    images = [p for p in files if _is_image_name(p)]
    ignored = [p for p in files if not _is_image_name(p)]
    if not images:
        hint = "" if recursive else "; add --recursive to look in sub-folders"
        raise DataError(
            f"--input {spec}: no image files ({len(ignored)} other files; image extensions are "
            f"{' '.join(IMAGE_EXTENSIONS)}){hint}"
        )
    return InputSet(root=root, images=images, ignored=ignored)


def prepare_output_dir(output: Path, inputs: InputSet, recursive: bool, overwrite: bool) -> None:
    """Refuse outputs that would overwrite or mix with inputs or earlier results (module docstring)."""
    out = output.resolve()
    root = inputs.root.resolve()
    if out == root:
        raise ConfigError(f"--output {output} is the input folder; the drawings would replace the images. "
                          "Choose another folder")
    if recursive and root in out.parents:
        raise ConfigError(f"--output {output} is inside the input folder {inputs.root} searched with --recursive; "
                          "the drawings would become inputs of the next run. Choose a folder outside it")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--output {output} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        count = sum(1 for _ in out.iterdir())
        raise ConfigError(f"--output {output} is not empty ({count} entries); choose a new folder, or pass "
                          "--overwrite to replace the results of a previous detkit-infer run there")
    _remove_previous_run(out)
    leftovers = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    if leftovers:
        shown = ", ".join(leftovers[:5]) + (", ..." if len(leftovers) > 5 else "")
        raise ConfigError(f"--output {output} holds {len(leftovers)} files that detkit-infer did not write "
                          f"({shown}); --overwrite only replaces its own outputs. Choose another folder")


def _remove_previous_run(out: Path) -> None:
    """Delete the files a previous run listed in its summary.json, then the folders left empty."""
    summary_path = out / SUMMARY_NAME
    if not summary_path.is_file():
        return
    try:
        written = json.loads(summary_path.read_text()).get("outputs", [])
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"{summary_path} is not a detkit-infer summary; choose another --output") from None
    removed = 0
    for rel in written:
        target = (out / rel).resolve()
        if out in target.parents and target.is_file():  # never outside --output, whatever the json says
            target.unlink()
            removed += 1
    for name in (PREDICTIONS_NAME, SUMMARY_NAME):
        (out / name).unlink(missing_ok=True)
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    logger.info("--overwrite: removed %d files of the previous run in %s", removed, out)


# --------------------------------------------------------------------------------------------
# Reading images in worker processes
# --------------------------------------------------------------------------------------------


class _ImageFiles:
    """Dataset of (index, RGB image or None, model tensor or None, error or None) per file."""

    def __init__(self, paths: Sequence[Path], preprocessor):
        self.paths = list(paths)
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from detkit.data import read_image

        try:
            image = read_image(self.paths[index], "RGB")
        except ImageReadError as exc:
            return index, None, None, exc.reason
        return index, image, self.preprocessor(image), None


def _build_loader(paths: Sequence[Path], preprocessor, batch_size: int, workers: int):
    """Batches of `_ImageFiles` items, decoded and resized in `workers` processes."""
    import torch

    return torch.utils.data.DataLoader(
        _ImageFiles(paths, preprocessor), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=list,
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_intermixed_args(list(argv))
    setup_logging()
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    if not 0.0 <= args.score_thresh <= 1.0:
        raise ConfigError(f"--score-thresh {args.score_thresh}: must be in [0, 1]")
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: must be >= 0")

    inputs = collect_inputs(args.input, args.recursive)
    out = Path(args.output)
    prepare_output_dir(out, inputs, args.recursive, args.overwrite)

    import cv2
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from detkit.engine.evaluator import dump_predictions
    from detkit.utils.visualization import draw_detections

    predictor = build_predictor(args)
    out.mkdir(parents=True, exist_ok=True)
    loader = _build_loader(inputs.images, predictor.preprocessor, args.batch_size, args.workers)

    predictions: list[dict] = []
    written: list[str] = []
    skipped: list[dict] = []
    num_done = 0
    start = time.perf_counter()
    progress = tqdm(total=len(inputs.images), unit="img", desc="detecting", dynamic_ncols=True, file=sys.stderr)
    # Log lines (skipped files) go through tqdm.write so they do not tear the bar.
    with progress as bar, logging_redirect_tqdm(loggers=[logging.getLogger("detkit")]):
        for batch in loader:
            readable = [item for item in batch if item[3] is None]
            for index, _, _, reason in batch:
                if reason is not None:
                    rel = inputs.relative(inputs.images[index]).as_posix()
                    skipped.append({"file_name": rel, "reason": reason})
                    logger.warning("skipped %s: %s", inputs.images[index], reason)
            if readable:
                detections = predictor.predict_preprocessed(
                    [item[2] for item in readable], [item[1].shape[:2] for item in readable])
                for (index, image, _, _), dets in zip(readable, detections):
                    rel = inputs.relative(inputs.images[index])
                    for pred in dets.to_coco(index + 1, predictor.category_ids):
                        predictions.append({"image_id": pred.pop("image_id"), "file_name": rel.as_posix(), **pred})
                    drawn = draw_detections(image, dets.boxes, dets.labels, dets.scores, predictor.class_names)
                    target = out / rel  # mirrors the input tree, same format
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if not cv2.imwrite(str(target), drawn[:, :, ::-1]):  # RGB -> BGR for OpenCV
                        skipped.append({"file_name": rel.as_posix(), "reason": f"cannot write {target}"})
                        continue
                    written.append(rel.as_posix())
                    num_done += 1
            bar.update(len(batch))
    seconds = time.perf_counter() - start

    dump_predictions(predictions, out / PREDICTIONS_NAME)
    summary = {
        "weights": str(args.weights or args.model),
        "backend": args.backend,
        "input": str(args.input),
        "input_root": str(inputs.root),
        "score_thresh": predictor.score_thresh,
        "device": str(predictor.device),
        "batch_size": args.batch_size,
        "images": num_done,
        "detections": len(predictions),
        "seconds": round(seconds, 3),
        "images_per_second": round(num_done / max(seconds, 1e-9), 3),
        "skipped": skipped,
        "ignored": [inputs.relative(p).as_posix() for p in inputs.ignored],
        "outputs": written,
    }
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary, out))
    return 0


def build_predictor(args: argparse.Namespace):
    """A Predictor (--backend pytorch) or an ExportedPredictor: the same predict interface."""
    if args.backend == "pytorch":
        if not args.weights or args.model:
            raise ConfigError("--backend pytorch runs a checkpoint: give --weights CKPT (--model is for exported files)")
        from detkit.engine.predictor import Predictor

        return Predictor(args.weights, config=args.config, overrides=args.overrides, device=args.device,
                         score_thresh=args.score_thresh, batch_size=args.batch_size)
    if not args.model or args.weights or args.config or args.overrides:
        raise ConfigError(f"--backend {args.backend} runs an exported model: give --model FILE (written by "
                          "tools/export.py) and no --weights, --config or overrides (the file carries its config)")
    from detkit.export.runtime import ExportedPredictor

    return ExportedPredictor(args.model, backend=args.backend, score_thresh=args.score_thresh, batch_size=args.batch_size)


def format_summary(summary: dict, out: Path) -> str:
    images, dets = summary["images"], summary["detections"]
    lines = [
        f"images:     {images} processed, {len(summary['skipped'])} skipped, "
        f"{len(summary['ignored'])} non-image files ignored",
        f"detections: {dets} with score >= {summary['score_thresh']:g} ({dets / max(images, 1):.2f} per image)",
        f"speed:      {summary['images_per_second']:.2f} images/s ({summary['seconds']:.2f} s, "
        f"batch {summary['batch_size']}, {summary['device']})",
    ]
    for item in summary["skipped"]:
        lines.append(f"skipped:    {item['file_name']}: {item['reason']}")
    lines.append(f"written:    {len(summary['outputs'])} drawn images, {PREDICTIONS_NAME}, {SUMMARY_NAME} in {out}")
    return "\n".join(lines)


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
