"""Image files -> (H, W, 3) uint8 arrays in the model's channel order.

Decoding is OpenCV's, from the file's bytes (so a path with any characters works and a zero-byte
or truncated file is caught before the decoder sees it). What comes out is always 3-channel uint8:

    grayscale (H, W)            -> the gray value repeated in all three channels
    BGRA / RGBA (H, W, 4)       -> alpha dropped (as PIL's convert("RGB") does)
    16-bit (uint16)             -> scaled to 0..255 with round(v / 257), so 65535 -> 255
    float (TIFF, EXR)           -> values in [0, 1] scaled by 255, others clipped to 0..255
    JPEG with an EXIF rotation  -> rotated/flipped upright (OpenCV applies the orientation tag)

A file that cannot be decoded raises `ImageReadError(path, reason)`; the training loader catches it,
skips the image with a warning and counts it (see `detkit.data.loader`).
"""

from __future__ import annotations

import os
from typing import Literal

import cv2
import numpy as np

from detkit.errors import ImageReadError

PathLike = str | os.PathLike

# File name endings read as images by the tools (tools/infer.py inputs, int8 calibration folders).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# ANYDEPTH keeps 16-bit samples (IMREAD_COLOR would truncate them with >> 8 itself) and ANYCOLOR
# keeps grayscale as one channel; unlike IMREAD_UNCHANGED this combination still applies the EXIF
# orientation.
_DECODE_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_JPEG_SOS = b"\xff\xda"


def read_image(path: PathLike, input_format: Literal["RGB", "BGR"] = "RGB") -> np.ndarray:
    """Read an image file into an (H, W, 3) uint8 array with channels in `input_format` order.

    Raises ImageReadError naming the file when it is missing, empty, truncated or not an image.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageReadError(path, "the file does not exist") from None
    except OSError as exc:
        raise ImageReadError(path, f"the file cannot be opened ({exc.strerror or exc})") from None
    return decode_image(data, input_format=input_format, name=str(path))


def decode_image(data: bytes, input_format: Literal["RGB", "BGR"] = "RGB", name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, BMP, TIFF, WebP, ...) into (H, W, 3) uint8.

    `name` is only used in the error message.
    """
    if input_format not in ("RGB", "BGR"):
        raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
    if len(data) == 0:
        raise ImageReadError(name, "the file is empty (0 bytes)")
    if data[:2] == _JPEG_SOI and not _jpeg_is_complete(data):
        # OpenCV 4.x decodes a truncated JPEG into a half-grey image with only a libjpeg warning.
        raise ImageReadError(name, "the JPEG is truncated (no end-of-image marker after the last scan)")
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _DECODE_FLAGS)
    except cv2.error as exc:
        raise ImageReadError(name, f"OpenCV cannot decode it ({str(exc).strip().splitlines()[-1]})") from None
    if image is None or image.size == 0:
        head = data[:8]
        raise ImageReadError(
            name, f"not a readable image (corrupt, truncated or an unknown format; first bytes {head!r})"
        )
    return to_uint8_3ch(image, input_format=input_format)


def _jpeg_is_complete(data: bytes) -> bool:
    """True when an end-of-image marker follows the last start-of-scan marker.

    Inside entropy-coded data every 0xFF byte is followed by 0x00 or a restart marker, so 0xFFDA and
    0xFFD9 only occur as real markers; an EOI of an embedded EXIF thumbnail comes before the main
    image's scans and does not count. Trailing bytes after the EOI (some cameras add them) are fine.
    """
    return data.rfind(_JPEG_EOI) > data.rfind(_JPEG_SOS) >= 0


def to_uint8_3ch(image: np.ndarray, input_format: Literal["RGB", "BGR"] = "RGB") -> np.ndarray:
    """OpenCV-decoded array (H, W) / (H, W, 1|3|4), BGR(A) order, any depth -> (H, W, 3) uint8."""
    if image.dtype == np.uint16:
        # 65535 / 257 = 255 exactly; + 128 rounds to nearest
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        finite = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if finite.size and float(finite.max()) <= 1.0 else 1.0
        image = np.clip(finite * scale + 0.5, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)

    # cv2.cvtColor rather than numpy slicing: image[:, :, ::-1] copied contiguous is ~20x slower
    channels = 1 if image.ndim == 2 else image.shape[2]
    rgb = input_format == "RGB"
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB if rgb else cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if rgb else cv2.COLOR_BGRA2BGR)
    if channels != 3:
        raise ValueError(f"cannot convert an image with {channels} channels to 3 channels")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if rgb else np.ascontiguousarray(image)
