"""Batched detection over video frames (detkit/engine/video.py) and Predictor.predict_video.

FrameDetector is checked against a fake predictor that records its batches; predict_video against
the same tiny random model run frame by frame on the frames read back with plain OpenCV.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from detkit.data.video import Frame
from detkit.engine.predictor import Detections, Predictor
from detkit.engine.video import FrameDetector
from detkit.errors import VideoReadError


class RecordingPredictor:
    """Gives frame i one detection scored i / 1000; records the frame indices of each batch."""

    class_names: ClassVar[list[str]] = ["thing"]

    def __init__(self):
        self.batches: list[list[int]] = []

    def predict_preprocessed(self, tensors, original_sizes):
        assert all(size == (4, 6) for size in original_sizes)
        self.batches.append(list(tensors))
        return [
            Detections(
                boxes=np.zeros((1, 4), np.float32),
                scores=np.array([i / 1000], np.float32),
                labels=np.zeros(1, np.int64),
                class_names=["thing"],
            )
            for i in tensors
        ]


def frames(n: int, every: int) -> list[Frame]:
    image = np.zeros((4, 6, 3), np.uint8)
    return [
        Frame(
            index=i, timestamp_ms=100.0 * i, image=image, tensor=i if i % every == 0 else None, process=i % every == 0
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(
    "n,every,batch_size,max_pending", [(20, 1, 8, 256), (20, 3, 2, 256), (23, 4, 3, 256), (20, 5, 4, 7), (1, 1, 8, 256)]
)
def test_frame_detector_yields_every_frame_in_order_with_the_last_processed_detections(
    n, every, batch_size, max_pending
):
    predictor = RecordingPredictor()
    detector = FrameDetector(predictor, batch_size=batch_size, max_pending=max_pending)
    out = list(detector.run(frames(n, every)))

    assert [frame.index for frame, _ in out] == list(range(n))
    # Frame i shows the detections of the processed frame at or before it (a slow, obvious version).
    expected_source = [i - i % every for i in range(n)]
    assert [round(float(dets.scores[0]) * 1000) for _, dets in out] == expected_source
    processed = [i for i in range(n) if i % every == 0]
    assert [i for batch in predictor.batches for i in batch] == processed and detector.frames_processed == len(
        processed
    )
    assert all(len(batch) <= batch_size for batch in predictor.batches)
    if max_pending >= batch_size * every:  # batches are full except the last
        assert [len(b) for b in predictor.batches[:-1]] == [batch_size] * (len(predictor.batches) - 1)


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor(tiny_checkpoint, device="cpu", score_thresh=0.05, batch_size=4)


def test_predict_video_equals_the_predictor_on_each_frame(predictor, tmp_path, write_video, read_video):
    path = write_video(tmp_path / "clip.avi", "MJPG")
    expected = predictor.predict(read_video(path)[0::2])  # frames 0, 2, ..., 18, batched by 4

    results = list(predictor.predict_video(path, every=2, batch_size=3))

    assert [index for index, _, _ in results] == list(range(0, 20, 2))
    assert [ts for _, ts, _ in results] == pytest.approx([100.0 * i for i in range(0, 20, 2)])
    assert sum(len(dets) for _, _, dets in results) > 50
    for (_, _, dets), ref in zip(results, expected):
        assert dets.class_names == ref.class_names
        np.testing.assert_array_equal(dets.labels, ref.labels)
        np.testing.assert_allclose(dets.scores, ref.scores, atol=1e-5)
        np.testing.assert_allclose(dets.boxes, ref.boxes, atol=1e-3)


def test_predict_video_limits_and_errors(predictor, tmp_path, write_video):
    path = write_video(tmp_path / "clip.mp4", "mp4v")
    assert [i for i, _, _ in predictor.predict_video(str(path), max_frames=5)] == [0, 1, 2, 3, 4]
    assert [i for i, _, _ in predictor.predict_video(path, start_s=1.0, end_s=1.5, every=2)] == [10, 12, 14]
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    with pytest.raises(VideoReadError, match="OpenCV cannot open it"):
        predictor.predict_video(fake)  # raised at the call, not at the first frame
    with pytest.raises(VideoReadError, match="no such camera"):
        predictor.predict_video(99)
