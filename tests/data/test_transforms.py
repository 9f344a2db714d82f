"""Transforms keep boxes right: resize and flip against hand-computed boxes, YAML augmentations."""

import albumentations as A
import cv2
import numpy as np
import pytest

from detkit.config import load_config, replace
from detkit.data.transforms import (
    DetectionTransform,
    ResizeShortestEdge,
    build_augmentation,
    build_test_transform,
    build_train_transform,
    resized_hw,
)
from detkit.errors import ConfigError


def gradient_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=2).astype(np.uint8)


def cfg_with(**changes):
    return replace(load_config(None), **changes)


@pytest.mark.parametrize(
    "hw, short, max_size, expected",
    [
        ((480, 640), 800, 1333, (800, 1067)),  # 640 * 800 / 480 = 1066.67 -> 1067
        ((640, 480), 800, 1333, (1067, 800)),
        ((100, 2000), 800, 1333, (67, 1333)),  # capped: scale = 1333 / 2000, 100 * 0.6665 = 66.65 -> 67
        ((427, 640), 600, 1000, (600, 899)),  # 640 * 600 / 427 = 899.30 -> 899
        ((50, 60), 0, 1333, (50, 60)),  # short side 0: no resize
    ],
)
def test_resized_hw_follows_detectron2(hw, short, max_size, expected):
    assert resized_hw(*hw, short, max_size) == expected


def detectron2_output_shape(oldh, oldw, short_edge_length, max_size):
    """Detectron2's ResizeShortestEdge.get_output_shape, transcribed as an independent reference."""
    h, w = oldh, oldw
    size = short_edge_length * 1.0
    scale = size / min(h, w)
    if h < w:
        newh, neww = size, scale * w
    else:
        newh, neww = scale * h, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def test_resized_hw_equals_detectron2_on_every_size_up_to_1500_px():
    rng = np.random.default_rng(0)
    sizes = rng.integers(16, 1500, size=(4000, 2))
    for (h, w), short, max_size in zip(
        sizes, rng.choice([640, 672, 704, 736, 768, 800, 600], 4000), rng.choice([1333, 1000, 900], 4000)
    ):
        assert resized_hw(int(h), int(w), int(short), int(max_size)) == detectron2_output_shape(
            int(h), int(w), int(short), int(max_size)
        )


@pytest.mark.parametrize("hw, target", [((480, 640), (240, 320)), ((375, 500), (800, 1067)), ((101, 203), (67, 135))])
def test_pil_resize_method_is_pillows_bilinear_bit_for_bit(hw, target):
    from PIL import Image

    image = np.random.default_rng(1).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    tf = build_test_transform(
        cfg_with(**{"data.min_size_test": min(target), "data.max_size_test": 2000, "data.resize_method": "pil"})
    )
    out = tf(image).image
    expected = np.asarray(Image.fromarray(image).resize((target[1], target[0]), Image.BILINEAR))
    assert out.shape == (*target, 3) and out.dtype == np.uint8
    assert np.array_equal(out, expected)
    # ... and OpenCV's INTER_LINEAR (the default "cv2") is another image: the key matters.
    cv2_out = build_test_transform(cfg_with(**{"data.min_size_test": min(target), "data.max_size_test": 2000}))(
        image
    ).image
    assert np.array_equal(cv2_out, cv2.resize(image, (target[1], target[0]), interpolation=cv2.INTER_LINEAR))
    assert not np.array_equal(cv2_out, expected)


def test_pil_and_cv2_differ_by_about_a_grey_level_when_shrinking_by_two():
    from PIL import Image

    image = np.random.default_rng(2).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 2.0)  # a photo-like image, not pixel noise
    pil = np.asarray(Image.fromarray(image).resize((320, 240), Image.BILINEAR)).astype(int)
    ocv = cv2.resize(image, (320, 240), interpolation=cv2.INTER_LINEAR).astype(int)
    diff = np.abs(pil - ocv)
    assert 0.2 < diff.mean() < 3.0 and diff.max() >= 2


def test_resize_method_is_checked():
    with pytest.raises(ConfigError, match="resize_method"):
        load_config(None, ["data.resize_method=nearest"])


def test_detectron2_config_gives_detectron2_preprocessing():
    cfg = load_config("configs/frcnn_r101_detectron2.yaml")
    assert cfg.data.resize_method == "pil" and cfg.data.size_divisibility == 0
    assert cfg.test.amp == "off" and cfg.model.input_format == "BGR"


def test_test_transform_resizes_image_and_boxes():
    tf = build_test_transform(cfg_with(**{"data.min_size_test": 50, "data.max_size_test": 1000}))
    out = tf(gradient_image(100, 200), np.array([[10, 20, 50, 60], [0, 0, 200, 100]]), np.array([3, 1]))
    assert out.image.shape == (50, 100, 3)
    np.testing.assert_allclose(out.boxes, [[5, 10, 25, 30], [0, 0, 100, 50]], atol=1e-3)
    assert out.labels.tolist() == [3, 1]


def test_train_resize_then_flip_boxes_hand_computed_and_one_interpolation():
    cfg = cfg_with(**{"data.min_size_train": (200,), "data.max_size_train": 1000, "data.flip_prob": 1.0})
    image = gradient_image(100, 200)
    out = build_train_transform(cfg)(image, np.array([[10, 20, 50, 60]]), np.array([4]), seed=0)
    assert out.image.shape == (200, 400, 3)
    # resize x2: [20, 40, 100, 120]; flip in a 400 wide image: x -> 400 - x
    np.testing.assert_allclose(out.boxes, [[300, 40, 380, 120]], atol=1e-3)
    assert out.labels.tolist() == [4]
    # pixels: one cv2.resize, then a mirror; nothing interpolated twice
    expected = cv2.resize(image, (400, 200), interpolation=cv2.INTER_LINEAR)[:, ::-1]
    np.testing.assert_array_equal(out.image, expected)


def test_flip_only_is_exact_mirror_of_boxes():
    tf = DetectionTransform([A.HorizontalFlip(p=1.0)])
    out = tf(gradient_image(30, 50), np.array([[0, 0, 10, 30], [12.5, 3, 49, 7]]), np.array([0, 1]))
    np.testing.assert_allclose(out.boxes, [[40, 0, 50, 30], [1, 3, 37.5, 7]], atol=1e-3)


def test_short_side_is_drawn_per_image_from_the_list():
    cfg = cfg_with(**{"data.min_size_train": (32, 48, 64), "data.max_size_train": 1000, "data.flip_prob": 0.0})
    tf = build_train_transform(cfg)
    image = gradient_image(20, 30)
    shorts = {tf(image, seed=s).image.shape[0] for s in range(40)}
    assert shorts == {32, 48, 64}


def test_same_seed_same_augmentation():
    cfg = cfg_with(
        **{"data.augment": ({"name": "ColorJitter", "p": 1.0, "brightness": 0.5},), "data.min_size_train": (16, 24, 32)}
    )
    tf = build_train_transform(cfg)
    image, boxes = gradient_image(20, 30), np.array([[1, 2, 10, 12]])
    a, b, c = tf(image, boxes, [0], seed=7), tf(image, boxes, [0], seed=7), tf(image, boxes, [0], seed=8)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_augment_listed_in_yaml_by_name(tmp_path):
    path = tmp_path / "aug.yaml"
    path.write_text(
        "data:\n  augment:\n    - {name: ColorJitter, p: 1.0, brightness: [1.5, 1.5], contrast: 0, saturation: 0, hue: 0}\n  flip_prob: 0.0\n  min_size_train: [80]\n"
    )
    cfg = load_config(path)
    tf = build_train_transform(cfg)
    assert isinstance(tf.transforms[0], A.ColorJitter) and isinstance(tf.transforms[-1], ResizeShortestEdge)
    image = np.full((40, 60, 3), 100, np.uint8)
    out = tf(image, seed=1)
    assert out.image.shape == (80, 120, 3)
    assert abs(float(out.image.mean()) - 150) <= 1  # brightness x1.5


def test_unknown_augmentation_name_or_argument_is_a_config_error():
    with pytest.raises(ConfigError, match="Did you mean ColorJitter"):
        build_augmentation({"name": "ColourJitter"})
    with pytest.raises(ConfigError, match=r"no argument.*'brightnes'"):
        build_augmentation({"name": "ColorJitter", "brightnes": 0.2})
    with pytest.raises(ConfigError, match="cannot build ColorJitter"):
        build_augmentation({"name": "ColorJitter", "p": 3})
    nested = build_augmentation(
        {"name": "OneOf", "p": 1.0, "transforms": [{"name": "Blur"}, {"name": "ToGray", "p": 1.0}]}
    )
    assert isinstance(nested, A.OneOf) and len(nested.transforms) == 2


def test_boxes_cropped_away_are_dropped_with_their_labels():
    tf = DetectionTransform([A.Crop(x_min=0, y_min=0, x_max=40, y_max=40, p=1.0), ResizeShortestEdge([80], 1000)])
    boxes = np.array([[5, 5, 15, 15], [50, 50, 60, 60], [30, 30, 50, 50]])
    out = tf(gradient_image(64, 64), boxes, np.array([0, 1, 2]))
    # box 2 lies outside the crop; box 3 is clipped to [30, 30, 40, 40]; then x2
    np.testing.assert_allclose(out.boxes, [[10, 10, 30, 30], [60, 60, 80, 80]], atol=1e-3)
    assert out.labels.tolist() == [0, 2]
    empty = tf(gradient_image(64, 64), np.array([[50, 50, 60, 60]]), np.array([1]))
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)


def test_no_boxes_at_all():
    out = build_train_transform(cfg_with(**{"data.min_size_train": (32,)}))(gradient_image(20, 30), seed=3)
    assert out.image.shape == (32, 48, 3) and out.boxes.shape == (0, 4) and out.labels.dtype == np.int64
