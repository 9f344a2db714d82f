"""Predictor: checkpoint loading, test-time resize, original-pixel boxes, batching; drawing.

The model is a randomly initialised ResNet-18 C4 (64 px inputs, few proposals): random weights
still give dozens of detections per image, which is all these geometry and bookkeeping tests need.
"""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
import torch

from detkit.config import config_to_dict, dump_config, load_config
from detkit.data.transforms import resized_hw
from detkit.engine.checkpoint import save_checkpoint
from detkit.engine.predictor import Detections, Predictor, Preprocessor
from detkit.errors import CheckpointError, ConfigError
from detkit.modeling import build_model
from detkit.structures.image_batch import ImageBatch
from detkit.utils.visualization import class_color, draw_detections

CLASS_NAMES = ["circle", "square", "triangle"]
CATEGORY_IDS = [3, 7, 9]  # original ids differ from the contiguous labels on purpose
TINY = [
    "device=cpu",
    "model.depth=18",
    "model.num_classes=3",
    "model.rpn.pre_nms_topk_test=100",
    "model.rpn.post_nms_topk_test=16",
    "model.roi_heads.pooler_resolution=4",
    "data.min_size_test=64",
    "data.max_size_test=96",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A contract-format checkpoint of a random tiny model: (path, model in eval mode, cfg)."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    model = build_model(cfg, load_weights=False).eval()
    path = tmp_path_factory.mktemp("predictor") / "model.pth"
    save_checkpoint(
        {
            "model": model.state_dict(),
            "config": config_to_dict(cfg),
            "class_names": CLASS_NAMES,
            "category_ids": CATEGORY_IDS,
            "iteration": 7,
        },
        path,
    )
    return path, model, cfg


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor(checkpoint[0], device="cpu")


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An RGB image with blobs (random noise would be a poor test of a resize)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def test_checkpoint_brings_config_class_names_and_ids(predictor):
    assert predictor.class_names == CLASS_NAMES
    assert predictor.category_ids == CATEGORY_IDS
    assert predictor.cfg.model.depth == 18 and predictor.cfg.data.min_size_test == 64
    assert predictor.iteration == 7
    assert predictor.amp_dtype is None  # fp32 on the CPU
    assert not predictor.model.training


def test_detections_equal_the_model_run_on_a_test_time_resized_image(predictor, checkpoint):
    _, model, _ = checkpoint
    image = smooth_image(96, 150)
    h, w = resized_hw(96, 150, 64, 96)  # short side 64, long side capped at 96 -> (61, 96)
    assert (h, w) == (61, 96)
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    with torch.no_grad():
        expected = model(ImageBatch.from_tensors([torch.from_numpy(resized).permute(2, 0, 1)], 32, [(96, 150)]))[0]
    keep = expected["scores"] >= 0.05
    order = torch.argsort(expected["scores"][keep], descending=True, stable=True)

    dets = predictor(image)

    assert len(dets) > 5
    np.testing.assert_allclose(dets.scores, expected["scores"][keep][order].numpy(), atol=1e-6)
    np.testing.assert_allclose(dets.boxes, expected["boxes"][keep][order].numpy(), atol=1e-4)
    assert dets.boxes[:, 2].max() > 100  # boxes are in the 150 px wide original, not the 96 px input
    assert (dets.boxes[:, [0, 2]] <= 150).all() and (dets.boxes[:, [1, 3]] <= 96).all()


def test_boxes_scale_with_the_original_image(predictor):
    """A 2x pixel-replicated image resizes back to exactly the same model input."""
    image = smooth_image(64, 80, seed=1)
    big = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
    small_dets, big_dets = predictor.predict([image, big])
    assert len(small_dets) > 5
    np.testing.assert_allclose(big_dets.scores, small_dets.scores, atol=1e-6)
    np.testing.assert_allclose(big_dets.boxes, small_dets.boxes * 2, atol=1e-3)


def test_batches_give_the_same_detections_as_single_images(checkpoint):
    # Originals of different sizes that all resize to 64x64, so the padding is the same either way.
    images = [smooth_image(64, 64, 2), smooth_image(128, 128, 3), smooth_image(96, 96, 4)]
    batched = Predictor(checkpoint[0], device="cpu", batch_size=2).predict(images)
    single = Predictor(checkpoint[0], device="cpu", batch_size=1).predict(images)
    assert len(batched) == 3
    for a, b, image in zip(batched, single, images):
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        assert a.boxes.max() <= image.shape[0]


def test_score_threshold_keeps_the_same_boxes_above_it(checkpoint, predictor):
    image = smooth_image(64, 64, 5)
    low = predictor(image)
    thresh = float(np.median(low.scores))
    high = Predictor(checkpoint[0], device="cpu", score_thresh=thresh)(image)
    assert 0 < len(high) < len(low)
    assert (high.scores >= thresh).all()
    above = low.scores >= thresh
    np.testing.assert_allclose(high.scores, low.scores[above], atol=1e-6)
    np.testing.assert_allclose(high.boxes, low.boxes[above], atol=1e-4)


def test_detections_carry_class_names_and_convert_to_coco_with_original_ids():
    dets = Detections(
        boxes=np.array([[10, 20, 50, 80], [0, 0, 5, 5]], np.float32),
        scores=np.array([0.9, 0.4], np.float32),
        labels=np.array([2, 0]),
        class_names=["triangle", "circle"],
    )
    assert dets.to_coco(5, CATEGORY_IDS) == [
        {
            "image_id": 5,
            "category_id": 9,
            "category_name": "triangle",
            "bbox": [10.0, 20.0, 40.0, 60.0],
            "score": pytest.approx(0.9),
        },
        {
            "image_id": 5,
            "category_id": 3,
            "category_name": "circle",
            "bbox": [0.0, 0.0, 5.0, 5.0],
            "score": pytest.approx(0.4),
        },
    ]


def test_predicted_class_names_match_labels(predictor):
    dets = predictor(smooth_image(64, 64, 6))
    assert dets.class_names == [CLASS_NAMES[k] for k in dets.labels]
    assert (np.diff(dets.scores) <= 0).all()  # best first


def test_overrides_and_config_files_replace_the_checkpoint_config(checkpoint, tmp_path):
    path, _, _ = checkpoint
    small = Predictor(path, device="cpu", overrides=["data.min_size_test=32", "data.max_size_test=48"])
    assert tuple(small.preprocess(smooth_image(64, 96)).shape) == (3, 32, 48)
    cfg_file = tmp_path / "cfg.yaml"
    dump_config(load_config(None, TINY + ["data.min_size_test=48"]), cfg_file)
    assert tuple(Predictor(path, config=cfg_file, device="cpu").preprocess(smooth_image(64, 64)).shape) == (3, 48, 48)
    with pytest.raises(CheckpointError, match=re.escape("has 3 classes but the config says model.num_classes=5")):
        Predictor(path, device="cpu", overrides=["model.num_classes=5"])
    with pytest.raises(CheckpointError, match="does not fit the model of this config"):
        Predictor(path, device="cpu", overrides=["model.depth=34"])
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'data.min_size'")):
        Predictor(path, device="cpu", overrides=["data.min_size=32"])


def test_a_bgr_model_gets_the_channels_swapped():
    rgb = Preprocessor(load_config(None, TINY))
    bgr = Preprocessor(load_config(None, TINY + ["model.input_format=BGR"]))
    image = smooth_image(64, 64, 7)
    assert torch.equal(bgr(image), rgb(image).flip(0))


def test_bad_checkpoints_and_images_are_clear_errors(checkpoint, tmp_path, predictor):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        Predictor(tmp_path / "missing.pth")
    torch.save({"model": {}}, tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="lacks config, class_names: it is not a detkit checkpoint"):
        Predictor(tmp_path / "bare.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape("junk.pth")):  # the wording is checkpoint.py's
        Predictor(tmp_path / "junk.pth")
    with pytest.raises(ConfigError, match=r"RGB \(H, W, 3\) uint8 images .* got a uint8 array of shape \(64, 64\)"):
        predictor(np.zeros((64, 64), np.uint8))


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def test_class_colors_are_fixed_and_distinct():
    colors = [class_color(k) for k in range(20)]
    assert colors == [class_color(k) for k in range(20)]
    for i in range(20):
        for j in range(i + 1, 20):
            assert sum(abs(a - b) for a, b in zip(colors[i], colors[j])) > 30, (i, j)


def test_draw_detections_draws_boxes_in_the_class_color_and_leaves_the_input_alone():
    image = np.full((120, 160, 3), 128, np.uint8)
    boxes = np.array([[20, 40, 80, 100], [100, 10, 150, 60]], np.float32)
    drawn = draw_detections(image, boxes, np.array([0, 2]), np.array([0.9, 0.6]), CLASS_NAMES, line_width=2)
    assert (image == 128).all()
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert tuple(drawn[70, 20]) == class_color(0)  # left edge of box 0, below its label
    assert tuple(drawn[60, 125]) == class_color(2)  # bottom edge of box 1
    assert tuple(drawn[70, 50]) == (128, 128, 128)  # inside box 0: untouched
    label_area = drawn[40 - 12 : 40, 20:60]  # the filled label above box 0
    assert (label_area == class_color(0)).all(axis=-1).mean() > 0.3
    assert np.array_equal(draw_detections(image, np.zeros((0, 4)), np.zeros(0), np.zeros(0), CLASS_NAMES), image)
