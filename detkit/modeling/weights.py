"""Load pretrained weights into a detkit model, with one report of what matched.

Formats understood here:
- torchvision ImageNet ResNet state dicts (`conv1.weight`, `layer1.0.conv1.weight`, ..., `fc.*`):
  conv1/bn1/layer1..3 go to `backbone.*`, layer4 to `roi_heads.res5.*`, `fc` is unused.
- detkit checkpoints: a dict with a "model" state dict in detkit's own names.

`.pth` files load with `torch.load(weights_only=True)`: no code in the file can run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from detkit.errors import CheckpointError

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What happened to each key of a checkpoint when loading it into a model."""

    source: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys the file does not have
    unused: list[str] = field(default_factory=list)  # file keys the model does not have
    shape_mismatch: list[str] = field(default_factory=list)  # "key: file (a, b) vs model (c, d)"

    def summary(self) -> str:
        def some(keys: list[str]) -> str:
            if not keys:
                return ""
            shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            return f" ({shown})"

        return (
            f"loaded {self.source}: {len(self.matched)} matched, {len(self.missing)} missing{some(self.missing)}, "
            f"{len(self.unused)} unused{some(self.unused)}, {len(self.shape_mismatch)} shape mismatches"
            f"{some(self.shape_mismatch)}"
        )


def read_torch_file(path: str | os.PathLike) -> object:
    """torch.load with weights_only=True, and errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path} (give a local path; nothing is downloaded here)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for corrupt or unsafe files
        raise CheckpointError(
            f"cannot load {path} with torch.load(weights_only=True): {type(exc).__name__}: {str(exc).splitlines()[0]}. "
            "If it is a pickle from Detectron2 or MSRA, convert it with tools/convert_weights.py."
        ) from None


def torchvision_to_detkit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ResNet state dict to detkit's names (fc.* is dropped)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        if key.startswith("layer4."):
            out["roi_heads.res5." + key[len("layer4."):]] = value
        else:
            out["backbone." + key] = value
    return out


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, Tensor], source: str, only_prefixes: tuple[str, ...] = ()) -> LoadReport:
    """Copy matching tensors into the model; report the rest (never raises on a mismatch).

    only_prefixes: model keys outside these prefixes are not reported as missing (e.g. a backbone
    checkpoint says nothing about the heads).
    """
    report = LoadReport(source=source)
    own = model.state_dict()
    to_load = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unused.append(key)
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            report.shape_mismatch.append(f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}")
            continue
        to_load[key] = value
        report.matched.append(key)
    for key in own:
        if key in to_load or key.endswith("num_batches_tracked"):
            continue
        if only_prefixes and not key.startswith(only_prefixes):
            continue
        if not any(m.startswith(key + ":") for m in report.shape_mismatch):
            report.missing.append(key)
    model.load_state_dict(to_load, strict=False)
    return report


def load_backbone_weights(model: nn.Module, path: str) -> LoadReport:
    """ImageNet ResNet weights (torchvision layout: a local file, or a torchvision enum name such as
    "ResNet101_Weights.IMAGENET1K_V1", downloaded by torchvision when the machine is online)."""
    if not Path(path).exists() and path.startswith("ResNet") and "_Weights." in path:
        state_dict = _torchvision_enum_state_dict(path)
    else:
        state_dict = read_torch_file(path)
        if isinstance(state_dict, dict) and "model" in state_dict and isinstance(state_dict["model"], dict):
            state_dict = state_dict["model"]
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{path} does not hold a state dict (got {type(state_dict).__name__})")
    report = load_state_dict_into(model, torchvision_to_detkit(state_dict), str(path), only_prefixes=("backbone.", "roi_heads.res5."))
    if not report.matched:
        raise CheckpointError(
            f"no tensor of {path} fits the backbone: is it a torchvision ResNet state dict of depth "
            f"matching model.depth? ({report.summary()})"
        )
    logger.info(report.summary())
    return report


def _torchvision_enum_state_dict(name: str) -> Mapping[str, Tensor]:
    import torchvision.models as tvm

    enum_name, _, member = name.partition(".")
    try:
        weights = getattr(getattr(tvm, enum_name), member)
    except AttributeError:
        raise CheckpointError(f"model.backbone.weights={name!r} is neither a file nor a torchvision weights enum") from None
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:
        raise CheckpointError(
            f"could not download {name} ({type(exc).__name__}: {exc}). Download it elsewhere and set "
            "model.backbone.weights to the local .pth file."
        ) from None


def load_detector_weights(model: nn.Module, path: str) -> LoadReport:
    """A full detector checkpoint in detkit's names (a dict with "model", or a bare state dict).

    Heads whose shapes differ (another number of classes) are skipped with a warning, so
    fine-tuning on a new dataset works.
    """
    obj = read_torch_file(path)
    state_dict = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} does not hold a detkit checkpoint or state dict")
    report = load_state_dict_into(model, state_dict, str(path))
    if not report.matched:
        raise CheckpointError(f"no tensor of {path} fits this model ({report.summary()})")
    if report.shape_mismatch:
        logger.warning("skipped tensors whose shape differs (e.g. another num_classes): %s", "; ".join(report.shape_mismatch))
    logger.info(report.summary())
    return report
