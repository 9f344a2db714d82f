"""Video sources, the background frame reader and the writers (detkit/data/video.py), on clips
generated here with cv2.VideoWriter (20 frames of 96 x 64 at 10 fps)."""

from __future__ import annotations

import itertools
import socket
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from detkit.data.video import (
    FrameReader,
    JsonLinesWriter,
    VideoFileWriter,
    VideoSource,
    can_write,
    codec_extension,
    default_codec,
    open_video,
    parse_source,
)
from detkit.errors import ConfigError, VideoReadError


def file_source(path: Path) -> VideoSource:
    return VideoSource(spec=str(path), kind="file", name=path.stem)


def read(path: Path, **kwargs) -> tuple[list, FrameReader]:
    capture, info = open_video(file_source(path))
    reader = FrameReader(capture, info, file_source(path), **kwargs)
    with reader:
        frames = list(reader)
    return frames, reader


def test_parse_source_tells_cameras_streams_and_files_apart():
    assert parse_source("0") == VideoSource(spec="0", kind="camera", name="camera0")
    assert parse_source("rtsp://cam.local:554/live").kind == "stream"
    assert parse_source("http://user:secret@host:8080/v.mjpg").description == "stream http://user:***@host:8080/v.mjpg"
    assert parse_source("clips/Drive.MKV") == VideoSource(spec="clips/Drive.MKV", kind="file", name="Drive")
    assert parse_source("photo.jpg") is None


@pytest.mark.parametrize("name,codec", [("clip.avi", "MJPG"), ("clip.mp4", "mp4v")])
def test_reader_delivers_every_frame_with_index_timestamp_and_rgb_image(tmp_path, write_video, read_video, name, codec):
    path = write_video(tmp_path / name, codec)
    expected = read_video(path)
    frames, reader = read(path, preprocess=lambda image: image.shape)

    assert len(expected) == 20
    assert [f.index for f in frames] == list(range(20))
    assert [f.timestamp_ms for f in frames] == pytest.approx([100.0 * k for k in range(20)])
    assert all(f.process and f.tensor == (64, 96, 3) for f in frames)
    for frame, rgb in zip(frames, expected):
        np.testing.assert_array_equal(frame.image, rgb)
    assert reader.info.width == 96 and reader.info.height == 64 and reader.info.fps == 10.0
    assert reader.info.frame_count == 20 and reader.expected_frames() == 20
    assert reader.stats.frames_read == 20 and reader.stats.frames_dropped == 0
    assert reader.stats.stop_reason == "end of video" and reader.stats.warning is None


def test_every_marks_every_nth_frame_and_skips_decoding_the_others_when_asked(tmp_path, write_video):
    path = write_video(tmp_path / "clip.avi", "MJPG")
    frames, _ = read(path, every=3, retrieve_all=False, preprocess=lambda image: "tensor")
    assert [f.index for f in frames if f.process] == [0, 3, 6, 9, 12, 15, 18]
    assert all((f.image is not None) == f.process and (f.tensor == "tensor") == f.process for f in frames)
    assert len(frames) == 20


def test_max_frames_start_and_end_limit_the_frames_read(tmp_path, write_video):
    path = write_video(tmp_path / "clip.mp4", "mp4v")
    frames, reader = read(path, max_frames=7, every=3)
    assert [f.index for f in frames] == list(range(7)) and reader.stats.stop_reason == "--max-frames"
    assert [f.index for f in frames if f.process] == [0, 3, 6]

    frames, reader = read(path, start_s=0.5, end_s=1.2)  # 500 <= t < 1200 ms: frames 5..11
    assert [f.index for f in frames] == list(range(5, 12))
    assert [f.timestamp_ms for f in frames] == pytest.approx([500.0 + 100 * k for k in range(7)])
    assert reader.expected_frames() == 7 and reader.stats.stop_reason == "--end"
    assert frames[0].process and [f.index for f in frames if f.process] == [5, 6, 7, 8, 9, 10, 11]


def test_a_truncated_file_keeps_the_frames_before_and_says_where_it_stopped(tmp_path, write_video, read_video):
    path = write_video(tmp_path / "clip.avi", "MJPG")
    data = path.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    decodable = read_video(cut)
    assert 3 <= len(decodable) < 20

    frames, reader = read(cut)
    assert [f.index for f in frames] == list(range(len(decodable)))
    for frame, rgb in zip(frames, decodable):
        np.testing.assert_array_equal(frame.image, rgb)
    last = len(decodable) - 1
    assert reader.stats.stop_reason == f"truncated: no frame after {last} (the header says 20 frames)"
    assert f"stopped after frame {last} although the header says 20 frames" in reader.stats.warning


def test_unreadable_sources_raise_one_clear_error(tmp_path, write_video):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n")
    with pytest.raises(VideoReadError, match=r"cannot read video .*notes.mp4: OpenCV cannot open it"):
        open_video(file_source(fake))
    mp4 = write_video(tmp_path / "clip.mp4", "mp4v")
    half = tmp_path / "half.mp4"
    half.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])  # the index (moov) is at the end
    with pytest.raises(VideoReadError, match="cut off before its index"):
        open_video(file_source(half))
    (tmp_path / "empty.avi").write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty"):
        open_video(file_source(tmp_path / "empty.avi"))
    with pytest.raises(VideoReadError, match=r"cannot read camera 99: no such camera.*/dev/video99"):
        open_video(parse_source("99"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_stream_that_does_not_answer_fails_within_the_timeout():
    # A closed port: refused at once.
    tic = time.perf_counter()
    with pytest.raises(
        VideoReadError, match=r"cannot read stream http://127.0.0.1:\d+/live.mjpg: no answer within 1 s"
    ):
        open_video(parse_source(f"http://127.0.0.1:{free_port()}/live.mjpg"), timeout_s=1.0)
    assert time.perf_counter() - tic < 1.0
    # A server that accepts the connection but never answers: the timeout ends the wait.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        tic = time.perf_counter()
        with pytest.raises(VideoReadError, match="no answer within 1 s"):
            open_video(parse_source(f"http://127.0.0.1:{server.getsockname()[1]}/live.mjpg"), timeout_s=1.0)
        assert 0.9 < time.perf_counter() - tic < 4.0


def test_a_live_source_drops_frames_when_the_consumer_falls_behind(tmp_path, write_video):
    path = write_video(tmp_path / "clip.avi", "MJPG", num_frames=40)
    live = VideoSource(spec=str(path), kind="stream", name="stream")  # a file read as if it were live
    capture, info = open_video(live)
    reader = FrameReader(capture, info, live, queue_size=2)
    with reader:
        frames = []
        for frame in reader:
            frames.append(frame)
            time.sleep(0.02)  # a slow model
    stats = reader.stats
    assert stats.frames_read == 40 and stats.stop_reason == "end of stream"
    assert stats.frames_dropped > 0 and len(frames) == 40 - stats.frames_dropped
    assert [f.index for f in frames] == sorted(f.index for f in frames)
    assert frames[0].timestamp_ms == 0.0 and all(
        b.timestamp_ms >= a.timestamp_ms for a, b in itertools.pairwise(frames)
    )


def test_reader_rejects_bad_limits(tmp_path, write_video):
    path = write_video(tmp_path / "clip.avi", "MJPG", num_frames=2)
    capture, info = open_video(file_source(path))
    for kwargs in ({"every": 0}, {"max_frames": 0}, {"start_s": 2.0, "end_s": 1.0}):
        with pytest.raises(ConfigError):
            FrameReader(capture, info, file_source(path), **kwargs)
    capture.release()


def test_default_codec_is_one_this_build_writes_and_h264_is_probed(tmp_path):
    codec = default_codec()
    assert codec in ("avc1", "mp4v", "MJPG") and can_write(codec) and can_write("MJPG")
    assert codec_extension("mp4v") == ".mp4" and codec_extension("MJPG") == ".avi" and codec_extension("FFV1") == ".mkv"
    with pytest.raises(ConfigError, match="four-character"):
        can_write("h264x")


@pytest.mark.parametrize("codec", ["mp4v", "MJPG"])
def test_video_writer_writes_a_playable_file_only_on_close(tmp_path, read_video, codec):
    target = tmp_path / f"out{codec_extension(codec)}"
    writer = VideoFileWriter(target, fps=10.0, size_wh=(96, 64), codec=codec)
    frames = [np.full((64, 96, 3), 10 * k, np.uint8) for k in range(12)]
    for frame in frames[:-1]:
        writer.write(frame)
    writer.write(np.zeros((32, 48, 3), np.uint8))  # another size is resized to the first
    assert not target.exists() and writer.temp_path.exists()
    writer.close()
    assert target.exists() and not writer.temp_path.exists()
    back = read_video(target)
    assert len(back) == 12 and back[0].shape == (64, 96, 3)
    # Lossy codecs, but each frame's grey level survives (within 6 of 255), in order; the last is black.
    np.testing.assert_allclose([b.mean() for b in back], [10.0 * k for k in range(11)] + [0.0], atol=6.0)
    capture = cv2.VideoCapture(str(target))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    capture.release()


def test_video_writer_refuses_a_codec_it_cannot_write(tmp_path):
    with pytest.raises(ConfigError, match="--codec XXXX: this OpenCV build cannot write it"):
        VideoFileWriter(tmp_path / "x.mkv", fps=10.0, size_wh=(96, 64), codec="XXXX")
    assert list(tmp_path.iterdir()) == []


def test_json_lines_writer_renames_on_close(tmp_path):
    writer = JsonLinesWriter(tmp_path / "clip.jsonl")
    writer.write('{"frame": 0}')
    writer.flush()
    assert writer.temp_path.read_text() == '{"frame": 0}\n' and not (tmp_path / "clip.jsonl").exists()
    writer.close()
    assert (tmp_path / "clip.jsonl").read_text() == '{"frame": 0}\n' and writer.lines_written == 1
