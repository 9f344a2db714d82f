"""The upload checks of the detection service (detkit.serve.images), without a server."""

from __future__ import annotations

import struct
import time
import zlib

import cv2
import numpy as np
import pytest

from detkit.data.image_io import decode_image
from detkit.errors import RequestError
from detkit.serve.images import check_content_type, decode_upload, image_header


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data is a few bytes: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(ext: str, height: int = 48, width: int = 64) -> tuple[bytes, np.ndarray]:
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, rgb[:, :, ::-1])
    assert ok
    return buf.tobytes(), rgb


@pytest.mark.parametrize(("ext", "fmt"), [(".jpg", "JPEG"), (".png", "PNG"), (".webp", "WEBP")])
def test_accepted_formats_decode_as_detkit_infer_reads_them(ext, fmt):
    data, rgb = encoded(ext)
    assert image_header(data) == (fmt, 64, 48)
    image = decode_upload(data, max_pixels=64 * 48)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, decode_image(data, "RGB"))  # the same array as a file through infer
    if ext == ".png":  # lossless: the very pixels
        np.testing.assert_array_equal(image, rgb)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    bomb = png_header_only(100_000, 100_000)  # 10^10 pixels = 30 GB decoded, in 100 bytes
    assert len(bomb) < 200
    tic = time.perf_counter()
    with pytest.raises(RequestError) as info:
        decode_upload(bomb, max_pixels=40_000_000)
    assert time.perf_counter() - tic < 0.5  # never decoded
    assert info.value.status == 413 and "10000000000 pixels" in info.value.reason
    with pytest.raises(RequestError) as info:
        decode_upload(png_header_only(10_000, 5_000), max_pixels=40_000_000)
    assert info.value.status == 413
    assert info.value.reason == (
        "the PNG is 10000 x 5000 = 50000000 pixels, over this server's limit of 40000000 (--max-pixels): "
        "send a smaller image"
    )
    data, _ = encoded(".jpg")
    with pytest.raises(RequestError, match="64 x 48 = 3072 pixels, over this server's limit of 3071") as info:
        decode_upload(data, max_pixels=3071)
    assert info.value.status == 413


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"", 400, "empty (0 bytes)"),
        (b"hello, this is text", 400, "not a readable JPEG, PNG or WebP image"),
        (encoded(".jpg")[0][:300], 400, "the JPEG is truncated or corrupt before its image size (300 bytes)"),
        (encoded(".jpg")[0][:-400], 400, "the JPEG is truncated (no end-of-image marker"),
        (encoded(".bmp")[0], 415, "BMP images are not accepted"),
    ],
    ids=["empty", "text", "jpeg-cut-in-header", "jpeg-cut-in-scan", "bmp"],
)
def test_bad_uploads_raise_one_line_with_status(data, status, words):
    with pytest.raises(RequestError) as info:
        decode_upload(data, max_pixels=10**8)
    assert info.value.status == status
    assert words in info.value.reason and "\n" not in info.value.reason


def test_content_types():
    for ok in ("image/jpeg", "image/png; charset=binary", "IMAGE/WEBP", "application/octet-stream", "", None):
        check_content_type(ok)
    check_content_type("application/x-www-form-urlencoded")  # curl --data-binary without -H
    for bad in ("text/plain", "application/json"):
        with pytest.raises(RequestError, match=f"Content-Type '{bad}' is not an image") as info:
            check_content_type(bad)
        assert info.value.status == 415
