"""Run a trained detector on images: load a checkpoint, resize as at test time, batch, detect.

    predictor = Predictor("output/model_final.pth", device="cuda", score_thresh=0.5)
    dets = predictor(read_image("street.jpg"))             # one RGB (H, W, 3) uint8 image
    dets.boxes, dets.scores, dets.labels, dets.class_names  # boxes xyxy in the image's own pixels
    many = predictor.predict([img1, img2, img3])            # batches of `batch_size`
    for index, timestamp_ms, dets in predictor.predict_video("clip.mp4", every=2):  # or 0 (camera), a URL
        ...

The checkpoint brings the model's config and class names, so a checkpoint alone is enough; a config
(file or `Config`) replaces the checkpoint's, and dotted overrides apply on top of either (e.g.
"data.min_size_test=600"). Images go in as RGB whatever the model's `input_format` (a BGR model gets
its channels swapped here). Inference runs in fp32 unless `test.amp` (or the `amp` argument) asks for
bf16/fp16 autocast, as Detectron2 evaluates in fp32.

Shapes: N images in a batch; D detections of one image; K classes.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from detkit.config import Config, config_from_dict, load_config, parse_override, replace
from detkit.errors import CheckpointError, ConfigError
from detkit.structures.image_batch import ImageBatch

if TYPE_CHECKING:  # cv2 is imported only when a video is read
    from detkit.data.video import Frame, FrameReader

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("model", "config", "class_names")


@dataclass
class Detections:
    """The detections of one image, best first.

    boxes: (D, 4) float32 xyxy in the original image's pixels; scores: (D,) float32;
    labels: (D,) int64 contiguous class index in [0, K); class_names: (D,) the labels' names.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int, category_ids: Sequence[int]) -> list[dict]:
        """COCO result dicts (bbox [x, y, w, h]) with the dataset's original category ids."""
        return [
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[label]),
                "category_name": name,
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": float(score),
            }
            for (x1, y1, x2, y2), score, label, name in zip(
                self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(), self.class_names
            )
        ]


def detections_from_arrays(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, score_thresh: float, class_names: Sequence[str]
) -> Detections:
    """The detections of one image scoring at least `score_thresh`, best first (stable).

    boxes (D, 4), scores (D,), labels (D,): a model's outputs (eager, ONNX Runtime, pt2 or aoti).
    """
    labels = labels.astype(np.int64)
    keep = np.flatnonzero(scores >= score_thresh)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return Detections(
        boxes=boxes[keep],
        scores=scores[keep],
        labels=labels[keep],
        class_names=[class_names[k] for k in labels[keep].tolist()],
    )


# --------------------------------------------------------------------------------------------
# Checkpoint -> model
# --------------------------------------------------------------------------------------------


def check_checkpoint(state: dict, source: str | Path) -> None:
    """Raise CheckpointError unless `state` is a detkit checkpoint usable for inference."""
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing == ["class_names"] and "converted_from" in state:  # written by detkit convert-weights --config
        origin = state["converted_from"]
        raise CheckpointError(
            f"{source} has no class names: it was converted from {origin.get('file') if isinstance(origin, dict) else origin} while the "
            "test annotation file of its --config could not be read. Convert it again with a --config whose data.test "
            "names the annotation file of the model's classes (a model of 80 classes gets COCO's names without one)"
        )
    if missing:
        raise CheckpointError(
            f"{source} lacks {', '.join(missing)}: it is not a detkit checkpoint (tools/train.py writes them; "
            "Detectron2 or torchvision weights go through model.weights in a config or tools/convert_weights.py)"
        )
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{source}: 'config' must be a dict (config_to_dict of the training config)")
    names = state["class_names"]
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{source}: 'class_names' must be a non-empty list of strings, got {names!r}")


def config_with_overrides(base: dict, overrides: Sequence[str]) -> Config:
    """`Config` from a plain dict (a checkpoint's config) plus dotted key=value overrides."""
    data = copy.deepcopy(base)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is a value, not a section")
        node[parts[-1]] = value
    return config_from_dict(data)


def build_model_from_checkpoint(state: dict, cfg: Config, device: torch.device, source: str = "checkpoint"):
    """The model of `cfg` with the checkpoint's weights, on `device`, in eval mode.

    Pretrained-weight paths in the config are not read (the checkpoint has every tensor). A state
    dict that does not fit (another depth, another number of classes) raises CheckpointError.
    """
    from detkit.modeling import build_model

    num_classes = len(state["class_names"])
    if cfg.model.num_classes != num_classes:
        raise CheckpointError(
            f"{source} has {num_classes} classes but the config says model.num_classes={cfg.model.num_classes}; "
            f"use the checkpoint's config or set model.num_classes={num_classes}"
        )
    model = build_model(cfg, load_weights=False)
    try:
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = " ".join(str(exc).split())[:400]
        raise CheckpointError(
            f"{source} does not fit the model of this config (model.depth={cfg.model.depth}?): {first}"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the model of this config (model.depth={cfg.model.depth}): "
            f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])}), "
            f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})"
        )
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# The predictor
# --------------------------------------------------------------------------------------------


class Preprocessor:
    """RGB (H, W, 3) uint8 image -> (3, h, w) uint8 tensor resized as at test time, in the model's
    channel order. Holds no model, so image-reading worker processes can carry it."""

    def __init__(self, cfg: Config):
        from detkit.data.transforms import build_test_transform

        self.transform = build_test_transform(cfg)
        self.bgr = cfg.model.input_format == "BGR"

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
            desc = (
                f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            )
            raise ConfigError(f"Predictor takes RGB (H, W, 3) uint8 images (detkit.data.read_image), got a {desc}")
        resized = self.transform(image).image  # (h, w, 3)
        if self.bgr:
            resized = resized[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)


class Predictor:
    """A checkpoint ready to detect objects in RGB images (see the module docstring).

    weights: a detkit checkpoint. config: a YAML path or a `Config` replacing the checkpoint's.
    overrides: dotted "key=value" strings applied on top. device: "auto" | "cpu" | "cuda" (or a
    torch.device). score_thresh: keep detections scoring at least this (None: the config's
    model.roi_heads.score_thresh). batch_size: images per forward pass. amp: "auto" | "bf16" |
    "fp16" | "off" (None: the config's test.amp, fp32 by default; "auto" is fp32 on the CPU).
    """

    def __init__(
        self,
        weights: str | Path,
        config: str | Path | Config | None = None,
        overrides: Sequence[str] = (),
        device: str | torch.device = "auto",
        score_thresh: float | None = None,
        batch_size: int = 8,
        amp: str | None = None,
    ):
        from detkit.engine.checkpoint import load_checkpoint
        from detkit.utils.env import resolve_device, select_amp

        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be at least 1")
        if score_thresh is not None and not 0.0 <= score_thresh <= 1.0:
            raise ConfigError(f"score_thresh={score_thresh}: must be in [0, 1]")
        state = load_checkpoint(weights)
        check_checkpoint(state, weights)
        if isinstance(config, Config):
            cfg = config_with_overrides(_config_dict(config), overrides) if overrides else config
        elif config is not None:
            cfg = load_config(config, overrides)
        else:
            cfg = config_with_overrides(state["config"], overrides)
        if score_thresh is not None:
            # Filtering before NMS keeps the same boxes as filtering after it (a box is only
            # suppressed by higher-scoring ones) and spares the NMS the low scores.
            cfg = replace(cfg, **{"model.roi_heads.score_thresh": float(score_thresh)})
        self.cfg: Config = cfg
        self.score_thresh = float(cfg.model.roi_heads.score_thresh)
        self.class_names: list[str] = list(state["class_names"])
        ids = state.get("category_ids")
        self.category_ids: list[int] = list(ids) if ids else list(range(1, len(self.class_names) + 1))
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.amp_dtype = select_amp(amp or cfg.test.amp, self.device, key="test.amp").dtype
        self.batch_size = batch_size
        self.model = build_model_from_checkpoint(state, cfg, self.device, source=str(weights))
        self.preprocessor = Preprocessor(cfg)
        self.iteration = int(state.get("iteration", 0))
        logger.info(
            "Loaded %s (iteration %d, %d classes, ResNet-%d) on %s, amp %s, score >= %.2f",
            weights,
            self.iteration,
            len(self.class_names),
            cfg.model.depth,
            self.device,
            {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype],
            self.score_thresh,
        )

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB (H, W, 3) uint8 -> (3, h, w) uint8 resized for the model, in its channel order."""
        return self.preprocessor(image)

    @torch.no_grad()
    def predict_preprocessed(
        self, tensors: Sequence[torch.Tensor], original_sizes: Sequence[Sequence[int]]
    ) -> list[Detections]:
        """One forward pass over (3, h_i, w_i) tensors from `preprocess`; original_sizes (N, 2) (h, w)."""
        batch = ImageBatch.from_tensors(list(tensors), self.cfg.data.size_divisibility, original_sizes)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.model(batch)
        # One device->host copy per tensor.
        return [
            detections_from_arrays(
                out["boxes"].float().cpu().numpy(),
                out["scores"].float().cpu().numpy(),
                out["labels"].cpu().numpy(),
                self.score_thresh,
                self.class_names,
            )
            for out in outputs
        ]

    def predict(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections of each RGB (H, W, 3) uint8 image, run in batches of `batch_size`."""
        results: list[Detections] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            tensors = [self.preprocess(image) for image in chunk]
            results += self.predict_preprocessed(tensors, [image.shape[:2] for image in chunk])
        return results

    def __call__(self, image: np.ndarray) -> Detections:
        return self.predict([image])[0]

    def predict_video(
        self,
        source: str | int | Path,
        *,
        every: int = 1,
        batch_size: int | None = None,
        start_s: float = 0.0,
        end_s: float | None = None,
        max_frames: int | None = None,
        timeout_s: float = 10.0,
    ) -> Iterator[tuple[int, float, Detections]]:
        """Yield (frame index, timestamp in ms, Detections) for every `every`-th frame of a video
        file, a camera index (0, "0") or a stream URL ("rtsp://...", "http://...").

        Frames are decoded and resized in a background thread while the model runs on batches of
        `batch_size` (default: the predictor's). start_s / end_s: only frames with start_s <=
        timestamp < end_s; max_frames: stop after reading this many frames (processed or not).
        Raises VideoReadError when the source cannot be opened (a stream: within timeout_s); a
        file that ends early just ends the iteration (see detkit.data.video).
        """
        return iter_video_detections(
            self,
            source,
            every=every,
            batch_size=batch_size,
            start_s=start_s,
            end_s=end_s,
            max_frames=max_frames,
            timeout_s=timeout_s,
        )


# --------------------------------------------------------------------------------------------
# Frames of a video, camera or stream, in batches (Predictor.predict_video, tools/infer.py's videos)
# --------------------------------------------------------------------------------------------
#
#     for frame, dets in FrameDetector(predictor, batch_size=8).run(reader):   # every frame, in order
#         ...   # dets: the frame's own detections when frame.process, else the last processed frame's
#
# Here and not in detkit.engine.video (which re-exports it) because Predictor.predict_video needs
# it: the video code depends on the predictor, never the other way round. The predictor is used
# only through `preprocessor` (run by the reader thread), `predict_preprocessed` and
# `class_names`, so any object with that interface (an exported-model backend) works too.
#
# Batching with --every N: a batch runs as soon as it holds `batch_size` processed frames; the
# frames between two of them wait for it (they show the earlier one's detections), so at most about
# (batch_size - 1) * N + 1 frames are held, capped at `max_pending` (a batch then runs early).


def empty_detections() -> Detections:
    """No detection: what a frame shows before the first processed one."""
    return Detections(
        boxes=np.zeros((0, 4), np.float32),
        scores=np.zeros((0,), np.float32),
        labels=np.zeros((0,), np.int64),
        class_names=[],
    )


class FrameDetector:
    """Runs `predictor` over the processed frames of a `FrameReader` in batches of `batch_size`.

    After `run`: frames_processed, model_seconds (in predict_preprocessed), waited_seconds (the
    time spent waiting for the reader: near 0 when the model is the bottleneck).
    """

    def __init__(self, predictor, *, batch_size: int = 8, max_pending: int = 256):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be at least 1")
        self.predictor = predictor
        self.batch_size = batch_size
        self.max_pending = max(max_pending, batch_size)
        self.frames_processed = 0
        self.model_seconds = 0.0
        self.waited_seconds = 0.0

    def run(self, frames: Iterable[Frame]) -> Iterator[tuple[Frame, Detections]]:
        """Yield (frame, detections) for every frame of `frames`, in order."""
        last = empty_detections()
        pending: list[Frame] = []  # starts with a processed frame whenever it is not empty
        num_processed = 0  # in pending
        iterator = iter(frames)
        while True:
            tic = time.perf_counter()
            frame = next(iterator, None)
            self.waited_seconds += time.perf_counter() - tic
            if frame is None:
                break
            if not frame.process and not pending:
                yield frame, last  # after a batch: shows that batch's last detections
                continue
            pending.append(frame)
            num_processed += frame.process
            if num_processed == self.batch_size or len(pending) >= self.max_pending:
                last = yield from self._flush(pending, last)
                pending, num_processed = [], 0
        if pending:
            yield from self._flush(pending, last)

    def _flush(self, pending: list[Frame], last: Detections):
        """Detect on the processed frames of `pending`, yield them all in order; return the last dets."""
        processed = [f for f in pending if f.process]
        sizes_hw = []
        for f in processed:
            assert f.image is not None  # FrameReader decodes every processed frame
            sizes_hw.append(f.image.shape[:2])
        tic = time.perf_counter()
        results = self.predictor.predict_preprocessed([f.tensor for f in processed], sizes_hw)
        self.model_seconds += time.perf_counter() - tic
        self.frames_processed += len(processed)
        by_index = {f.index: dets for f, dets in zip(processed, results)}
        for frame in pending:
            last = by_index.get(frame.index, last)
            yield frame, last
        return last


def iter_video_detections(
    predictor,
    source: str | int | Path,
    *,
    every: int = 1,
    batch_size: int | None = None,
    start_s: float = 0.0,
    end_s: float | None = None,
    max_frames: int | None = None,
    timeout_s: float = 10.0,
) -> Iterator[tuple[int, float, Detections]]:
    """(frame index, timestamp in ms, Detections) of every `every`-th frame of a video file, a
    camera index or a stream URL; see `Predictor.predict_video`."""
    from detkit.data.video import FrameReader, VideoSource, open_video, parse_source

    spec = str(source)
    video = parse_source(spec)
    if video is None:  # a video file with an unusual extension: let OpenCV try it
        video = VideoSource(spec=spec, kind="file", name=Path(spec).stem)
    capture, info = open_video(video, timeout_s=timeout_s)  # here, so a bad source fails at the call
    try:
        reader = FrameReader(
            capture,
            info,
            video,
            every=every,
            start_s=start_s,
            end_s=end_s,
            max_frames=max_frames,
            retrieve_all=False,
            preprocess=predictor.preprocessor,
        )
    except ConfigError:
        capture.release()
        raise
    detector = FrameDetector(predictor, batch_size=batch_size or predictor.batch_size)
    return _processed_only(reader, detector)


def _processed_only(reader: FrameReader, detector: FrameDetector) -> Iterator[tuple[int, float, Detections]]:
    with reader:
        for frame, dets in detector.run(reader):
            if frame.process:
                yield frame.index, frame.timestamp_ms, dets


def _config_dict(cfg: Config) -> dict:
    from detkit.config import config_to_dict

    return config_to_dict(cfg)
