"""Like with like: the inputs both models get, the calibration that makes a random model behave
like a trained one where it matters for speed, and the check that both models agree.

    inputs = make_inputs(batch_size=1, height=480, width=640)
    calibrate_(model, inputs.images)
    compare_detections(detkit_detections, torchvision_detections)   # {"matched", "match_fraction", ...}

No trained weights are available offline, and with random weights an R101 trunk with identity
FrozenBN blows activations up and the RPN scores are flat: the timed model would then do other work
than a trained one (NMS keeping few proposals, almost no box passing the score threshold), and
what a speed benchmark measures must be the work of a trained model. So `calibrate_` sets:
- every FrozenBN to the mean/variance of its input on the benchmark images (unit activations);
- the RPN head so objectness logits have std ~1 and box deltas ~0.1 (spread-out scores, boxes near
  their anchors: NMS keeps the full post-NMS top-k);
- the box predictor to class logits of std ~3 and the background logit a bias chosen so that about
  `candidates_per_roi` (RoI, class) pairs per RoI pass the 0.05 score threshold (a trained COCO
  model gives a few hundred to a few thousand candidates per image before NMS).
The same tensors are then copied into the torchvision model (tv_reference.py).

Shapes: N images, H x W input, G ground-truth boxes per image, K classes, D detections.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from detkit.structures.compare import diff_detections

if TYPE_CHECKING:
    from detkit.modeling.detector import FasterRCNN


@dataclass
class BenchmarkInputs:
    """images: (N, 3, H, W) uint8 0..255 (RGB); targets: per image {"boxes": (G, 4) xyxy,
    "labels": (G,) in [0, K)}."""

    images: Tensor
    targets: list[dict]


def make_inputs(
    batch_size: int, height: int, width: int, num_classes: int = 80, boxes_per_image: int = 8, seed: int = 0
) -> BenchmarkInputs:
    """Smooth random images (low-frequency colour noise plus a little pixel noise: real images have
    both) and random ground-truth boxes of 32 px up to half the short side."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, max(height // 32, 1), max(width // 32, 1), generator=g)
    images = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    images = (images * 200 + torch.rand(batch_size, 3, height, width, generator=g) * 55).clamp(0, 255).to(torch.uint8)
    targets = []
    max_side = max(min(height, width) // 2, 33)
    for _ in range(batch_size):
        wh = torch.randint(32, max_side, (boxes_per_image, 2), generator=g).float()
        x1 = (torch.rand(boxes_per_image, generator=g) * (width - wh[:, 0])).floor()
        y1 = (torch.rand(boxes_per_image, generator=g) * (height - wh[:, 1])).floor()
        boxes = torch.stack((x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]), dim=1)  # (G, 4)
        labels = torch.randint(0, num_classes, (boxes_per_image,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return BenchmarkInputs(images, targets)


@contextmanager
def _frozen_bn_calibration(module: nn.Module) -> Iterator[None]:
    """While active, every FrozenBatchNorm2d in `module` first sets its running mean/var to the
    per-channel statistics of its input (so its output has zero mean and unit variance per
    channel): one forward pass calibrates all layers in order."""
    from detkit.modeling.backbone import FrozenBatchNorm2d

    def hook(bn: FrozenBatchNorm2d, args: tuple) -> None:
        x = args[0].detach().float()
        bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(x.var(dim=(0, 2, 3)).clamp(min=1e-4))
        bn.weight.fill_(1.0)
        bn.bias.zero_()

    handles = [m.register_forward_pre_hook(hook) for m in module.modules() if isinstance(m, FrozenBatchNorm2d)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _rescale_(layer: nn.Conv2d | nn.Linear, x: Tensor, target_std: float, generator: torch.Generator) -> Tensor:
    """Redraw a conv/linear layer's weights N(0, s^2) with s chosen so its output on `x` has std
    `target_std`, zero its bias; returns the new output."""
    # The RPN head's convs and the box predictor's linears are all built with a bias.
    assert layer.bias is not None
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
        layer.bias.zero_()
        out = layer(x)
        layer.weight.mul_(target_std / out.float().std().clamp(min=1e-12))
        return layer(x)


@torch.no_grad()
def calibrate_(
    model: FasterRCNN,
    images: Tensor,
    rpn_logit_std: float = 1.0,
    rpn_delta_std: float = 0.1,
    cls_logit_std: float = 3.0,
    box_delta_std: float = 0.5,
    candidates_per_roi: float = 1.0,
    rois_per_image: int = 16,
    seed: int = 0,
) -> None:
    """Make a randomly initialised detkit FasterRCNN produce realistic activations (see the module
    docstring). images: (N, 3, H, W) 0..255. Changes the model's FrozenBN statistics and its RPN
    head and box predictor weights in place; the trunk and res5 convolutions are kept."""
    from detkit.structures.image_batch import ImageBatch

    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    device = model.pixel_mean.device
    batch = ImageBatch.from_tensors(list(images), model.size_divisibility).to(device)
    x = model.normalize(batch)
    with _frozen_bn_calibration(model.backbone):
        features = model.backbone(x)  # (N, C4, H/16, W/16)

    head = model.rpn.head
    hidden = F.relu(_rescale_(head.conv, features, 1.0, g))
    _rescale_(head.objectness_logits, hidden, rpn_logit_std, g)
    _rescale_(head.anchor_deltas, hidden, rpn_delta_std, g)

    # res5 on random boxes (between 32 px and the whole image) instead of real proposals.
    n, _, fh, fw = features.shape
    h, w = fh * 16.0, fw * 16.0
    xy = torch.rand(n * rois_per_image, 2, generator=g) * torch.tensor([w, h]) * 0.75
    wh = 32 + torch.rand(n * rois_per_image, 2, generator=g) * (torch.tensor([w, h]) - xy - 32).clamp(min=1)
    rois = torch.cat((torch.arange(n).repeat_interleave(rois_per_image)[:, None].float(), xy, xy + wh), dim=1)
    heads = model.roi_heads
    crops = roi_align(
        features, rois.to(features), heads.pooler_resolution, heads.spatial_scale, heads.sampling_ratio, heads.aligned
    )
    with _frozen_bn_calibration(heads.res5):
        pooled = heads.res5(crops).mean(dim=(2, 3))  # (R, C5)

    predictor = heads.box_predictor
    logits = _rescale_(predictor.cls_score, pooled, cls_logit_std, g)
    _rescale_(predictor.bbox_pred, pooled, box_delta_std, g)
    # Background is the last logit: raise it until about `candidates_per_roi` scores pass 0.05.
    low, high = -30.0, 30.0
    for _ in range(40):
        bias = 0.5 * (low + high)
        shifted = logits.clone()
        shifted[:, -1] += bias
        count = (F.softmax(shifted, dim=1)[:, :-1] > heads.score_thresh).sum(dim=1).float().mean()
        low, high = (bias, high) if count > candidates_per_roi else (low, bias)
    predictor.cls_score.bias[-1] = 0.5 * (low + high)
    model.train(was_training)


def compare_detections(a: Sequence[dict], b: Sequence[dict], iou_thresh: float = 0.99) -> dict:
    """How far two models' detections on the same images agree.

    a, b: per image {"boxes": (D, 4), "scores": (D,), "labels": (D,)}. Each image is compared by
    detkit.structures.compare.diff_detections: a detection of `a` is matched to the unmatched
    detection of `b` with the same label and the highest IoU (>= iou_thresh).
    Returns {"num_a", "num_b", "matched", "match_fraction" (matched / max(num_a, num_b), 1.0 when
    both are empty), "max_box_diff" (px), "max_score_diff"} over matched pairs of all images.
    """
    per_image = [diff_detections(da, db, iou_thresh) for da, db in zip(a, b)]
    num_a = sum(d["reference"] for d in per_image)
    num_b = sum(d["candidate"] for d in per_image)
    matched = sum(d["matched"] for d in per_image)
    total = max(num_a, num_b)
    return {
        "num_a": num_a,
        "num_b": num_b,
        "matched": matched,
        "match_fraction": matched / total if total else 1.0,
        "max_box_diff": max((d["matched_max_box_diff_px"] for d in per_image), default=0.0),
        "max_score_diff": max((d["matched_max_score_diff"] for d in per_image), default=0.0),
    }
