"""Video files, cameras and streams -> frames; drawn frames -> a video file. OpenCV (FFmpeg) both ways.

    source = parse_source("clip.mp4")              # or "0" (camera index), "rtsp://host/path", "http://..."
    capture, info = open_video(source, timeout_s=10)   # VideoReadError naming the input when it cannot open
    reader = FrameReader(capture, info, source, every=5, preprocess=predictor.preprocessor)
    with reader:                                   # decoding (and the test-time resize) run in a thread
        for frame in reader:                       # Frame(index, timestamp_ms, image RGB, tensor, process)
            ...
    reader.stats.stop_reason                       # "end of video", "--max-frames", ..., or where it failed

    writer = VideoFileWriter(Path("out/clip.mp4"), fps=info.fps, size_wh=(w, h), codec=default_codec())
    writer.write(image_rgb); writer.close()        # written to a hidden temp file, renamed on close

Frame index and time: `index` counts frames from the start of the file (0-based), also after --start
seeks into it; `timestamp_ms` is index * 1000 / fps for files (the container's nominal rate), and the
wall-clock time since the first frame for cameras and streams, whose frame rate is not known.

Back-pressure: for a file the reader waits when its queue is full (no frame is lost); for a camera
or a stream, which cannot wait, a frame that finds the queue full is dropped and counted.

A truncated file: OpenCV's decoder simply stops at the first frame it cannot read, so the reader
compares the frames it got with the count in the container's header; stopping more than one frame
short (some containers estimate the count from the duration) is reported as a truncated file.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from detkit.errors import ConfigError, VideoReadError
from detkit.utils.files import AtomicOutput

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")
# The container each codec is written into; other four-character codes go into Matroska, which
# accepts nearly every codec FFmpeg can encode.
CODEC_EXTENSIONS = {
    "avc1": ".mp4",
    "H264": ".mp4",
    "hev1": ".mp4",
    "mp4v": ".mp4",
    "MJPG": ".avi",
    "XVID": ".avi",
    "DIVX": ".avi",
    "FMP4": ".avi",
    "VP80": ".webm",
    "VP90": ".webm",
}
# Probed in this order by `default_codec`: H.264 plays everywhere but most pip OpenCV builds cannot
# encode it; MPEG-4 part 2 in .mp4 and Motion-JPEG in .avi can always be written.
CODEC_PREFERENCE = ("avc1", "mp4v", "MJPG")
LIVE_FPS_FALLBACK = 30.0  # the written video's rate when a camera or stream does not report one

# FFmpeg's own log lines (a probe that fails, a truncated file) would tear the progress bar and the
# one-line errors; OpenCV reads this once, when it first loads FFmpeg. A user's setting wins.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


def is_video_name(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class VideoSource:
    """What --input names. kind: "file" | "camera" | "stream"; spec: as given (a path, "0", a URL);
    name: the stem of the output files ("clip", "camera0", "stream")."""

    spec: str
    kind: Literal["file", "camera", "stream"]
    name: str

    @property
    def live(self) -> bool:
        return self.kind != "file"

    @property
    def description(self) -> str:
        """For messages: 'video clip.mp4', 'camera 0', 'stream rtsp://host/x' (password hidden)."""
        if self.kind == "camera":
            return f"camera {self.spec}"
        if self.kind == "stream":
            return f"stream {_hide_password(self.spec)}"
        return f"video {self.spec}"


def parse_source(spec: str) -> VideoSource | None:
    """A VideoSource when `spec` is a camera index, a stream URL or a video file name, else None."""
    if spec.isdigit():
        return VideoSource(spec=spec, kind="camera", name=f"camera{int(spec)}")
    if "://" in spec:
        return VideoSource(spec=spec, kind="stream", name="stream")
    if is_video_name(Path(spec)):
        return VideoSource(spec=spec, kind="file", name=Path(spec).stem)
    return None


def _hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """width, height: the decoded frame size in pixels; fps: the container's or device's frame
    rate (0.0 when unknown); frame_count: frames in the file's header (None for cameras, streams
    and files that do not say)."""

    width: int
    height: int
    fps: float
    frame_count: int | None


class _QuietOpenCV:
    """Silences OpenCV's own warnings (a missing camera prints two) for the duration of a block."""

    def __enter__(self):
        self.level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

    def __exit__(self, *exc):
        cv2.utils.logging.setLogLevel(self.level)


def open_video(source: VideoSource, timeout_s: float = 10.0) -> tuple[cv2.VideoCapture, VideoInfo]:
    """Open `source` for reading; VideoReadError saying what to check when it cannot be opened.

    timeout_s bounds how long a stream may take to answer (FFmpeg's open and read timeouts).
    """
    if source.kind == "file":
        path = Path(source.spec)
        if not path.is_file():
            raise VideoReadError(source.description, "no such file")
        if path.stat().st_size == 0:
            raise VideoReadError(source.description, "the file is empty (0 bytes)")
    timeout_ms = int(max(timeout_s, 0.1) * 1000)
    with _QuietOpenCV():
        if source.kind == "camera":
            capture = cv2.VideoCapture(int(source.spec))
        else:
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
            capture = cv2.VideoCapture(source.spec, cv2.CAP_FFMPEG, params)
    if not capture.isOpened():
        raise VideoReadError(source.description, _open_hint(source, timeout_s))
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = float(capture.get(cv2.CAP_PROP_FPS))
    fps = fps if np.isfinite(fps) and 0 < fps < 1000 else 0.0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if source.kind == "file" else 0
    return capture, VideoInfo(width=width, height=height, fps=fps, frame_count=count if count > 0 else None)


def _open_hint(source: VideoSource, timeout_s: float) -> str:
    if source.kind == "camera":
        return (
            f"no such camera, or it is busy (check that /dev/video{int(source.spec)} exists and is "
            "readable: ls -l /dev/video*; camera indices start at 0)"
        )
    if source.kind == "stream":
        return (
            f"no answer within {timeout_s:g} s (check the address and port, that the server is up and "
            "reachable from here, or allow more time with --timeout)"
        )
    return (
        "OpenCV cannot open it: not a video, a container or codec this OpenCV build cannot read, or a "
        "file cut off before its index (check it plays, e.g. with ffprobe)"
    )


# --------------------------------------------------------------------------------------------
# Reading in a background thread
# --------------------------------------------------------------------------------------------


@dataclass
class Frame:
    """One decoded frame. index: 0-based position in the source; timestamp_ms: see the module
    docstring; image: RGB (H, W, 3) uint8, or None when neither processed nor wanted (retrieve_all
    off); tensor: `preprocess(image)` for processed frames, else None; process: every N-th frame."""

    index: int
    timestamp_ms: float
    image: np.ndarray | None
    tensor: Any
    process: bool


@dataclass
class ReaderStats:
    """frames_read: frames taken from the source (after --start); frames_dropped: of those, the
    live frames that found the queue full; decode_seconds: time in the reader thread spent decoding,
    converting and resizing; stop_reason: why reading ended; warning: a truncated file or a decode
    error (None when the source simply ended or a limit was reached)."""

    frames_read: int = 0
    frames_dropped: int = 0
    decode_seconds: float = 0.0
    first_index: int | None = None
    last_index: int | None = None
    stop_reason: str = "not started"
    warning: str | None = None


_END = object()


class FrameReader:
    """Decodes `capture` in a daemon thread into a bounded queue; iterate to get `Frame`s in order.

    every: frames 0, N, 2N, ... (counted from the first frame read) get process=True and a tensor.
    start_s / end_s: read frames with start_s <= timestamp < end_s (files seek to start_s).
    max_frames: stop after reading this many frames. retrieve_all: decode the images of frames
    that are not processed too (False with --no-video: they are only grabbed, which is cheaper).
    preprocess: RGB image -> model input, run in the thread for processed frames.
    queue_size: frames decoded ahead.
    """

    def __init__(
        self,
        capture: cv2.VideoCapture,
        info: VideoInfo,
        source: VideoSource,
        *,
        every: int = 1,
        start_s: float = 0.0,
        end_s: float | None = None,
        max_frames: int | None = None,
        retrieve_all: bool = True,
        preprocess: Callable[[np.ndarray], Any] | None = None,
        queue_size: int = 16,
    ):
        if every < 1:
            raise ConfigError(f"every={every}: must be at least 1")
        if max_frames is not None and max_frames < 1:
            raise ConfigError(f"max_frames={max_frames}: must be at least 1")
        if start_s < 0 or (end_s is not None and end_s <= start_s):
            raise ConfigError(f"start {start_s:g} s, end {end_s} s: need 0 <= start < end")
        self.capture, self.info, self.source = capture, info, source
        self.every, self.start_s, self.end_s, self.max_frames = every, start_s, end_s, max_frames
        self.retrieve_all, self.preprocess = retrieve_all, preprocess
        self.stats = ReaderStats()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="detkit-video-reader", daemon=True)
        self._started = False

    def expected_frames(self) -> int | None:
        """Frames this reader will deliver if the file is intact (None for live sources or no count)."""
        if self.source.live or self.info.frame_count is None:
            return None
        first = round(self.start_s * self.info.fps) if self.info.fps > 0 else 0
        last = self.info.frame_count
        if self.end_s is not None and self.info.fps > 0:
            last = min(last, int(np.ceil(self.end_s * self.info.fps - 1e-9)))
        total = max(last - first, 0)
        return min(total, self.max_frames) if self.max_frames is not None else total

    def start(self) -> FrameReader:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def __enter__(self) -> FrameReader:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        self.start()
        while True:
            item = self._queue.get()
            if item is _END:
                return
            yield item

    def close(self) -> None:
        """Stop the thread (emptying the queue so it is not blocked on it) and release the capture."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
        self.capture.release()

    # -- the thread --------------------------------------------------------------------------

    def _put(self, item) -> bool:
        """Queue `item`; False when it was dropped (live source, queue full) or the reader stops."""
        if self.source.live and item is not _END:
            try:
                self._queue.put_nowait(item)
                return True
            except queue.Full:
                return False
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        stats = self.stats
        try:
            self._read_frames()
        except Exception as exc:  # noqa: BLE001 - any decoder failure ends the video, not the program
            where = "before the first frame" if stats.last_index is None else f"after frame {stats.last_index}"
            stats.stop_reason = f"decode error {where}"
            stats.warning = f"{self.source.description}: reading stopped {where}: {type(exc).__name__}: {exc}"
        finally:
            if not self._stop.is_set():
                self._put(_END)  # waits for room: the consumer must see the end
            else:  # asked to stop: `close()` empties the queue, nobody may be reading
                try:
                    self._queue.put_nowait(_END)
                except queue.Full:
                    pass

    def _read_frames(self) -> None:
        stats, capture, fps = self.stats, self.capture, self.info.fps
        index = 0
        if not self.source.live and self.start_s > 0 and fps > 0:
            target = round(self.start_s * fps)
            if capture.set(cv2.CAP_PROP_POS_FRAMES, target):
                index = round(capture.get(cv2.CAP_PROP_POS_FRAMES))
        live_t0: float | None = None
        while True:
            if self._stop.is_set():
                stats.stop_reason = "stopped"
                return
            if self.max_frames is not None and stats.frames_read >= self.max_frames:
                stats.stop_reason = "--max-frames"
                return
            tic = time.perf_counter()
            if not capture.grab():
                stats.decode_seconds += time.perf_counter() - tic
                self._end_of_source(index)
                return
            if self.source.live or fps <= 0:
                now = time.monotonic()
                live_t0 = now if live_t0 is None else live_t0
                timestamp_ms = (
                    (now - live_t0) * 1000.0 if self.source.live else float(capture.get(cv2.CAP_PROP_POS_MSEC))
                )
            else:
                timestamp_ms = index * 1000.0 / fps
            if timestamp_ms < self.start_s * 1000.0:  # a file that could not seek, or a live source
                index += 1
                continue
            if self.end_s is not None and timestamp_ms >= self.end_s * 1000.0:
                stats.stop_reason = "--end"
                return
            process = stats.frames_read % self.every == 0
            image = tensor = None
            if process or self.retrieve_all:
                ok, bgr = capture.retrieve()
                if not ok or bgr is None:
                    stats.decode_seconds += time.perf_counter() - tic
                    self._end_of_source(index, failed_frame=True)
                    return
                image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                if process and self.preprocess is not None:
                    tensor = self.preprocess(image)
            stats.decode_seconds += time.perf_counter() - tic
            stats.frames_read += 1
            stats.first_index = index if stats.first_index is None else stats.first_index
            stats.last_index = index
            if not self._put(
                Frame(index=index, timestamp_ms=timestamp_ms, image=image, tensor=tensor, process=process)
            ):
                stats.frames_dropped += 1
            index += 1

    def _end_of_source(self, index: int, failed_frame: bool = False) -> None:
        """Record why the source ended at frame `index`: its end, a truncated file or a decode error."""
        stats = self.stats
        count = self.info.frame_count
        if failed_frame:
            stats.stop_reason = f"frame {index} could not be decoded"
            stats.warning = f"{self.source.description}: frame {index} could not be decoded; stopped there"
        elif self.source.live:
            stats.stop_reason = "end of stream"
        elif count is not None and index < count - 1:
            stats.stop_reason = f"truncated: no frame after {index - 1} (the header says {count} frames)"
            stats.warning = (
                f"{self.source.description}: stopped after frame {index - 1} although the header "
                f"says {count} frames: the file is truncated or its next frame cannot be decoded"
            )
        else:
            stats.stop_reason = "end of video"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def codec_extension(codec: str) -> str:
    """The file extension a video in `codec` (a four-character code) is written with."""
    return CODEC_EXTENSIONS.get(codec, ".mkv")


def check_codec_name(codec: str) -> str:
    if len(codec) != 4:
        raise ConfigError(f"--codec {codec!r}: a four-character code such as mp4v, MJPG, avc1 or XVID")
    return codec


def can_write(codec: str) -> bool:
    """Whether this OpenCV build can encode `codec` into its container (a 2-frame trial file)."""
    check_codec_name(codec)
    with tempfile.TemporaryDirectory(prefix="detkit-codec-") as tmp, _QuietOpenCV():
        path = os.path.join(tmp, "probe" + codec_extension(codec))
        writer = cv2.VideoWriter(path, cv2.VideoWriter.fourcc(*codec), 10.0, (64, 48))
        ok = writer.isOpened()
        if ok:
            for value in (0, 255):
                writer.write(np.full((48, 64, 3), value, np.uint8))
        writer.release()
        return ok and os.path.getsize(path) > 0


@functools.cache
def default_codec() -> str:
    """The first of CODEC_PREFERENCE this build can write (mp4v on the pip opencv-python wheels)."""
    for codec in CODEC_PREFERENCE:
        if can_write(codec):
            return codec
    raise ConfigError(
        f"this OpenCV build can write none of {', '.join(CODEC_PREFERENCE)}; "
        "pass --no-video, or --codec with one it can write"
    )


class VideoFileWriter:
    """Writes RGB frames into `path` through a hidden temp file in the same folder, renamed to
    `path` by `close()` (so an interrupted run leaves either nothing or a playable, finished file).

    fps: frames per second of the written file; size_wh: (width, height) of every frame (others
    are resized to it); codec: a four-character code this build can write.
    """

    def __init__(self, path: Path, *, fps: float, size_wh: tuple[int, int], codec: str):
        self.path = Path(path)
        self.size_wh = (int(size_wh[0]), int(size_wh[1]))
        # A fixed name (not a random one) so that a user can watch the video grow; the container is
        # chosen by the extension, so it stays last.
        self._output = AtomicOutput(self.path, temp_name=f".{self.path.stem}.partial{self.path.suffix}")
        self.temp_path = self._output.temp_path
        self._writer: cv2.VideoWriter | None  # None once closed
        with _QuietOpenCV():
            self._writer = cv2.VideoWriter(
                str(self.temp_path), cv2.VideoWriter.fourcc(*check_codec_name(codec)), float(fps), self.size_wh
            )
        if not self._writer.isOpened():
            self._output.discard()
            raise ConfigError(
                f"--codec {codec}: this OpenCV build cannot write it into {self.path.suffix} "
                f"(the default here is {default_codec()})"
            )
        self.frames_written = 0

    def write(self, image_rgb: np.ndarray) -> None:
        """image_rgb: (H, W, 3) uint8."""
        if self._writer is None:  # like a closed Python file
            raise ValueError(f"{self.path}: write() after close()")
        if (image_rgb.shape[1], image_rgb.shape[0]) != self.size_wh:  # a stream that changed resolution
            image_rgb = cv2.resize(image_rgb, self.size_wh, interpolation=cv2.INTER_AREA)
        self._writer.write(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
        self.frames_written += 1

    def close(self) -> None:
        """Finish the file (the container's index is written here) and move it into place."""
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        self._output.commit()


@dataclass
class JsonLinesWriter:
    """Text lines into `path` through a hidden temp file, flushed on demand, renamed on close."""

    path: Path
    lines_written: int = 0
    _file: Any = field(default=None, repr=False)

    def __post_init__(self):
        self.path = Path(self.path)
        self._output = AtomicOutput(
            self.path, temp_name=f".{self.path.name}.partial"
        )  # a fixed name: see VideoFileWriter
        self.temp_path = self._output.temp_path
        self._file = open(self.temp_path, "w", encoding="utf-8")  # noqa: SIM115 - open for the writer's lifetime, closed by close()

    def write(self, line: str) -> None:
        self._file.write(line + "\n")
        self.lines_written += 1

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        self._output.commit()
