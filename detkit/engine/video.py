"""Detections over the frames of a video, camera or stream, in batches.

    for frame, dets in FrameDetector(predictor, batch_size=8).run(reader):   # every frame, in order
        ...   # dets: the frame's own detections when frame.process, else the last processed frame's

    for index, timestamp_ms, dets in predictor.predict_video("clip.mp4", every=5):  # processed frames only
        ...

The code lives in detkit.engine.predictor (its section "Frames of a video, camera or stream"),
because `Predictor.predict_video` needs it and the import must go one way: video code depends on
the predictor, never the other way round. This module keeps the names where the video tools
import them.
"""

from __future__ import annotations

from detkit.engine.predictor import FrameDetector, empty_detections, iter_video_detections

__all__ = ["FrameDetector", "empty_detections", "iter_video_detections"]
