"""Detections drawn on images: a box, the class name and the score, one colour per class.

    from detkit.utils.visualization import draw_detections
    drawn = draw_detections(image_rgb, boxes_xyxy, labels, scores, class_names)   # new (H, W, 3) array

Colours are RGB tuples; `class_color(k)` is fixed per class index (golden-ratio hue steps, so
neighbouring classes get far-apart hues) and the same in every image and run. Line width and text
size scale with the image so small and large images both stay readable.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import cv2
import numpy as np

_GOLDEN_RATIO = 0.618033988749895


def class_color(index: int) -> tuple[int, int, int]:
    """RGB colour (0..255) of class `index`: distinct, saturated and the same every time."""
    hue = (0.1 + index * _GOLDEN_RATIO) % 1.0
    # Alternate the brightness a little so classes with close hues still differ.
    value = 0.95 if index % 2 == 0 else 0.75
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray | Sequence[int],
    scores: np.ndarray | Sequence[float] | None,
    class_names: Sequence[str],
    line_width: int | None = None,
    font_scale: float | None = None,
) -> np.ndarray:
    """Draw detections on a copy of `image`.

    image: (H, W, 3) uint8 (any channel order: colours are given in the same order as `class_color`,
    i.e. RGB; pass an RGB image). boxes: (D, 4) xyxy pixels; labels: (D,) class indices into
    `class_names`; scores: (D,) or None (no score text). Higher-scoring boxes are drawn last (on top).
    Returns a new (H, W, 3) uint8 array.
    """
    canvas = np.ascontiguousarray(image.copy())
    height, width = canvas.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if line_width is None:
        line_width = max(1, round(min(height, width) / 200))
    if font_scale is None:
        font_scale = float(np.clip(min(height, width) / 900, 0.35, 1.2))
    font = cv2.FONT_HERSHEY_SIMPLEX
    text_thickness = max(1, line_width // 2)
    order = np.argsort(scores, kind="stable") if scores is not None else np.arange(len(boxes))
    for i in order:
        label = int(labels[i])
        color = class_color(label)
        x1, y1, x2, y2 = (round(float(v)) for v in boxes[i])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, line_width, lineType=cv2.LINE_AA)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = name if scores is None else f"{name} {float(scores[i]):.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(text, font, font_scale, text_thickness)
        # The label sits above the box, or inside it when the box touches the top edge.
        top = y1 - text_h - baseline - 2 if y1 - text_h - baseline - 2 >= 0 else y1
        left = min(max(x1, 0), max(width - text_w - 2, 0))
        cv2.rectangle(canvas, (left, top), (left + text_w + 2, top + text_h + baseline + 2), color, cv2.FILLED)
        cv2.putText(
            canvas,
            text,
            (left + 1, top + text_h + 1),
            font,
            font_scale,
            _text_color(color),
            text_thickness,
            lineType=cv2.LINE_AA,
        )
    return canvas
