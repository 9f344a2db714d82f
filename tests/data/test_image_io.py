"""read_image: EXIF orientation, grayscale/RGBA/16-bit conversion, channel order, bad files."""

import struct

import cv2
import numpy as np
import pytest

from detkit.data.image_io import decode_image, read_image
from detkit.errors import DataError, ImageReadError


def jpeg_with_orientation(image_bgr: np.ndarray, orientation: int) -> bytes:
    """A lossless-enough JPEG (quality 100) with an EXIF APP1 segment holding only the orientation tag."""
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    data = buf.tobytes()
    # TIFF header (big endian, IFD at offset 8), one IFD entry: tag 0x0112 SHORT x1 = orientation, no next IFD
    tiff = (
        b"MM\x00\x2a"
        + struct.pack(">I", 8)
        + struct.pack(">H", 1)
        + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
        + struct.pack(">I", 0)
    )
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + app1 + data[2:]  # right after SOI


def quadrant_image() -> np.ndarray:
    """(20, 40, 3) BGR: left half pure red, right half pure blue."""
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = (0, 0, 255)
    image[:, 20:] = (255, 0, 0)
    return image


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    path = tmp_path / "rot6.jpg"
    path.write_bytes(jpeg_with_orientation(quadrant_image(), 6))
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape == (20, 40, 3)  # stored landscape
    rgb = read_image(path)
    assert rgb.shape == (40, 20, 3)  # displayed portrait
    # orientation 6: turn 90 degrees clockwise, so the stored left (red) half becomes the top half
    top, bottom = rgb[:18].reshape(-1, 3).mean(0), rgb[22:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def test_exif_orientation_3_rotates_180(tmp_path):
    path = tmp_path / "rot3.jpg"
    path.write_bytes(jpeg_with_orientation(quadrant_image(), 3))
    rgb = read_image(path)
    assert rgb.shape == (20, 40, 3)
    left, right = rgb[:, :18].reshape(-1, 3).mean(0), rgb[:, 22:].reshape(-1, 3).mean(0)
    assert left[2] > 200 and left[0] < 50  # blue moved to the left
    assert right[0] > 200 and right[2] < 50


def test_rgb_and_bgr_channel_order(tmp_path):
    path = tmp_path / "c.png"
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 20, 30
    cv2.imwrite(str(path), bgr)
    assert read_image(path, "RGB")[0, 0].tolist() == [30, 20, 10]
    assert read_image(path, "BGR")[0, 0].tolist() == [10, 20, 30]
    out = read_image(path)
    assert out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "g.png"
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    cv2.imwrite(str(path), gray)
    out = read_image(path)
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_png_drops_alpha(tmp_path):
    path = tmp_path / "a.png"
    bgra = np.zeros((3, 3, 4), np.uint8)
    bgra[...] = (10, 20, 30, 40)  # B, G, R, A
    cv2.imwrite(str(path), bgra)
    out = read_image(path, "RGB")
    assert out.shape == (3, 3, 3)
    assert out[1, 1].tolist() == [30, 20, 10]


def test_16bit_png_scaled_to_uint8(tmp_path):
    gray_path, color_path = tmp_path / "g16.png", tmp_path / "c16.png"
    gray = np.array([[0, 257, 1000, 65535]], dtype=np.uint16)
    cv2.imwrite(str(gray_path), gray)
    out = read_image(gray_path)
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 4, 255]  # round(v / 257): 1000 / 257 = 3.89
    color = np.zeros((2, 2, 3), np.uint16)
    color[..., 2] = 65535  # red in BGR order
    color[..., 0] = 32896  # 128 * 257: blue
    cv2.imwrite(str(color_path), color)
    assert read_image(color_path, "RGB")[0, 0].tolist() == [255, 0, 128]


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"this is a text file, not an image\n", "not a readable image"),
        ("truncated_jpeg", "truncated"),
        ("truncated_png", "not a readable image"),
        ("corrupt_jpeg", ""),
    ],
)
def test_unreadable_file_raises_image_read_error_naming_it(tmp_path, content, reason):
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    if content == "truncated_jpeg":
        content = cv2.imencode(".jpg", noisy)[1].tobytes()[:-600]
    elif content == "truncated_png":
        content = cv2.imencode(".png", noisy)[1].tobytes()[:500]
    elif content == "corrupt_jpeg":
        good = bytearray(cv2.imencode(".jpg", noisy)[1].tobytes())
        good[2:200] = b"\x00" * 198  # headers (quantization/huffman tables) overwritten
        content = bytes(good)
    path = tmp_path / "bad file.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert reason in str(info.value)
    assert info.value.path == str(path)
    assert isinstance(info.value, DataError)


def test_missing_file_raises_image_read_error(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "nope.jpg")


def test_jpeg_with_bytes_after_end_marker_is_fine():
    image = quadrant_image()
    data = cv2.imencode(".jpg", image)[1].tobytes() + b"\x00" * 16
    assert decode_image(data, "BGR").shape == (20, 40, 3)
