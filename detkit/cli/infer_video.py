"""The video part of detkit-infer: one video file, camera or stream -> a drawn video and JSON lines.

Writes, for a source named <name> (the file's stem, "camera0", "stream"):
  <name><ext>    every frame read, with the detections of the last processed frame drawn as on the
                 images (same size and frame rate; ext from the codec: mp4v/avc1 -> .mp4, MJPG -> .avi)
  <name>.jsonl   one line per processed frame, in order:
                 {"frame": 12, "timestamp_ms": 1200.0, "boxes": [[x1, y1, x2, y2], ...],
                  "scores": [...], "labels": [...], "class_names": [...]}
                 boxes in the frame's pixels (3 decimals), scores (5 decimals), labels 0-based.

Both go through hidden temp files renamed when the video ends, also on Ctrl-C or an error after
the first frame, so what is there is complete: a playable video and whole lines, and the same
frames in both (a Ctrl-C while a frame is being recorded takes effect once it is in both files).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from detkit.data.video import (
    LIVE_FPS_FALLBACK,
    FrameReader,
    JsonLinesWriter,
    VideoFileWriter,
    VideoSource,
    codec_extension,
    open_video,
)
from detkit.errors import VideoReadError

logger = logging.getLogger("detkit.cli.infer")


@dataclass(frozen=True)
class VideoOptions:
    """The command line's video flags: every, max_frames, start_s, end_s, timeout_s, batch_size;
    codec None = --no-video (JSON lines only)."""

    every: int = 1
    max_frames: int | None = None
    start_s: float = 0.0
    end_s: float | None = None
    timeout_s: float = 10.0
    batch_size: int = 8
    codec: str | None = "mp4v"


@dataclass
class VideoResult:
    """entry: the video's summary.json record; outputs: files written, relative to --output;
    interrupted: Ctrl-C stopped it; error: an exception raised after the first frame (the outputs
    are closed and listed; the caller re-raises it after writing the summary)."""

    entry: dict
    outputs: list[str]
    interrupted: bool = False
    error: BaseException | None = None


def json_line(frame_index: int, timestamp_ms: float, dets) -> str:
    """One line of <name>.jsonl for `dets` (a `Detections`)."""
    return json.dumps(
        {
            "frame": int(frame_index),
            "timestamp_ms": round(float(timestamp_ms), 3),
            "boxes": [[round(v, 3) for v in box] for box in dets.boxes.tolist()],
            "scores": [round(v, 5) for v in dets.scores.tolist()],
            "labels": dets.labels.tolist(),
            "class_names": list(dets.class_names),
        }
    )


@contextmanager
def deferred_interrupt():
    """A Ctrl-C inside the block raises KeyboardInterrupt when the block ends, not inside it, so
    what the block writes is written whole. Only where Python's own SIGINT handler is installed (in
    the main thread, SIGINT not ignored); elsewhere the block runs as it is."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def run_video(source: VideoSource, out: Path, stem: Path, predictor, options: VideoOptions) -> VideoResult:
    """Detect on `source`, writing <out>/<stem><ext> and <out>/<stem>.jsonl.

    Raises VideoReadError when the source cannot be opened or yields no frame at all (nothing is
    left behind then); later failures end the video early and are reported in the result.
    """
    from tqdm import tqdm

    from detkit.engine.video import FrameDetector
    from detkit.utils.visualization import draw_detections

    capture, info = open_video(source, timeout_s=options.timeout_s)
    reader = FrameReader(
        capture,
        info,
        source,
        every=options.every,
        start_s=options.start_s,
        end_s=options.end_s,
        max_frames=options.max_frames,
        retrieve_all=options.codec is not None,
        preprocess=predictor.preprocessor,
    )
    detector = FrameDetector(predictor, batch_size=options.batch_size)
    jsonl_rel = stem.with_name(stem.name + ".jsonl")
    video_rel = stem.with_name(stem.name + codec_extension(options.codec)) if options.codec else None
    jsonl = JsonLinesWriter(out / jsonl_rel)
    writer: VideoFileWriter | None = None
    fps_out = info.fps if info.fps > 0 else LIVE_FPS_FALLBACK
    result = VideoResult(entry={}, outputs=[])
    num_detections, draw_seconds, stop_reason = 0, 0.0, None
    first_done = last_done = None  # frames fully handled (recorded and drawn); the reader may be ahead
    start = time.perf_counter()
    bar = tqdm(total=reader.expected_frames(), unit="frame", desc=source.name, dynamic_ncols=True, file=sys.stderr)
    try:
        with reader:
            for frame, dets in detector.run(reader):
                drawn = None
                if video_rel is not None:  # drawing records nothing yet: a Ctrl-C here drops the frame
                    assert frame.image is not None  # a video is written: the reader keeps every image
                    tic = time.perf_counter()
                    drawn = draw_detections(frame.image, dets.boxes, dets.labels, dets.scores, predictor.class_names)
                    draw_seconds += time.perf_counter() - tic
                with deferred_interrupt():  # the frame goes into both outputs, or into neither
                    if frame.process:
                        jsonl.write(json_line(frame.index, frame.timestamp_ms, dets))
                        jsonl.flush()  # a killed run still leaves whole lines in the temp file
                        num_detections += len(dets)
                    if drawn is not None:
                        tic = time.perf_counter()
                        if writer is None:  # the decoded size, which a stream may not announce
                            assert (
                                video_rel is not None and options.codec
                            )  # drawn is set only when --codec asks for a video
                            height, width = drawn.shape[:2]  # the size of frame.image
                            writer = VideoFileWriter(
                                out / video_rel, fps=fps_out, size_wh=(width, height), codec=options.codec
                            )
                        writer.write(drawn)
                        draw_seconds += time.perf_counter() - tic
                    first_done = frame.index if first_done is None else first_done
                    last_done = frame.index
                bar.update(1)
    except KeyboardInterrupt:
        result.interrupted = True
        stop_reason = "interrupted (Ctrl-C)"
    except Exception as exc:  # noqa: BLE001 - closed and reported below, re-raised by the caller
        result.error = exc
        stop_reason = f"error: {type(exc).__name__}: {exc}"
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        jsonl.close()
    seconds = time.perf_counter() - start
    stats = reader.stats

    if stats.frames_read == 0 and not result.interrupted:
        # Nothing to keep: the video opened but gave no frame (or none in --start..--end).
        (out / jsonl_rel).unlink(missing_ok=True)
        if result.error is not None:
            raise result.error
        window = "" if not (options.start_s or options.end_s) else " between --start and --end"
        raise VideoReadError(
            source.description,
            f"it opened, but no frame could be decoded{window} "
            f"({stats.stop_reason}); check that it plays, e.g. with ffprobe",
        )

    written_video_rel = video_rel if writer is not None else None
    result.outputs = [jsonl_rel.as_posix()] + ([written_video_rel.as_posix()] if written_video_rel is not None else [])
    stopped = stop_reason or stats.stop_reason
    if result.interrupted or result.error is not None:
        stopped += f" after frame {last_done}" if last_done is not None else " before the first frame"
    result.entry = {
        "input": source.spec,
        "kind": source.kind,
        "video": written_video_rel.as_posix() if written_video_rel is not None else None,
        "jsonl": jsonl_rel.as_posix(),
        "width": info.width,
        "height": info.height,
        "fps": round(info.fps, 3),
        "frame_count": info.frame_count,
        "codec": options.codec,
        "every": options.every,
        "frames_read": stats.frames_read,
        "frames_processed": jsonl.lines_written,  # = processed frames whose results were recorded
        "frames_dropped": stats.frames_dropped,
        "frames_written": writer.frames_written if writer is not None else 0,
        "first_frame": first_done,
        "last_frame": last_done,
        "detections": num_detections,
        "stopped": stopped,
        "warning": stats.warning,
        "seconds": round(seconds, 3),
        "frames_per_second": round(stats.frames_read / max(seconds, 1e-9), 3),
        "processed_per_second": round(jsonl.lines_written / max(seconds, 1e-9), 3),
        # Where the time went: decoding + resizing (reader thread), the model, drawing + encoding,
        # and how long the model side waited for decoded frames (~0: the model is the bottleneck).
        "timing": {
            "decode_s": round(stats.decode_seconds, 3),
            "model_s": round(detector.model_seconds, 3),
            "draw_write_s": round(draw_seconds, 3),
            "waited_for_decoder_s": round(detector.waited_seconds, 3),
        },
    }
    if stats.warning:
        logger.warning("%s", stats.warning)
    return result


def format_video_lines(entry: dict) -> list[str]:
    """The console summary of one video."""
    lines = [
        f"video:      {entry['input']}: {entry['frames_read']} frames read, {entry['frames_processed']} processed"
        f" (every {entry['every']}), {entry['frames_dropped']} dropped, {entry['frames_written']} written, "
        f"{entry['detections']} detections",
        f"speed:      {entry['frames_per_second']:.2f} frames/s read, {entry['processed_per_second']:.2f} frames/s "
        f"through the model ({entry['seconds']:.2f} s)",
        f"stopped:    {entry['stopped']} (frames {entry['first_frame']}..{entry['last_frame']})",
    ]
    if entry["warning"]:
        lines.append(f"warning:    {entry['warning']}")
    return lines
