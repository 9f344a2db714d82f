"""The detector and its stages; `build_model(cfg)` turns a config into a ready model."""

from __future__ import annotations

import torch

from detkit.errors import ConfigError
from detkit.modeling.backbone import ResNetTrunk, build_res5
from detkit.modeling.detector import FasterRCNN
from detkit.modeling.roi_heads import Res5ROIHeads
from detkit.modeling.rpn import RPN
from detkit.modeling.weights import load_backbone_weights, load_detector_weights
from detkit.modeling.weights.load import resolve_backbone_weights

__all__ = ["RPN", "FasterRCNN", "Res5ROIHeads", "ResNetTrunk", "build_model", "build_res5", "check_initialisation"]


def check_initialisation(cfg) -> None:
    """Refuse to train frozen BatchNorm over a backbone that no weights file initialises.

    FrozenBN keeps each BatchNorm at its stored statistics; without pretrained weights those are the
    identity (mean 0, var 1), so nothing normalises the activations of the random convolutions, and
    through 33 bottlenecks of a ResNet-101 they grow until the loss is ~1e20 and the gradients inf
    (in the third iteration of configs/frcnn_r101.yaml). Training from scratch on purpose uses BN,
    SyncBN or GN (configs/shapes_r18.yaml), which this does not touch. Raises ConfigError.
    """
    m = getattr(cfg, "model", cfg)
    b = m.backbone
    if b.norm != "FrozenBN" or b.weights or m.weights:
        return
    raise ConfigError(
        "model.backbone.norm=FrozenBN with no pretrained weights (model.backbone.weights and model.weights are "
        "empty): frozen identity BatchNorm over random convolutions diverges within a few iterations. Set "
        "model.backbone.weights=imagenet (torchvision's ImageNet ResNet, downloaded once into its cache) or a "
        "local ImageNet file, or train from scratch with model.backbone.norm=BN (or GN) and "
        "model.backbone.freeze_at=0, as configs/shapes_r18.yaml does"
    )


def build_model(cfg, device: torch.device | str | None = None, load_weights: bool = True) -> FasterRCNN:
    """FasterRCNN from a `detkit.config.Config` (or its `model` section).

    Loads `model.backbone.weights` ("imagenet": torchvision's ImageNet ResNet of `model.depth`), then
    `model.weights` (which wins where both have a tensor).
    """
    m = getattr(cfg, "model", cfg)
    b = m.backbone
    trunk = ResNetTrunk(
        depth=m.depth, norm=b.norm, freeze_at=b.freeze_at, stride_in_1x1=b.stride_in_1x1, shortcut=b.shortcut
    )
    res5, res5_channels = build_res5(
        depth=m.depth, norm=b.norm, freeze=b.freeze_at >= 5, stride_in_1x1=b.stride_in_1x1, shortcut=b.shortcut
    )
    r = m.rpn
    rpn = RPN(
        in_channels=trunk.out_channels,
        anchor_sizes=r.anchor_sizes,
        aspect_ratios=r.aspect_ratios,
        anchor_stride=r.anchor_stride,
        iou_thresholds=r.iou_thresholds,
        allow_low_quality_matches=r.allow_low_quality_matches,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        bbox_reg_weights=r.bbox_reg_weights,
        smooth_l1_beta=r.smooth_l1_beta,
        loss_weight=r.loss_weight,
        pre_nms_topk=(r.pre_nms_topk_train, r.pre_nms_topk_test),
        post_nms_topk=(r.post_nms_topk_train, r.post_nms_topk_test),
        nms_thresh=r.nms_thresh,
        min_box_size=r.min_box_size,
    )
    h = m.roi_heads
    roi_heads = Res5ROIHeads(
        res5=res5,
        res5_out_channels=res5_channels,
        num_classes=m.num_classes,
        feature_stride=trunk.stride,
        batch_size_per_image=h.batch_size_per_image,
        positive_fraction=h.positive_fraction,
        iou_threshold=h.iou_threshold,
        pooler_resolution=h.pooler_resolution,
        sampling_ratio=h.sampling_ratio,
        aligned=h.aligned,
        bbox_reg_weights=h.bbox_reg_weights,
        smooth_l1_beta=h.smooth_l1_beta,
        cls_agnostic_bbox_reg=h.cls_agnostic_bbox_reg,
        score_thresh=h.score_thresh,
        nms_thresh=h.nms_thresh,
        detections_per_image=h.detections_per_image,
    )
    model = FasterRCNN(
        backbone=trunk,
        rpn=rpn,
        roi_heads=roi_heads,
        pixel_mean=m.pixel_mean,
        pixel_std=m.pixel_std,
        input_format=m.input_format,
        size_divisibility=cfg.data.size_divisibility if hasattr(cfg, "data") else 32,
        batch_invariant=cfg.test.batch_invariant if hasattr(cfg, "test") else True,
    )
    if load_weights and b.weights:
        load_backbone_weights(model, resolve_backbone_weights(b.weights, m.depth), fmt=b.weights_format)
    if load_weights and m.weights:
        load_detector_weights(model, m.weights, fmt=m.weights_format)
    if device is not None:
        model.to(device)
    if m.channels_last:
        model.to(memory_format=torch.channels_last)
    if m.compile:
        # Module.compile() compiles in place: parameter names (and so checkpoints) stay the same.
        model.backbone.compile()
        model.roi_heads.res5.compile()
    return model
