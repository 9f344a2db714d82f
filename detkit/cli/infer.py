"""`detkit infer` (also tools/infer.py, detkit-infer): detect objects in images and videos (a file, a
folder or a glob), a camera or a stream; draw them.

    detkit infer --weights output/model_final.pth --input photos/ --output out/ [--recursive]
    detkit infer --backend onnxruntime --model model.onnx --input photos/ --output out/
    detkit infer --weights output/model_final.pth --input clip.mp4 --output out/ [--every 5]
    detkit infer --weights output/model_final.pth --input 0 --output out/ --max-frames 300

Writes into --output:
  <same relative path as the input>   each image with boxes, class names and scores (a colour per class)
  predictions.json                    COCO results plus "file_name" (relative to the input root) and
                                      "category_name"; image_id is the image's 1-based index in the
                                      sorted input list
  <name>.mp4, <name>.jsonl             per video: the drawn video and one JSON line per processed frame
                                      (detkit/cli/infer_video.py)
  summary.json                        counts, images/s, frames read/processed/dropped and frames/s per
                                      video, where each video stopped, skipped and ignored files, the
                                      files written

Inputs: files with an image extension (.jpg .jpeg .png .bmp .tif .tiff .webp, any case) or a video
extension (.mp4 .avi .mkv .mov .webm ...); other files are ignored and counted. An image or video
that cannot be decoded is reported as skipped and the run goes on. A camera index (0) or a stream
URL (rtsp://, http://) is a single input, read until it ends, --max-frames or Ctrl-C; so is a single
video file, which exits with status 2 when it cannot be opened.

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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from detkit.cli.common import run_cli, setup_logging
from detkit.data.image_io import IMAGE_EXTENSIONS
from detkit.data.video import VIDEO_EXTENSIONS, VideoSource, is_video_name, parse_source
from detkit.errors import ConfigError, DataError, ImageReadError, VideoReadError

logger = logging.getLogger("detkit.cli.infer")

SUMMARY_NAME = "summary.json"
PREDICTIONS_NAME = "predictions.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit infer",
        description="Detect objects in images with a detkit checkpoint; write drawn images and predictions.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Writes into --output: the drawn images (same relative paths as the inputs), predictions.json\n"
        "(COCO results plus file_name and category_name), summary.json; per video <name>.mp4 and <name>.jsonl.\n\n"
        "examples:\n"
        "  detkit infer --weights output/shapes_r18/model_final.pth --input photos/ --output out/ --score-thresh 0.5\n"
        "  detkit infer --weights weights/frcnn_r101_c4_3x.pth --input clip.mp4 --output out_clip/ --every 5\n"
        "  detkit infer --backend onnxruntime --model model.onnx --input 'photos/*.jpg' --output out_onnx/\n"
        "  detkit infer --backend pt2 --model model.pt2 --input photos/ --output out_pt2/",
    )
    parser.add_argument("--weights", help="detkit checkpoint (.pth); brings config and class names (--backend pytorch)")
    parser.add_argument(
        "--backend",
        choices=("pytorch", "onnxruntime", "openvino", "pt2", "aoti", "torchscript"),
        metavar="{pytorch,onnxruntime,openvino,pt2,aoti}",
        default="pytorch",
        help="pytorch: the checkpoint in --weights; onnxruntime / openvino / pt2 / aoti: the file in --model "
        'written by detkit export (README, Export; openvino reads the .onnx file, pip install "detkit[openvino]"); '
        "torchscript was retired (export with --format pt2)",
    )
    parser.add_argument(
        "--model", help="exported model (.onnx, .pt2) for --backend onnxruntime / openvino (.onnx) / pt2 / aoti (.pt2)"
    )
    parser.add_argument(
        "--input",
        required=True,
        help="an image or video file, a folder, a glob such as 'photos/*.jpg', a camera index (0) "
        "or a stream URL (rtsp://..., http://...)",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="folder for the drawn images and videos, predictions.json, <video>.jsonl, summary.json",
    )
    parser.add_argument("--config", help="YAML config replacing the checkpoint's (e.g. another test size)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.min_size_test=600")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring >= this (0.5)")
    parser.add_argument("--batch-size", type=int, default=8, help="images or video frames per forward pass (8)")
    parser.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when a GPU is visible"
    )
    parser.add_argument("--recursive", action="store_true", help="also look in sub-folders (and let ** match in globs)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the outputs of a previous detkit-infer run in --output"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="image decoding processes (0: in this process); a video is decoded in one thread",
    )
    video = parser.add_argument_group("videos, cameras and streams")
    video.add_argument(
        "--every",
        type=int,
        default=1,
        help="run the model on every N-th frame; the frames between show the last detections (1)",
    )
    video.add_argument("--max-frames", type=int, help="stop after reading this many frames of each video")
    video.add_argument("--start", type=float, default=0.0, help="first second of each video to read (0)")
    video.add_argument("--end", type=float, help="stop at this second of each video")
    video.add_argument("--no-video", action="store_true", help="write only <name>.jsonl, no drawn video")
    video.add_argument(
        "--codec",
        help="four-character code of the drawn video (default: avc1 if this OpenCV can "
        "write it, else mp4v; MJPG writes .avi)",
    )
    video.add_argument(
        "--timeout", type=float, default=10.0, help="seconds a stream may take to answer or to deliver a frame (10)"
    )
    return parser


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


@dataclass
class InputSet:
    """root: the folder that relative output paths start from; images, videos: sorted files;
    ignored: files with neither extension; live: the camera or stream when --input names one;
    single: --input named one file, camera or stream (not a folder or glob)."""

    root: Path
    images: list[Path]
    ignored: list[Path] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)
    live: VideoSource | None = None
    single: bool = False

    def relative(self, path: Path) -> Path:
        return path.relative_to(self.root)

    def video_stems(self) -> list[Path]:
        """Output path (relative, no extension) of each video: its own, or <stem>_<ext> when two
        videos of one folder share a stem (clip.avi and clip.mp4 would both write clip.jsonl)."""
        rels = [self.relative(p) for p in self.videos]
        counts = Counter(rel.with_suffix("") for rel in rels)
        return [
            rel.with_suffix("") if counts[rel.with_suffix("")] == 1 else rel.with_name(f"{rel.stem}_{rel.suffix[1:]}")
            for rel in rels
        ]


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def collect_inputs(spec: str, recursive: bool = False) -> InputSet:
    """Expand --input (a file, a folder, a glob, a camera index or a stream URL) into inputs;
    DataError when there are none."""
    source = parse_source(spec)
    if source is not None and source.live and not (source.kind == "camera" and Path(spec).exists()):
        return InputSet(root=Path("."), images=[], live=source, single=True)
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
            if not (_is_image_name(path) or is_video_name(path)):
                raise DataError(
                    f"--input {spec} is not an image or video file (extensions: "
                    f"{' '.join(IMAGE_EXTENSIONS)} {' '.join(VIDEO_EXTENSIONS)})"
                )
            root, files = path.parent, [path]
        elif source is not None:  # a video name that is not there
            raise VideoReadError(source.description, "no such file")
        else:
            raise DataError(f"--input {spec}: no such file or folder")
    files = sorted(files, key=lambda p: p.relative_to(root).as_posix())
    images = [p for p in files if _is_image_name(p)]
    videos = [p for p in files if is_video_name(p)]
    ignored = [p for p in files if not (_is_image_name(p) or is_video_name(p))]
    if not images and not videos:
        hint = "" if recursive else "; add --recursive to look in sub-folders"
        raise DataError(
            f"--input {spec}: no image files or videos ({len(ignored)} other files; image extensions are "
            f"{' '.join(IMAGE_EXTENSIONS)}, video extensions {' '.join(VIDEO_EXTENSIONS)}){hint}"
        )
    return InputSet(
        root=root,
        images=images,
        ignored=ignored,
        videos=videos,
        single=not glob.has_magic(spec) and Path(spec).is_file(),
    )


def prepare_output_dir(output: Path, inputs: InputSet, recursive: bool, overwrite: bool) -> None:
    """Refuse outputs that would overwrite or mix with inputs or earlier results (module docstring)."""
    out = output.resolve()
    root = inputs.root.resolve()
    if inputs.live is not None:
        pass  # a camera or stream: no input folder to protect
    elif out == root:
        raise ConfigError(
            f"--output {output} is the input folder; the drawings would replace the images. Choose another folder"
        )
    if recursive and root in out.parents:
        raise ConfigError(
            f"--output {output} is inside the input folder {inputs.root} searched with --recursive; "
            "the drawings would become inputs of the next run. Choose a folder outside it"
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--output {output} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        count = sum(1 for _ in out.iterdir())
        raise ConfigError(
            f"--output {output} is not empty ({count} entries); choose a new folder, or pass "
            "--overwrite to replace the results of a previous detkit-infer run there"
        )
    _remove_previous_run(out)
    leftovers = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    if leftovers:
        shown = ", ".join(leftovers[:5]) + (", ..." if len(leftovers) > 5 else "")
        raise ConfigError(
            f"--output {output} holds {len(leftovers)} files that detkit-infer did not write "
            f"({shown}); --overwrite only replaces its own outputs. Choose another folder"
        )


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
        # The stub wants a Dataset, but any map-style object (__getitem__ + __len__) works, and
        # subclassing Dataset would import torch when the CLI starts.
        _ImageFiles(paths, preprocessor),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
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
    video_options = _video_options(args) if inputs.videos or inputs.live else None
    out = Path(args.output)
    prepare_output_dir(out, inputs, args.recursive, args.overwrite)

    predictor = build_predictor(args)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "weights": str(args.weights or args.model),
        "backend": args.backend,
        "input": str(args.input),
        "input_root": str(inputs.root),
        "score_thresh": predictor.score_thresh,
        "device": str(predictor.device),
        "batch_size": args.batch_size,
        "images": 0,
        "detections": 0,
        "seconds": 0.0,
        "images_per_second": 0.0,
        "videos": [],
        "skipped": [],
        "ignored": [inputs.relative(p).as_posix() for p in inputs.ignored],
        "outputs": [],
    }
    try:
        if inputs.images:
            _run_images(inputs, out, predictor, args, summary)
        status = _run_videos(inputs, out, predictor, video_options, summary) if video_options else 0
    except BaseException:
        # After Ctrl-C or an error, summary.json still lists what was written (so --overwrite can
        # remove it); a run that wrote nothing (a video that cannot be opened) leaves nothing.
        if summary["outputs"] or summary["videos"]:
            _write_json_atomic(out / SUMMARY_NAME, summary)
            print(format_summary(summary, out))
        elif created and not any(out.iterdir()):
            out.rmdir()
        raise
    _write_json_atomic(out / SUMMARY_NAME, summary)
    print(format_summary(summary, out))
    return status


def build_predictor(args: argparse.Namespace):
    """A Predictor (--backend pytorch) or an ExportedPredictor: the same predict interface."""
    if args.backend == "pytorch":
        if not args.weights or args.model:
            raise ConfigError(
                "--backend pytorch runs a checkpoint: give --weights CKPT (--model is for exported files)"
            )
        from detkit.engine.predictor import Predictor

        return Predictor(
            args.weights,
            config=args.config,
            overrides=args.overrides,
            device=args.device,
            score_thresh=args.score_thresh,
            batch_size=args.batch_size,
        )
    if not args.model or args.weights or args.config or args.overrides:
        raise ConfigError(
            f"--backend {args.backend} runs an exported model: give --model FILE (written by "
            "tools/export.py) and no --weights, --config or overrides (the file carries its config)"
        )
    from detkit.export.runtime import ExportedPredictor

    return ExportedPredictor(
        args.model, backend=args.backend, score_thresh=args.score_thresh, batch_size=args.batch_size
    )


def _video_options(args):
    from detkit.cli.infer_video import VideoOptions
    from detkit.data.video import can_write, check_codec_name, default_codec

    if args.every < 1:
        raise ConfigError(f"--every {args.every}: must be at least 1")
    if args.max_frames is not None and args.max_frames < 1:
        raise ConfigError(f"--max-frames {args.max_frames}: must be at least 1")
    if args.start < 0 or (args.end is not None and args.end <= args.start):
        raise ConfigError(f"--start {args.start:g} --end {args.end}: need 0 <= start < end (seconds)")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout}: must be > 0 seconds")
    codec = None
    if not args.no_video:
        codec = check_codec_name(args.codec) if args.codec else default_codec()
        if args.codec and not can_write(codec):
            raise ConfigError(
                f"--codec {codec}: this OpenCV build cannot write it (the default here is "
                f"{default_codec()}; MJPG in .avi always works)"
            )
    return VideoOptions(
        every=args.every,
        max_frames=args.max_frames,
        start_s=args.start,
        end_s=args.end,
        timeout_s=args.timeout,
        batch_size=args.batch_size,
        codec=codec,
    )


def _run_images(inputs: InputSet, out: Path, predictor, args, summary: dict) -> None:
    """Detect on the images of `inputs`: drawn images, predictions.json; counts into `summary`."""
    import cv2
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from detkit.engine.evaluator import dump_predictions
    from detkit.utils.visualization import draw_detections

    loader = _build_loader(inputs.images, predictor.preprocessor, args.batch_size, args.workers)
    predictions: list[dict] = []
    written, skipped = summary["outputs"], summary["skipped"]
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
                    [item[2] for item in readable], [item[1].shape[:2] for item in readable]
                )
                for (index, image, _, _), dets in zip(readable, detections):
                    rel_path = inputs.relative(inputs.images[index])
                    for pred in dets.to_coco(index + 1, predictor.category_ids):
                        predictions.append({"image_id": pred.pop("image_id"), "file_name": rel_path.as_posix(), **pred})
                    drawn = draw_detections(image, dets.boxes, dets.labels, dets.scores, predictor.class_names)
                    target = out / rel_path  # mirrors the input tree, same format
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if not cv2.imwrite(str(target), drawn[:, :, ::-1]):  # RGB -> BGR for OpenCV
                        skipped.append({"file_name": rel_path.as_posix(), "reason": f"cannot write {target}"})
                        continue
                    written.append(rel_path.as_posix())
                    num_done += 1
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    dump_predictions(predictions, out / PREDICTIONS_NAME)
    summary.update(
        images=num_done,
        detections=len(predictions),
        seconds=round(seconds, 3),
        images_per_second=round(num_done / max(seconds, 1e-9), 3),
    )


def _run_videos(inputs: InputSet, out: Path, predictor, options, summary: dict) -> int:
    """Detect on each video (or the camera / stream) of `inputs`; 130 after Ctrl-C, else 0.

    One that cannot be read is skipped and listed, or, when it is the only input, raised.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    from detkit.cli.infer_video import run_video

    if inputs.live is not None:
        jobs = [(inputs.live, Path(inputs.live.name))]
    else:
        jobs = [
            (VideoSource(spec=str(path), kind="file", name=path.stem), stem)
            for path, stem in zip(inputs.videos, inputs.video_stems())
        ]
    with logging_redirect_tqdm(loggers=[logging.getLogger("detkit")]):
        for source, stem in jobs:
            try:
                result = run_video(source, out, stem, predictor, options)
            except VideoReadError as exc:
                if inputs.single:
                    raise
                rel = inputs.relative(Path(source.spec)).as_posix()
                summary["skipped"].append({"file_name": rel, "reason": exc.reason})
                logger.warning("skipped %s: %s", source.spec, exc.reason)
                continue
            if source.kind == "file":
                result.entry["input"] = inputs.relative(Path(source.spec)).as_posix()
            summary["videos"].append(result.entry)
            summary["outputs"] += result.outputs
            if result.error is not None:
                raise result.error
            if result.interrupted:
                return 130
    return 0


def _write_json_atomic(path: Path, data: dict) -> None:
    from detkit.utils.files import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def format_summary(summary: dict, out: Path) -> str:
    from detkit.cli.infer_video import format_video_lines

    images, dets = summary["images"], summary["detections"]
    videos = summary["videos"]
    lines = []
    if images or not videos:
        lines += [
            f"images:     {images} processed, {len(summary['skipped'])} skipped, "
            f"{len(summary['ignored'])} non-image files ignored",
            f"detections: {dets} with score >= {summary['score_thresh']:g} ({dets / max(images, 1):.2f} per image)",
            f"speed:      {summary['images_per_second']:.2f} images/s ({summary['seconds']:.2f} s, "
            f"batch {summary['batch_size']}, {summary['device']})",
        ]
    for entry in videos:
        lines += format_video_lines(entry)
    if videos and not images and (summary["skipped"] or summary["ignored"]):
        lines.append(f"skipped:    {len(summary['skipped'])} inputs, {len(summary['ignored'])} other files ignored")
    for item in summary["skipped"]:
        lines.append(f"skipped:    {item['file_name']}: {item['reason']}")
    num_videos = sum(1 for e in videos if e["video"])
    written = [f"{images} drawn images, {PREDICTIONS_NAME}"] if images or not videos else []
    if videos:
        written.append(f"{num_videos} drawn videos, {len(videos)} JSON-lines files")
    lines.append(f"written:    {', '.join(written)}, {SUMMARY_NAME} in {out}")
    return "\n".join(lines)


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
