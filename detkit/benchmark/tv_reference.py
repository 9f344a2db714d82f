"""torchvision's `FasterRCNN` assembled as the same R101-C4 as a detkit model, with its weights.

The speed comparison of `tools/benchmark.py` is only worth something if both models compute the
same function on the same inputs, so this builds torchvision's detector from torchvision's own
parts and takes every number from the detkit model it is compared with:

    backbone   torchvision ResNet stem + layer1..layer3, one map (C4, stride 16), with detkit's norm
               layer at each place (FrozenBN, BN or GN) and the same stages frozen
    anchors    torchvision AnchorGenerator on that map, with detkit's cell anchors (see below)
    rpn        torchvision RPNHead(C4, A) and RegionProposalNetwork: same IoU thresholds, 256
               anchors 50%, pre/post-NMS top-k per mode, NMS threshold, box weights (1, 1, 1, 1)
    roi pool   MultiScaleRoIAlign(["0"], 14, sampling_ratio 0)
    box head   torchvision ResNet layer4 + AdaptiveAvgPool2d(1)
    predictor  FastRCNNPredictor(C5, K + 1), box weights (10, 10, 5, 5), score 0.05, NMS 0.5, 100
    transform  GeneralizedRCNNTransform with detkit's pixel mean/std (/255: it takes 0..1 images)

Weights: `copy_detkit_weights` copies every tensor of the detkit model into it. Parameter names
are the same up to a prefix for the ResNet parts; the RPN head is renamed (conv -> conv.0.0,
objectness_logits -> cls_logits, anchor_deltas -> bbox_pred); the predictor's rows are permuted
because torchvision puts the background class FIRST (label 0) and detkit LAST (label K), and
torchvision's box regressor has 4 rows for the background too (zeros here: never used).

Three details differ from torchvision's defaults, each so that both models compute the same thing:
- Cell anchors: torchvision orders them ratio-major and rounds them to integers; detkit (like
  Detectron2) orders them size-major and does not round. The reference uses detkit's anchors,
  so the same RPN weights score the same boxes.
- Resizing: torchvision resizes inside the model. Inputs here are already at the benchmark size,
  so `min_size`/`max_size` are the input's sides (checked: scale 1) and the transform's resize is
  replaced by the identity (it would otherwise run a bilinear interpolate at scale 1.0: a copy
  that changes no value; not charging it to torchvision errs in torchvision's favour).
- RoIAlign: MultiScaleRoIAlign uses aligned=False; build the detkit model with
  `model.roi_heads.aligned=false` for outputs to agree (same cost either way).
Left as in torchvision (outputs may differ only on degenerate boxes): proposals with a side
< 1e-3 px and detections with a side < 1e-2 px are dropped (detkit: side <= 0); losses use
smooth-L1 beta 1/9 (detkit: L1) - the same arithmetic cost.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from detkit.modeling.backbone import RESNET_SPECS
from detkit.modeling.detector import FasterRCNN

_RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101, 152: resnet.resnet152}


class _Backbone(nn.Sequential):
    """torchvision ResNet stem + layer1..layer3 (N, 3, H, W) -> (N, C4, H/16, W/16)."""

    out_channels: int


def _no_resize(image: Tensor, target: dict | None = None) -> tuple[Tensor, dict | None]:
    return image, target


def resnet_depth(model: FasterRCNN) -> int:
    """The ResNet depth of a detkit model, from its block counts."""
    res5 = cast(nn.Sequential, model.roi_heads.res5)  # build_res5 makes a Sequential of blocks
    counts = tuple(len(getattr(model.backbone, f"layer{i}")) for i in (1, 2, 3)) + (len(res5),)
    is_basic = not hasattr(model.backbone.layer1[0], "conv3")
    for depth, (kind, blocks) in RESNET_SPECS.items():
        if blocks == counts and (kind == "basic") == is_basic:
            return depth
    raise ValueError(f"no torchvision ResNet has blocks {counts}")


def _mirror_norms(detkit_module: nn.Module, tv_module: nn.Module) -> None:
    """Give `tv_module` the norm layer of `detkit_module` at every name (FrozenBN, BN or GN):
    detkit freezes stages by turning their BatchNorms into FrozenBN, so one model can mix them."""
    from detkit.modeling.backbone import FrozenBatchNorm2d as DetkitFrozenBN

    tv_modules = dict(tv_module.named_modules())
    for name, m in detkit_module.named_modules():
        if isinstance(m, DetkitFrozenBN):
            new = FrozenBatchNorm2d(m.num_features, eps=m.eps)
        elif isinstance(m, nn.GroupNorm):
            new = nn.GroupNorm(m.num_groups, m.num_channels, eps=m.eps)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            new = nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum)
        else:
            continue
        parent, _, child = name.rpartition(".")
        if name not in tv_modules:
            raise ValueError(f"torchvision's ResNet has no module {name!r} (detkit norm layer {type(m).__name__})")
        setattr(tv_modules[parent] if parent else tv_module, child, new)


def build_torchvision_reference(
    model: FasterRCNN, image_size_hw: tuple[int, int] | None = None
) -> TorchvisionFasterRCNN:
    """torchvision FasterRCNN with the architecture and hyper-parameters of `model`, and its weights.

    image_size_hw: (h, w) of the inputs it will get, already resized: checked that torchvision's
    resize would leave them as they are. None: inputs of any size (the resize is the identity).
    The returned model is on the CPU, in eval mode, in fp32; move it like the detkit model.
    Norm layers: whatever detkit uses at each place (FrozenBN, BN, GN).
    """
    depth = resnet_depth(model)
    if model.roi_heads.cls_agnostic_bbox_reg:
        raise ValueError("FastRCNNPredictor has class-specific boxes: use model.roi_heads.cls_agnostic_bbox_reg=false")
    first_block = model.backbone.layer2[0]
    if not isinstance(first_block.downsample, nn.Sequential):
        raise ValueError("torchvision's ResNet has projection shortcuts: use model.backbone.shortcut=B")
    if hasattr(first_block, "conv3") and first_block.conv1.stride != (1, 1):
        raise ValueError(
            "torchvision's Bottleneck has the stride in the 3x3 conv: use model.backbone.stride_in_1x1=false"
        )

    net = _RESNETS[depth](weights=None)
    _mirror_norms(model.backbone, net)
    _mirror_norms(model.roi_heads.res5, net.layer4)
    backbone = _Backbone(
        OrderedDict(
            conv1=net.conv1,
            bn1=net.bn1,
            relu=net.relu,
            maxpool=net.maxpool,
            layer1=net.layer1,
            layer2=net.layer2,
            layer3=net.layer3,
        )
    )
    backbone.out_channels = model.backbone.out_channels
    # Freeze what detkit froze (freeze_at), parameter by parameter.
    detkit_trainable = {name for name, p in model.backbone.named_parameters() if p.requires_grad}
    for name, p in backbone.named_parameters():
        p.requires_grad_(name in detkit_trainable)
    res5_trainable = {name for name, p in model.roi_heads.res5.named_parameters() if p.requires_grad}
    for name, p in net.layer4.named_parameters():
        p.requires_grad_(name in res5_trainable)
    box_head = nn.Sequential(OrderedDict(layer4=net.layer4, avgpool=nn.AdaptiveAvgPool2d(1)))

    rpn, heads = model.rpn, model.roi_heads
    anchor_generator = AnchorGenerator(sizes=((32,),), aspect_ratios=((1.0,),))
    anchor_generator.cell_anchors = [rpn.anchor_generator.cell_anchors.detach().cpu().clone()]  # (A, 4)
    num_anchors = anchor_generator.cell_anchors[0].shape[0]
    k = heads.num_classes
    h, w = image_size_hw or (800, 1333)
    mean = [float(v) / 255.0 for v in model.pixel_mean.flatten()]
    std = [float(v) / 255.0 for v in model.pixel_std.flatten()]
    reference = TorchvisionFasterRCNN(
        backbone,
        num_classes=None,
        min_size=min(h, w),
        max_size=max(h, w),
        image_mean=mean,
        image_std=std,
        rpn_anchor_generator=anchor_generator,
        rpn_head=RPNHead(backbone.out_channels, num_anchors),
        rpn_pre_nms_top_n_train=rpn.pre_nms_topk[0],
        rpn_pre_nms_top_n_test=rpn.pre_nms_topk[1],
        rpn_post_nms_top_n_train=rpn.post_nms_topk[0],
        rpn_post_nms_top_n_test=rpn.post_nms_topk[1],
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.matcher.high_threshold,
        rpn_bg_iou_thresh=rpn.matcher.low_threshold,
        rpn_batch_size_per_image=rpn.batch_size_per_image,
        rpn_positive_fraction=rpn.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(
            featmap_names=["0"], output_size=heads.pooler_resolution, sampling_ratio=heads.sampling_ratio
        ),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(heads.box_predictor.cls_score.in_features, k + 1),
        box_score_thresh=heads.score_thresh,
        box_nms_thresh=heads.nms_thresh,
        box_detections_per_img=heads.detections_per_image,
        box_fg_iou_thresh=heads.matcher.high_threshold,
        box_bg_iou_thresh=heads.matcher.low_threshold,
        box_batch_size_per_image=heads.batch_size_per_image,
        box_positive_fraction=heads.positive_fraction,
        bbox_reg_weights=heads.box_coder.weights,
    )
    if image_size_hw is not None:
        check_no_resize(reference, image_size_hw)
    reference.transform.resize = _no_resize
    if tuple(rpn.box_coder.weights) != (1.0, 1.0, 1.0, 1.0):
        raise ValueError(f"torchvision's RPN uses box weights (1, 1, 1, 1); this model has {rpn.box_coder.weights}")
    copy_detkit_weights(model, reference)
    return reference.eval()


def check_no_resize(reference: TorchvisionFasterRCNN, image_size_hw: tuple[int, int]) -> None:
    """Raise unless torchvision's own resize leaves an (h, w) image as it is (size and values)."""
    image = torch.rand(3, *image_size_hw, generator=torch.Generator().manual_seed(0))
    transform = reference.transform
    for training in (False, True):
        transform.train(training)
        resized, _ = type(transform).resize(transform, image)
        if resized.shape != image.shape or not torch.allclose(resized, image, atol=1e-6):
            raise ValueError(f"torchvision's transform would resize {tuple(image.shape)} to {tuple(resized.shape)}")
    transform.eval()


def detkit_to_torchvision_state_dict(model: FasterRCNN) -> dict[str, Tensor]:
    """detkit tensors under the reference's names (the predictor permuted: background first)."""
    out: dict[str, Tensor] = {}
    rpn_names = {"conv": "conv.0.0", "objectness_logits": "cls_logits", "anchor_deltas": "bbox_pred"}
    k = model.roi_heads.num_classes
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if key.startswith("backbone."):
            out[key] = value
        elif key.startswith("roi_heads.res5."):
            out["roi_heads.box_head.layer4." + key[len("roi_heads.res5.") :]] = value
        elif key.startswith("rpn.head."):
            layer, _, param = key[len("rpn.head.") :].partition(".")
            out[f"rpn.head.{rpn_names[layer]}.{param}"] = value
        elif key.startswith("roi_heads.box_predictor.cls_score."):
            # (K + 1, ...) background last -> background first.
            out[key] = torch.cat((value[k:], value[:k]))
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):
            # (4K, ...) -> (4 (K + 1), ...): 4 unused background rows first.
            out[key] = torch.cat((torch.zeros_like(value[:4]), value))
        else:
            raise KeyError(f"no torchvision counterpart for detkit tensor {key}")
    return out


def copy_detkit_weights(model: FasterRCNN, reference: TorchvisionFasterRCNN) -> None:
    """Load every tensor of the detkit model into the reference (all of the reference's tensors
    must be covered, and the shapes must agree)."""
    state = detkit_to_torchvision_state_dict(model)
    own = reference.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(
            f"weights do not map: missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {bad_shapes[:5]}"
        )
    reference.load_state_dict(state, strict=True)


def to_torchvision_images(images: Tensor) -> list[Tensor]:
    """(N, 3, H, W) 0..255 -> the list of (3, H, W) 0..1 float images torchvision's models take."""
    return list((images.float() / 255.0).unbind(0))


def to_torchvision_targets(targets: list[dict]) -> list[dict]:
    """detkit targets (labels 0..K-1) -> torchvision's (labels 1..K, 0 is background)."""
    return [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]


def from_torchvision_detections(detections: list[dict]) -> list[dict]:
    """torchvision detections (labels 1..K) -> detkit's layout (labels 0..K-1)."""
    return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - 1} for d in detections]


class TorchvisionDetector(nn.Module):
    """torchvision's FasterRCNN behind detkit's model API, so detkit's Trainer, loaders and
    evaluator drive it exactly like a detkit model (the accuracy comparison of tools/benchmark.py).

    forward(images: ImageBatch, targets=None): training -> torchvision's loss dict; eval -> per
    image {"boxes" in original pixels, "scores", "labels" in [0, K)}, as detkit's model returns.
    Each image is cut out of the padded batch at its own size (torchvision pads again itself).
    """

    def __init__(self, reference: TorchvisionFasterRCNN):
        super().__init__()
        self.net = reference

    def forward(self, images, targets: list[dict] | None = None):
        device = next(self.net.parameters()).device
        images = images.to(device, non_blocking=True)
        sizes = images.image_sizes.tolist()
        pixels = images.tensor.float() / 255.0  # (N, 3, Hp, Wp)
        per_image = [pixels[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
        if self.training:
            if targets is None:
                raise ValueError("training needs one target dict per image")
            return self.net(per_image, to_torchvision_targets(targets))
        detections = from_torchvision_detections(self.net(per_image))
        for det, (h, w), (oh, ow) in zip(detections, sizes, images.original_sizes.tolist()):
            boxes = det["boxes"] * torch.tensor([ow / w, oh / h, ow / w, oh / h], device=device)
            det["boxes"] = torch.stack(
                (
                    boxes[:, 0].clamp(0, ow),
                    boxes[:, 1].clamp(0, oh),
                    boxes[:, 2].clamp(0, ow),
                    boxes[:, 3].clamp(0, oh),
                ),
                dim=1,
            )
        return detections
