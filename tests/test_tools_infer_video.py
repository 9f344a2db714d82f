"""tools/infer.py on videos, cameras and streams: outputs, limits, bad input, Ctrl-C.

Clips are generated here (20 frames of 96 x 64 moving shapes at 10 fps, MJPG in .avi and mp4v in
.mp4); the model is a random tiny ResNet-18 (tests/conftest.py), run at score >= 0.05 so every
frame has detections. Most runs call the command line's main in this process (`run_cli`, exit
status and console as a user sees them); Ctrl-C is a real SIGINT to a subprocess.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from detkit.cli.common import run_cli
from detkit.cli.infer import main
from detkit.engine.predictor import Predictor
from detkit.utils.visualization import draw_detections

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def infer(capsys, tiny_checkpoint):
    """infer(*args) -> (exit status, stdout, stderr) of detkit-infer with the tiny checkpoint."""
    detkit_logger = logging.getLogger("detkit")

    def run(*args):
        # setup_logging adds a console handler only when there is none, bound to the sys.stdout of
        # that moment: give it none, so it binds to this test's capture, and put the old ones back.
        handlers = list(detkit_logger.handlers)
        detkit_logger.handlers[:] = []
        try:
            code = run_cli(
                main, ["--weights", str(tiny_checkpoint), "--device", "cpu", "--score-thresh", "0.05", *map(str, args)]
            )
        finally:
            detkit_logger.handlers[:] = handlers
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def video_props(path: Path) -> tuple[int, int, int, float]:
    """(frames decoded, width, height, fps) of a written video, read back with VideoCapture."""
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    size = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = capture.get(cv2.CAP_PROP_FPS)
    count = 0
    while capture.grab():
        count += 1
    capture.release()
    return count, size[0], size[1], fps


@pytest.mark.parametrize("name,codec", [("clip.avi", "MJPG"), ("clip.mp4", "mp4v")])
def test_a_video_gives_a_drawn_video_and_one_json_line_per_frame(
    infer, tmp_path, write_video, read_video, tiny_checkpoint, name, codec
):
    path = write_video(tmp_path / name, codec)
    out = tmp_path / "out"
    code, stdout, _ = infer("--input", path, "--output", out, "--batch-size", "4")

    assert code == 0
    lines = json_lines(out / "clip.jsonl")
    assert [line["frame"] for line in lines] == list(range(20))
    assert [line["timestamp_ms"] for line in lines] == pytest.approx([100.0 * k for k in range(20)])
    assert set(lines[0]) == {"frame", "timestamp_ms", "boxes", "scores", "labels", "class_names"}
    assert video_props(out / "clip.mp4") == (20, 96, 64, pytest.approx(10.0))
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["videos"]
    assert (entry["frames_read"], entry["frames_processed"], entry["frames_dropped"], entry["frames_written"]) == (
        20,
        20,
        0,
        20,
    )
    assert entry["stopped"] == "end of video" and entry["warning"] is None and entry["codec"] == "mp4v"
    assert entry["detections"] == sum(len(line["scores"]) for line in lines) > 100
    assert summary["outputs"] == ["clip.jsonl", "clip.mp4"]
    assert "video:      " + name + ": 20 frames read, 20 processed (every 1), 0 dropped, 20 written" in stdout
    assert "frames/s" in stdout and "stopped:    end of video (frames 0..19)" in stdout

    # The detections are the predictor's on the same frames, boxes in the frame's pixels.
    predictor = Predictor(tiny_checkpoint, device="cpu", score_thresh=0.05)
    for line, ref in zip(lines[::7], predictor.predict(read_video(path)[::7])):
        assert line["class_names"] == ref.class_names and line["labels"] == ref.labels.tolist()
        np.testing.assert_allclose(line["scores"], ref.scores, atol=2e-5)
        np.testing.assert_allclose(line["boxes"], ref.boxes, atol=2e-3)
        assert all(0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 64 for x1, y1, x2, y2 in line["boxes"])


def test_every_draws_the_last_detections_on_the_frames_between(infer, tmp_path, write_video, read_video):
    path = write_video(tmp_path / "clip.avi", "MJPG")
    out = tmp_path / "out"
    code, _, _ = infer("--input", path, "--output", out, "--every", "3", "--codec", "MJPG", "--batch-size", "2")

    assert code == 0
    lines = json_lines(out / "clip.jsonl")
    assert [line["frame"] for line in lines] == [0, 3, 6, 9, 12, 15, 18]
    written = read_video(out / "clip.avi")
    assert len(written) == 20
    source = read_video(path)
    by_frame = {line["frame"]: line for line in lines}
    for k in (4, 5, 13):
        shown = by_frame[k - k % 3]  # frames 4 and 5 show frame 3's detections, 13 shows 12's
        expected = draw_detections(
            source[k],
            np.array(shown["boxes"]),
            np.array(shown["labels"]),
            np.array(shown["scores"]),
            ["circle", "square", "triangle"],
        )
        error_to_expected = np.abs(written[k].astype(int) - expected).mean()
        error_to_undrawn = np.abs(written[k].astype(int) - source[k]).mean()
        assert error_to_expected < 0.5 * error_to_undrawn, k  # MJPG is lossy: not bit-equal


def test_max_frames_start_end_and_no_video(infer, tmp_path, write_video):
    path = write_video(tmp_path / "clip.mp4", "mp4v")
    code, _, _ = infer("--input", path, "--output", tmp_path / "a", "--every", "3", "--max-frames", "7", "--no-video")
    assert code == 0
    assert [line["frame"] for line in json_lines(tmp_path / "a" / "clip.jsonl")] == [0, 3, 6]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["clip.jsonl", "summary.json"]
    entry = json.loads((tmp_path / "a" / "summary.json").read_text())["videos"][0]
    assert (entry["frames_read"], entry["frames_processed"], entry["frames_written"], entry["video"]) == (7, 3, 0, None)
    assert entry["stopped"] == "--max-frames"

    code, _, _ = infer("--input", path, "--output", tmp_path / "b", "--start", "0.5", "--end", "1.2")
    assert code == 0
    lines = json_lines(tmp_path / "b" / "clip.jsonl")
    assert [line["frame"] for line in lines] == list(range(5, 12))
    assert [line["timestamp_ms"] for line in lines] == pytest.approx([500.0 + 100 * k for k in range(7)])
    assert video_props(tmp_path / "b" / "clip.mp4")[0] == 7


def test_a_truncated_video_keeps_the_frames_before_and_warns(infer, tmp_path, write_video, read_video):
    data = write_video(tmp_path / "full.avi", "MJPG").read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    decodable = len(read_video(cut))
    assert 3 <= decodable < 20

    code, stdout, _ = infer("--input", cut, "--output", tmp_path / "out", "--codec", "MJPG")

    assert code == 0
    assert [line["frame"] for line in json_lines(tmp_path / "out" / "cut.jsonl")] == list(range(decodable))
    assert video_props(tmp_path / "out" / "cut.avi")[0] == decodable
    entry = json.loads((tmp_path / "out" / "summary.json").read_text())["videos"][0]
    assert entry["stopped"] == f"truncated: no frame after {decodable - 1} (the header says 20 frames)"
    assert f"warning:    video {cut}: stopped after frame {decodable - 1} although the header says 20" in stdout


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_inputs_that_cannot_be_read_give_one_line_and_status_2(infer, tmp_path, write_video):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is a text file with a video's name\n")
    code, _, stderr = infer("--input", fake, "--output", tmp_path / "o1")
    assert code == 2 and f"cannot read video {fake}: OpenCV cannot open it" in one_error_line(stderr)
    assert not (tmp_path / "o1").exists()  # nothing written, not even the folder

    mp4 = write_video(tmp_path / "clip.mp4", "mp4v")
    (tmp_path / "half.mp4").write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    code, _, stderr = infer("--input", tmp_path / "half.mp4", "--output", tmp_path / "o2")
    assert code == 2 and "cut off before its index" in one_error_line(stderr)

    code, _, stderr = infer("--input", "99", "--output", tmp_path / "o3")
    assert code == 2 and "cannot read camera 99: no such camera" in one_error_line(stderr)

    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends
    tic = time.perf_counter()
    code, _, stderr = infer("--input", f"rtsp://127.0.0.1:{port}/live", "--output", tmp_path / "o4", "--timeout", "1")
    assert code == 2 and time.perf_counter() - tic < 10
    assert f"cannot read stream rtsp://127.0.0.1:{port}/live: no answer within 1 s" in one_error_line(stderr)

    code, _, stderr = infer("--input", mp4, "--output", tmp_path / "o5", "--codec", "XXXX")
    assert code == 2 and "--codec XXXX: this OpenCV build cannot write it" in one_error_line(stderr)


def test_a_folder_with_images_and_videos(infer, tmp_path, write_video, read_video):
    folder = tmp_path / "in"
    write_video(folder / "clip.avi", "MJPG", num_frames=6)
    write_video(folder / "clip.mp4", "mp4v", num_frames=4)  # same stem: outputs clip_avi.*, clip_mp4.*
    write_video(folder / "sub" / "deep.mkv", "MJPG", num_frames=3)
    cv2.imwrite(str(folder / "photo.png"), np.full((64, 64, 3), 128, np.uint8))
    (folder / "broken.mp4").write_text("not a video")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out"

    code, stdout, _ = infer("--input", folder, "--output", out, "--recursive")

    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 1 and summary["ignored"] == ["notes.txt"]
    assert [item["file_name"] for item in summary["skipped"]] == ["broken.mp4"]
    assert "OpenCV cannot open it" in summary["skipped"][0]["reason"]
    assert [(e["input"], e["frames_read"]) for e in summary["videos"]] == [
        ("clip.avi", 6),
        ("clip.mp4", 4),
        ("sub/deep.mkv", 3),
    ]
    assert summary["outputs"] == [
        "photo.png",
        "clip_avi.jsonl",
        "clip_avi.mp4",
        "clip_mp4.jsonl",
        "clip_mp4.mp4",
        "sub/deep.jsonl",
        "sub/deep.mp4",
    ]
    assert len(read_video(out / "sub" / "deep.mp4")) == 3 and len(json_lines(out / "clip_mp4.jsonl")) == 4
    assert "images:     1 processed, 1 skipped" in stdout and "skipped:    broken.mp4:" in stdout

    # --overwrite removes the videos and JSON lines of the previous run too.
    code, _, _ = infer("--input", folder / "clip.mp4", "--output", out, "--overwrite")
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["clip.jsonl", "clip.mp4", "summary.json"]


def test_an_error_after_the_first_frame_closes_the_outputs_and_says_where(tmp_path, write_video, tiny_checkpoint):
    from detkit.cli.infer_video import VideoOptions, run_video
    from detkit.data.video import parse_source

    predictor = Predictor(tiny_checkpoint, device="cpu", score_thresh=0.05)
    model_calls = []
    working = predictor.predict_preprocessed

    def fails_on_the_third_batch(tensors, sizes):
        model_calls.append(len(tensors))
        if len(model_calls) == 3:
            raise RuntimeError("simulated failure")
        return working(tensors, sizes)

    predictor.predict_preprocessed = fails_on_the_third_batch
    path = write_video(tmp_path / "clip.avi", "MJPG")
    result = run_video(
        parse_source(str(path)), tmp_path / "out", Path("clip"), predictor, VideoOptions(batch_size=4, codec="MJPG")
    )

    assert isinstance(result.error, RuntimeError) and model_calls == [4, 4, 4]
    assert result.entry["stopped"] == "error: RuntimeError: simulated failure after frame 7"
    assert result.outputs == ["clip.jsonl", "clip.avi"]
    assert [line["frame"] for line in json_lines(tmp_path / "out" / "clip.jsonl")] == list(range(8))
    assert video_props(tmp_path / "out" / "clip.avi")[0] == 8 == result.entry["frames_written"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip.avi", "clip.jsonl"]  # no temp files


def test_a_ctrl_c_while_a_frame_is_recorded_waits_for_the_frame():
    """deferred_interrupt: the frame goes into the JSON lines and the video, then Ctrl-C takes
    effect (CI once saw 7 JSON lines and 6 video frames when Ctrl-C fell between the two writes)."""
    import os

    from detkit.cli.infer_video import deferred_interrupt

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may ignore SIGINT
    try:
        written = []
        with pytest.raises(KeyboardInterrupt), deferred_interrupt():
            written.append("json line")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs between bytecodes: give it the chance
            written.append("video frame")
        assert written == ["json line", "video frame"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        with deferred_interrupt():  # no Ctrl-C: no exception
            written.append("next frame")
        # Where SIGINT is ignored the block runs as it is (and nothing is raised).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow  # ~10 s: a subprocess imports torch and runs until interrupted
def test_ctrl_c_leaves_a_playable_video_and_whole_json_lines(tmp_path, write_video, tiny_checkpoint):
    path = write_video(tmp_path / "long.avi", "MJPG", num_frames=600)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tools" / "infer.py"),
            "--weights",
            str(tiny_checkpoint),
            "--input",
            str(path),
            "--output",
            str(out),
            "--device",
            "cpu",
            "--score-thresh",
            "0.05",
            "--batch-size",
            "2",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A background job (nohup, CI runners) may start with SIGINT ignored, which the child would
        # inherit, and Python then installs no KeyboardInterrupt handler: give it Ctrl-C back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    partial = out / ".long.jsonl.partial"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_text().count("\n") >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130, stderr
    assert not partial.exists() and not (out / ".long.partial.mp4").exists()
    entry = json.loads((out / "summary.json").read_text())["videos"][0]
    assert entry["stopped"].startswith("interrupted (Ctrl-C) after frame")
    lines = json_lines(out / "long.jsonl")  # every line parses: no half-written line
    assert 6 <= len(lines) == entry["frames_processed"] < 600
    assert [line["frame"] for line in lines] == list(range(len(lines)))
    frames, width, height, _ = video_props(out / "long.mp4")
    assert frames == entry["frames_written"] >= len(lines) and (width, height) == (96, 64)
    assert "stopped:    interrupted (Ctrl-C)" in stdout
