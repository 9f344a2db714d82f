"""Input conventions: weights only give their results with the input they were trained on, so a
warning names the config keys to set when the model's channel order, pixel statistics or
stride_in_1x1 differ from the weights'.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from detkit.modeling.weights.msra import MSRA_PIXEL_MEAN_BGR, MSRA_PIXEL_STD

logger = logging.getLogger(__name__)


def model_conventions(model: nn.Module) -> dict[str, Any]:
    """The input conventions a detkit model is built with: input_format, pixel_mean, pixel_std
    (tuples) and stride_in_1x1 (None for BasicBlock depths, where it makes no difference)."""
    out: dict[str, Any] = {"input_format": getattr(model, "input_format", None)}
    for name in ("pixel_mean", "pixel_std"):
        buf = getattr(model, name, None)
        out[name] = tuple(round(float(v), 4) for v in buf.flatten()) if isinstance(buf, Tensor) else None
    block = None
    backbone = getattr(model, "backbone", None)
    layer2 = getattr(backbone, "layer2", None)
    if layer2 is not None and len(layer2) > 0:
        block = layer2[0]
    if block is not None and hasattr(block, "conv3"):
        out["stride_in_1x1"] = tuple(block.conv1.stride) != (1, 1)
    else:
        out["stride_in_1x1"] = None
    return out


_EXAMPLE_CONFIG = {
    "msra": "configs/frcnn_r101_msra.yaml",
    "detectron2": "configs/frcnn_r101_detectron2.yaml",
    "torchvision": "configs/frcnn_r101.yaml",
    "detkit": "the training config",
}


def warn_on_conventions(
    model: nn.Module, fmt: str, raw: Mapping[str, Tensor], extras: Mapping[str, Any], source: str
) -> None:
    """Log a warning when the model's input settings differ from those the weights were trained with."""
    have = model_conventions(model)
    want: dict[str, Any] = {}
    if fmt == "msra":
        want = {
            "input_format": "BGR",
            "pixel_mean": MSRA_PIXEL_MEAN_BGR,
            "pixel_std": MSRA_PIXEL_STD,
            "stride_in_1x1": True,
        }
    elif fmt == "torchvision":
        want = {"input_format": "RGB", "stride_in_1x1": False}
    elif fmt == "detectron2":
        for name in ("pixel_mean", "pixel_std"):  # old Detectron2 checkpoints store them
            if name in raw:
                want[name] = tuple(round(float(v), 4) for v in raw[name].flatten())
        if "Detectron2 Model Zoo" in str(extras.get("__author__", "")):
            # The zoo's R50/R101 models start from MSRA weights (Detectron2's defaults).
            want = {
                "input_format": "BGR",
                "pixel_mean": MSRA_PIXEL_MEAN_BGR,
                "pixel_std": MSRA_PIXEL_STD,
                "stride_in_1x1": True,
                **want,
            }
    differ = []
    for key, value in want.items():
        if have.get(key) is None:
            continue
        expected = tuple(round(float(v), 4) for v in value) if isinstance(value, tuple) else value
        if have[key] != expected:
            differ.append(f"{key}: model {have[key]}, weights {expected}")
    if differ:
        keys = {
            "input_format": "model.input_format",
            "pixel_mean": "model.pixel_mean",
            "pixel_std": "model.pixel_std",
            "stride_in_1x1": "model.backbone.stride_in_1x1",
        }
        logger.warning(
            "%s (%s weights) was trained with other input settings than this model's, so its outputs will be off: "
            "%s. Set %s as the weights expect (as %s does).",
            source,
            fmt,
            "; ".join(differ),
            ", ".join(keys[d.split(":")[0]] for d in differ),
            _EXAMPLE_CONFIG[fmt],
        )
