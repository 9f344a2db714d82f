"""Uploaded bytes -> an RGB (H, W, 3) uint8 image, or a RequestError with the HTTP status and one line.

The checks run cheapest first, so a hostile upload costs as little as possible:

    0 bytes                                  -> 400
    more than max_bytes (checked by the app) -> 413
    a Content-Type that is not an image      -> 415 (text/plain, application/json; image/jpeg, image/png,
                                                image/webp, application/octet-stream, curl's default
                                                application/x-www-form-urlencoded or none are fine)
    not a JPEG, PNG or WebP by its header    -> 400 (unreadable) or 415 (another format: GIF, BMP, TIFF)
    width x height over max_pixels           -> 413, read from the header: the pixels are never decoded,
                                                so a small file that would decode to gigabytes (a
                                                decompression bomb) costs microseconds
    truncated or corrupt pixel data          -> 400 (detkit.data.decode_image's checks)

Decoding is `detkit.data.decode_image`, the one `detkit infer` uses for files, so a served image
is the same array as the same file read by `detkit infer`.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from detkit.errors import ImageReadError, RequestError

ACCEPTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Content types a raw body may declare. Only the bytes decide the format; these just must not say
# "this is not an image" (text/plain, application/json: a client sending the wrong thing).
# application/x-www-form-urlencoded is what `curl --data-binary @photo.jpg` sends without -H.
_IMAGE_CONTENT_TYPES = {
    "",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
    "image/jpeg",
    "image/jpg",
    "image/png",
    "image/webp",
}


def check_content_type(content_type: str | None) -> None:
    """415 unless `content_type` (a raw body's or an uploaded file's) can hold a JPEG, PNG or WebP."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in _IMAGE_CONTENT_TYPES:
        raise RequestError(
            415,
            f"Content-Type {media!r} is not an image: send JPEG, PNG or WebP bytes as image/jpeg, image/png, "
            "image/webp or application/octet-stream, or as a multipart/form-data file field named 'image'",
        )


def image_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) read from the header of `data` without decoding the pixels.

    RequestError 400 when the bytes are not a readable image, 415 when they are one of another format.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(400, "the body is empty (0 bytes): send the image's bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns (and over twice its own limit raises) on huge sizes; max_pixels decides here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:  # lazy: reads the header only
                fmt, (width, height) = header.format or "", header.size
    except Image.DecompressionBombError as exc:  # over twice PIL.Image.MAX_IMAGE_PIXELS (179 MP by default)
        raise RequestError(413, f"the image has too many pixels to decode ({exc}): send a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        if data[:2] == b"\xff\xd8":
            raise RequestError(
                400, f"the JPEG is truncated or corrupt before its image size ({len(data)} bytes)"
            ) from None
        raise RequestError(
            400, f"not a readable JPEG, PNG or WebP image ({len(data)} bytes, first bytes {data[:8]!r})"
        ) from None
    if fmt not in ACCEPTED_FORMATS:
        raise RequestError(415, f"{fmt or 'this'} images are not accepted: send JPEG, PNG or WebP")
    return fmt, width, height


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Check `data` (see the module docstring) and decode it into an RGB (H, W, 3) uint8 array."""
    from detkit.data.image_io import decode_image

    fmt, width, height = image_header(data)
    if width * height > max_pixels:
        raise RequestError(
            413,
            f"the {fmt} is {width} x {height} = {width * height} pixels, over this server's limit of "
            f"{max_pixels} (--max-pixels): send a smaller image",
        )
    if width < 1 or height < 1:
        raise RequestError(400, f"the {fmt} header says {width} x {height} pixels: nothing to detect in")
    try:
        return decode_image(data, "RGB", name=f"the uploaded {fmt}")
    except ImageReadError as exc:
        raise RequestError(400, str(exc)) from None
