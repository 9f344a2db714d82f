"""Detections over the frames of a video, camera or stream, in batches.

    for frame, dets in FrameDetector(predictor, batch_size=8).run(reader):   # every frame, in order
        ...   # dets: the frame's own detections when frame.process, else the last processed frame's

    for index, timestamp_ms, dets in predictor.predict_video("clip.mp4", every=5):  # processed frames only
        ...

The predictor is used only through `preprocessor` (run by the reader thread), `predict_preprocessed`
and `class_names`, so any object with that interface (an exported-model backend) works here too.

Batching with --every N: a batch runs as soon as it holds `batch_size` processed frames; the frames
between two of them wait for it (they show the earlier one's detections), so at most about
(batch_size - 1) * N + 1 frames are held, capped at `max_pending` (a batch then runs early).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from detkit.data.video import Frame, FrameReader, open_video, parse_source
from detkit.errors import ConfigError
from detkit.engine.predictor import Detections


def empty_detections() -> Detections:
    return Detections(boxes=np.zeros((0, 4), np.float32), scores=np.zeros((0,), np.float32),
                      labels=np.zeros((0,), np.int64), class_names=[])


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
        tic = time.perf_counter()
        results = self.predictor.predict_preprocessed([f.tensor for f in processed],
                                                      [f.image.shape[:2] for f in processed])
        self.model_seconds += time.perf_counter() - tic
        self.frames_processed += len(processed)
        by_index = {f.index: dets for f, dets in zip(processed, results)}
        for frame in pending:
            last = by_index.get(frame.index, last)
            yield frame, last
        return last


def iter_video_detections(predictor, source: Union[str, int, Path], *, every: int = 1,
                          batch_size: Optional[int] = None, start_s: float = 0.0, end_s: Optional[float] = None,
                          max_frames: Optional[int] = None, timeout_s: float = 10.0
                          ) -> Iterator[tuple[int, float, Detections]]:
    """(frame index, timestamp in ms, Detections) of every `every`-th frame of a video file, a
    camera index or a stream URL; see `Predictor.predict_video`."""
    spec = str(source)
    video = parse_source(spec)
    if video is None:  # a video file with an unusual extension: let OpenCV try it
        from detkit.data.video import VideoSource

        video = VideoSource(spec=spec, kind="file", name=Path(spec).stem)
    capture, info = open_video(video, timeout_s=timeout_s)  # here, so a bad source fails at the call
    try:
        reader = FrameReader(capture, info, video, every=every, start_s=start_s, end_s=end_s,
                             max_frames=max_frames, retrieve_all=False, preprocess=predictor.preprocessor)
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
