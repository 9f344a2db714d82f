"""FasterRCNN end to end on a small ResNet-18 model: output format, input forms, rescaling, training
without boxes, and independence from the other images of a batch and from the padding."""

import pytest
import torch

from detkit.config import load_config, replace
from detkit.modeling import build_model
from detkit.structures import ImageBatch

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def model():
    """ResNet-18 C4 with few proposals and RoIs, so a forward pass takes well under a second."""
    torch.manual_seed(0)
    cfg = replace(
        load_config(),
        **{
            "model.depth": 18,
            "model.num_classes": NUM_CLASSES,
            "model.rpn.pre_nms_topk_train": 200,
            "model.rpn.post_nms_topk_train": 16,
            "model.rpn.pre_nms_topk_test": 200,
            "model.rpn.post_nms_topk_test": 12,
            "model.rpn.batch_size_per_image": 64,
            "model.roi_heads.batch_size_per_image": 16,
        },
    )
    return build_model(cfg)


def random_image(height, width, seed):
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def assert_same_detections(got, expected, atol=1e-4):
    assert got["labels"].tolist() == expected["labels"].tolist()
    torch.testing.assert_close(got["scores"], expected["scores"], rtol=0, atol=atol)
    torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=0, atol=atol)


def test_eval_output_format(model):
    model.eval()
    images = [random_image(64, 96, 0), random_image(80, 64, 1)]
    with torch.no_grad():
        outputs = model(images)
    assert isinstance(outputs, list) and len(outputs) == 2
    for out, image in zip(outputs, images):
        assert set(out) == {"boxes", "scores", "labels"}
        num = out["scores"].shape[0]
        assert 0 < num <= 100  # random heads score every class ~1/(K+1) > 0.05, so there are some
        assert out["boxes"].shape == (num, 4) and out["boxes"].dtype == torch.float32
        assert out["scores"].shape == (num,) and out["scores"].dtype == torch.float32
        assert out["labels"].shape == (num,) and out["labels"].dtype == torch.int64
        assert ((out["labels"] >= 0) & (out["labels"] < NUM_CLASSES)).all()
        assert (out["scores"] > 0.05).all() and (out["scores"][:-1] >= out["scores"][1:]).all()
        h, w = image.shape[1:]
        boxes = out["boxes"]
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()


def test_list_input_equals_image_batch_input(model):
    model.eval()
    images = [random_image(64, 96, 2), random_image(96, 64, 3)]
    with torch.no_grad():
        from_list = model(images)
        from_batch = model(ImageBatch.from_tensors(images, size_divisibility=32))
    for got, expected in zip(from_list, from_batch):
        assert_same_detections(got, expected, atol=0)


def test_detections_are_rescaled_to_original_sizes(model):
    model.eval()
    image = random_image(64, 96, 4)
    with torch.no_grad():
        (same,) = model(ImageBatch.from_tensors([image]))
        (doubled,) = model(ImageBatch.from_tensors([image], original_sizes=[(128, 192)]))
    assert same["scores"].numel() > 0
    torch.testing.assert_close(doubled["boxes"], 2 * same["boxes"])
    torch.testing.assert_close(doubled["scores"], same["scores"])
    assert doubled["labels"].tolist() == same["labels"].tolist()


def test_detections_do_not_depend_on_the_other_images_of_the_batch(model):
    """Image a alone vs next to a bigger image b, both padded to the same size (224 x 160): the
    per-image steps (RPN top-k and NMS, sampling, class-wise NMS, top-k) must not mix images.

    This is the padded batch of test.batch_invariant false (Detectron2's). Padded to a *different*
    size its outputs differ by design (as in Detectron2): convolutions near the border of the image
    see the activations of the padding, which are not zero after the first layer, so the res4 map
    near the border changes; the default, batch-invariant path runs each image on its own input
    instead (tests/modeling/test_batch_invariance.py)."""
    model.eval()
    a, b = random_image(96, 128, 5), random_image(200, 160, 6)
    batch = ImageBatch.from_tensors([a, b], size_divisibility=32)
    assert batch.tensor.shape[-2:] == (224, 160)
    alone = ImageBatch(batch.tensor[:1].clone(), batch.image_sizes[:1], batch.original_sizes[:1])
    model.batch_invariant = False
    try:
        with torch.no_grad():
            in_batch = model(batch)
            (by_itself,) = model(alone)
            (b_alone,) = model(ImageBatch(batch.tensor[1:].clone(), batch.image_sizes[1:], batch.original_sizes[1:]))
    finally:
        model.batch_invariant = True
    assert by_itself["scores"].numel() > 0
    assert_same_detections(in_batch[0], by_itself)
    assert_same_detections(in_batch[1], b_alone)


def test_padding_content_is_ignored(model):
    """The model zeroes the padding after normalising: whatever the padded pixels hold, same result."""
    model.eval()
    batch = ImageBatch.from_tensors([random_image(70, 90, 7)], size_divisibility=32)  # padded to 96 x 96
    noisy = batch.tensor.clone()
    noisy[:, :, 70:, :] = random_image(26, 96, 8)
    noisy[:, :, :, 90:] = 255
    with torch.no_grad():
        (clean,) = model(batch)
        (garbage,) = model(ImageBatch(noisy, batch.image_sizes, batch.original_sizes))
    assert_same_detections(garbage, clean, atol=0)


def test_normalize_by_hand(model):
    mean = torch.tensor([123.675, 116.28, 103.53])
    std = torch.tensor([58.395, 57.12, 57.375])
    image = torch.stack([torch.full((2, 3), 200.0), torch.full((2, 3), 116.28), torch.zeros(2, 3)])
    batch = ImageBatch.from_tensors([image], size_divisibility=4)  # padded to 4 x 4
    x = model.normalize(batch)
    assert x.shape == (1, 3, 4, 4)
    torch.testing.assert_close(
        x[0, :, :2, :3], ((torch.tensor([200.0, 116.28, 0.0]) - mean) / std)[:, None, None].expand(3, 2, 3)
    )
    assert x[0, :, 2:, :].eq(0).all() and x[0, :, :, 3:].eq(0).all()


def test_training_on_an_image_without_boxes_gives_zero_box_losses(model):
    model.train()
    model.zero_grad()
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model([random_image(64, 64, 9)], targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert losses["loss_box_reg"].item() == 0.0
    assert losses["loss_rpn_loc"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"].item() > 0
    assert torch.isfinite(losses["loss_rpn_cls"]) and losses["loss_rpn_cls"].item() > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(grad).all() for grad in grads)
    model.zero_grad()


def test_training_batch_with_and_without_boxes(model):
    model.train()
    model.zero_grad()
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [30.0, 5.0, 90.0, 40.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses = model([random_image(64, 96, 10), random_image(96, 64, 11)], targets)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert losses["loss_box_reg"].item() > 0 and losses["loss_rpn_loc"].item() > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # Frozen parts (stem + res2 at freeze_at 2) get no gradient.
    assert model.backbone.conv1.weight.grad is None and model.backbone.layer1[0].conv1.weight.grad is None
    assert model.backbone.layer2[0].conv1.weight.grad is not None
    model.zero_grad()


def test_training_needs_one_target_per_image(model):
    model.train()
    with pytest.raises(ValueError, match="one target dict per image"):
        model([random_image(64, 64, 12)])
