"""Batch-invariant inference: an image's detections in any batch equal its detections alone.

"Alone" is a batch of that one image, padded only to the model's size divisibility. Three batch
compositions (images of one size; mixed sizes; a tiny image beside a large one), on a tiny R18 and
on an R101-C4 with Detectron2's layout (BGR, MSRA statistics, stride in the 1x1 convs, no padding
to a multiple), both calibrated as the benchmarks calibrate random weights (realistic RPN and box
scores). Each image of a batch runs on its own input at test time, so its detections are its
detections alone bit for bit (docs/numerics.md, "Batch-invariant inference"); with
`test.batch_invariant` false the same batches move them by far more than 1e-4 in score or 1e-3 px.

Shapes: D detections of one image.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from detkit.benchmark.calibration import calibrate_
from detkit.config import load_config
from detkit.modeling import build_model
from detkit.structures import ImageBatch

SCORE_TOL = 1e-4
BOX_TOL_PX = 1e-3

# (h, w) of the images of each batch composition; each image is compared with itself alone.
COMPOSITIONS = {
    "same_size": [(96, 128), (96, 128)],
    "mixed_sizes": [(150, 100), (64, 160), (100, 90)],
    "tiny_and_large": [(32, 40), (160, 160)],
}
# The same three kinds at most 128 px for the R101 (30x the R18's work per pixel).
SMALL_COMPOSITIONS = {
    "same_size": [(64, 96), (64, 96)],
    "mixed_sizes": [(100, 70), (48, 128), (80, 80)],
    "tiny_and_large": [(24, 32), (128, 128)],
}


def smooth_image(h: int, w: int, seed: int) -> torch.Tensor:
    """(3, h, w) uint8: low-frequency colour blobs plus pixel noise (realistic activations)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(h // 16, 2), max(w // 16, 2), generator=g)
    image = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (image * 200 + torch.rand(3, h, w, generator=g) * 55).clamp(0, 255).to(torch.uint8)


def calibrated_model(overrides: list[str]):
    torch.manual_seed(0)
    model = build_model(load_config(None, ["device=cpu", "model.backbone.weights=", *overrides]), load_weights=False)
    calibrate_(model, torch.stack([smooth_image(128, 128, seed) for seed in range(2)]))
    return model.eval()


@pytest.fixture(scope="module")
def r18():
    return calibrated_model(
        [
            "model.depth=18",
            "model.num_classes=5",
            "model.rpn.pre_nms_topk_test=300",
            "model.rpn.post_nms_topk_test=50",
            "model.roi_heads.pooler_resolution=4",
        ]
    )


@pytest.fixture(scope="module")
def r101_detectron2():
    """configs/frcnn_r101_detectron2.yaml's layout on a random, calibrated R101-C4 (80 classes)."""
    return calibrated_model(
        [
            "model.depth=101",
            "model.backbone.stride_in_1x1=true",
            "model.input_format=BGR",
            "model.pixel_mean=[103.53, 116.28, 123.675]",
            "model.pixel_std=[1.0, 1.0, 1.0]",
            "data.size_divisibility=0",
            "model.rpn.pre_nms_topk_test=300",
            "model.rpn.post_nms_topk_test=50",
            "model.roi_heads.pooler_resolution=4",
        ]
    )


def detect(model, images: list[torch.Tensor]) -> list[dict]:
    with torch.no_grad():
        return model(ImageBatch.from_tensors(images, model.size_divisibility))


def differences(alone: dict, batched: dict) -> dict:
    """Largest score / box difference between two detection lists of one image, matched in order
    (both are sorted by score), or count/label mismatches."""
    if len(alone["scores"]) != len(batched["scores"]):
        return {"count": (len(alone["scores"]), len(batched["scores"]))}
    if not torch.equal(alone["labels"], batched["labels"]):
        return {"labels": (alone["labels"] != batched["labels"]).sum().item()}
    return {
        "score": (alone["scores"] - batched["scores"]).abs().max().item() if len(alone["scores"]) else 0.0,
        "box_px": (alone["boxes"] - batched["boxes"]).abs().max().item() if len(alone["scores"]) else 0.0,
        "bit_identical": torch.equal(alone["scores"], batched["scores"])
        and torch.equal(alone["boxes"], batched["boxes"]),
    }


def within_tolerance(diff: dict) -> bool:
    return "score" in diff and diff["score"] <= SCORE_TOL and diff["box_px"] <= BOX_TOL_PX


def check_compositions(model, seed: int, compositions: dict[str, list[tuple[int, int]]]) -> None:
    for name, sizes in compositions.items():
        images = [smooth_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
        batched = detect(model, images)
        assert len(batched) == len(images)
        for i, image in enumerate(images):
            alone = detect(model, [image])[0]
            assert len(alone["scores"]) >= 5, (name, i)  # the comparison has detections to compare
            diff = differences(alone, batched[i])
            logging.getLogger(__name__).info(
                "%s image %d %s: %d detections, %s", name, i, sizes[i], len(alone["scores"]), diff
            )
            assert diff.get("bit_identical"), (name, i, sizes[i], diff)


def test_r18_detections_in_any_batch_equal_alone(r18):
    check_compositions(r18, seed=10, compositions=COMPOSITIONS)


@pytest.mark.slow
def test_r101_detectron2_layout_detections_in_any_batch_equal_alone(r101_detectron2):
    check_compositions(r101_detectron2, seed=20, compositions=SMALL_COMPOSITIONS)


def test_without_invariance_the_padding_changes_a_small_images_detections(r18):
    """The failure the invariant path removes (so the checks above can fail): a small image
    batched with a large one sees the large one's padding."""
    small, large = smooth_image(32, 40, 30), smooth_image(160, 160, 31)
    alone = detect(r18, [small])[0]
    r18.batch_invariant = False
    try:
        batched = detect(r18, [small, large])[0]
    finally:
        r18.batch_invariant = True
    assert not within_tolerance(differences(alone, batched))
    assert differences(alone, detect(r18, [small, large])[0]).get("bit_identical")


def test_own_sizes_are_the_sizes_each_image_is_padded_to_alone(r18, r101_detectron2):
    """Rounded up to the size divisibility (32 for the R18, 0 for Detectron2's C4 layout), at most
    the batch's padded size (an ImageBatch padded to less than the model's divisibility)."""
    sizes = torch.tensor([[96, 128], [60, 100], [33, 31]])
    assert r18.own_sizes(sizes, (96, 128)) == [(96, 128), (64, 128), (64, 32)]
    assert r18.own_sizes(sizes, (96, 120)) == [(96, 120), (64, 120), (64, 32)]
    assert r101_detectron2.own_sizes(sizes, (96, 128)) == [(96, 128), (60, 100), (33, 31)]
