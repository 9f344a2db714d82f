"""The AMP path that GPUs run by default (solver.amp auto = bf16), exercised with CPU autocast.

Box coordinates must stay fp32 under autocast (roi_align gets fp32 boxes), losses are fp32 and
finite, gradients finite, and bf16 inference finds the fp32 detections. Also: smooth-L1 with
beta > 0 on an image without ground truth gives finite gradients in both heads.
"""

import pytest
import torch

import detkit.modeling.roi_heads as roi_heads_module
from detkit.config import load_config, replace
from detkit.modeling import build_model

NUM_CLASSES = 3


def tiny_model(**changes):
    """ResNet-18 C4, 14x14 RoIAlign, few proposals and RoIs: a bf16 CPU step takes about a second."""
    torch.manual_seed(0)
    cfg = replace(
        load_config(),
        **{
            "model.depth": 18,
            "model.num_classes": NUM_CLASSES,
            "model.rpn.pre_nms_topk_train": 200,
            "model.rpn.post_nms_topk_train": 16,
            "model.rpn.pre_nms_topk_test": 200,
            "model.rpn.post_nms_topk_test": 16,
            "model.rpn.batch_size_per_image": 64,
            "model.roi_heads.batch_size_per_image": 8,
            **changes,
        },
    )
    return build_model(cfg)


def images_and_targets():
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=g) for _ in range(2)]
    targets = [
        {
            "boxes": torch.tensor([[10.25, 20.5, 60.75, 80.125], [70.0, 8.0, 120.5, 50.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no ground truth
    ]
    return images, targets


@pytest.fixture
def roi_align_calls(monkeypatch):
    """Records (features dtype, boxes) of every roi_align call of the RoI heads."""
    calls = []
    original = roi_heads_module.roi_align

    def recording(features, boxes, *args, **kwargs):
        calls.append((features.dtype, boxes.detach().clone()))
        return original(features, boxes, *args, **kwargs)

    monkeypatch.setattr(roi_heads_module, "roi_align", recording)
    return calls


def test_bf16_training_step_keeps_boxes_fp32_and_gives_finite_losses_and_gradients(roi_align_calls, monkeypatch):
    model = tiny_model()
    images, targets = images_and_targets()
    sampled = {}
    original_sample = model.roi_heads.label_and_sample_proposals

    def keep_rois(*args):
        out = original_sample(*args)
        sampled["rois"] = out[0]
        return out

    monkeypatch.setattr(model.roi_heads, "label_and_sample_proposals", keep_rois)
    res5_inputs = []
    model.roi_heads.res5.register_forward_hook(lambda module, inputs, output: res5_inputs.append(output.dtype))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert res5_inputs == [torch.bfloat16]  # autocast is really on for the convolutions
    ((_features_dtype, boxes),) = roi_align_calls
    assert boxes.dtype == torch.float32
    # The pooled boxes are exactly the sampled RoIs (GT boxes included), not their bf16 roundings.
    assert torch.equal(boxes[:, 1:], sampled["rois"])
    assert not torch.equal(boxes[:, 1:].bfloat16().float(), boxes[:, 1:])  # bf16 would have moved them
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 20 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
def test_smooth_l1_beta_with_an_image_without_boxes_gives_finite_gradients(beta):
    model = tiny_model(**{"model.rpn.smooth_l1_beta": beta, "model.roi_heads.smooth_l1_beta": beta})
    images, targets = images_and_targets()
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    # Both heads' regression losses saw positives (the first image) and got gradients.
    assert losses["loss_rpn_loc"] > 0 and losses["loss_box_reg"] > 0
    assert model.rpn.head.anchor_deltas.weight.grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0


def test_bf16_inference_pools_the_fp32_proposals_and_returns_fp32_detections(roi_align_calls, monkeypatch):
    """(That bf16 finds fp32's detections is checked on a trained model: tests/modeling/test_overfit.py;
    a random model's near-tied scores would make that comparison a coin toss.)"""
    model = tiny_model()
    proposals = []
    original_rpn_forward = model.rpn.forward
    monkeypatch.setattr(
        model.rpn, "forward", lambda *a, **k: proposals.append(original_rpn_forward(*a, **k)) or proposals[-1]
    )
    model.eval()
    images, _ = images_and_targets()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model(images)
    # Batch-invariant inference runs the images one at a time: one RPN and one RoIAlign call each.
    assert len(roi_align_calls) == len(proposals) == len(images) > 1
    for (_, boxes), (rpn_boxes, rpn_valid, _) in zip(roi_align_calls, proposals):
        assert rpn_boxes.dtype == torch.float32 and boxes.dtype == torch.float32
        image_idx, slot = torch.nonzero(rpn_valid, as_tuple=True)
        assert torch.equal(boxes[:, 1:], rpn_boxes[image_idx, slot])
        assert torch.equal(boxes[:, 0], image_idx.float())
    for det in detections:
        assert det["boxes"].dtype == torch.float32 and det["scores"].dtype == torch.float32
        assert len(det["scores"]) > 0 and torch.isfinite(det["boxes"]).all()
