"""Loading weights of any format into a detkit model, with one report.

report = load_detector_weights(model, "model_final_f10217.pkl")      # Detectron2, detkit
report = load_backbone_weights(model, "R-101.pkl")                    # ImageNet: MSRA, torchvision, ...
weights = read_weights(path); weights.drop_box_predictor(); load_converted(model, weights)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from detkit.errors import CheckpointError
from detkit.modeling.weights.conventions import warn_on_conventions
from detkit.modeling.weights.convert import FORMATS, Conversion, convert_state_dict, detect_format
from detkit.modeling.weights.files import read_weights_file, state_dict_from_checkpoint

logger = logging.getLogger(__name__)

BACKBONE_PREFIXES = ("backbone.", "roi_heads.res5.")


@dataclass
class LoadReport:
    """What happened to each key of a checkpoint when loading it into a model.

    Keys are detkit names, except `unused` and `ignored`, which use the file's own names.
    """

    source: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys the file does not have
    unused: list[str] = field(default_factory=list)  # file keys the model does not have
    shape_mismatch: list[str] = field(default_factory=list)  # "key: file (a, b) vs model (c, d)"
    format: str = ""  # the layout the file was read as (FORMATS)
    ignored: list[str] = field(default_factory=list)  # file keys with no meaning for detection (fc, momentum)

    def summary(self) -> str:
        def some(keys: list[str]) -> str:
            if not keys:
                return ""
            shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            return f" ({shown})"

        fmt = f" ({self.format} format)" if self.format else ""
        ignored = f", {len(self.ignored)} ignored" if self.ignored else ""
        return (
            f"loaded {self.source}{fmt}: {len(self.matched)} matched, {len(self.missing)} missing{some(self.missing)}, "
            f"{len(self.unused)} unused{some(self.unused)}, {len(self.shape_mismatch)} shape mismatches"
            f"{some(self.shape_mismatch)}{ignored}"
        )


def load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    only_prefixes: tuple[str, ...] = (),
    source_names: Mapping[str, str] | None = None,
) -> LoadReport:
    """Copy matching tensors into the model; report the rest (never raises on a mismatch).

    only_prefixes: model keys outside these prefixes are not reported as missing (e.g. a backbone
    checkpoint says nothing about the heads), and file keys outside them are not loaded (unused).
    source_names: the file's name of each key, so `unused` shows names the user can find in the file.
    """
    report = LoadReport(source=source)
    own = model.state_dict()
    to_load = {}
    for key, value in state_dict.items():
        if key not in own or (only_prefixes and not key.startswith(only_prefixes)):
            report.unused.append((source_names or {}).get(key, key))
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            report.shape_mismatch.append(f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}")
            continue
        to_load[key] = value
        report.matched.append(key)
    mismatched = {m.split(":", 1)[0] for m in report.shape_mismatch}
    for key in own:
        if key in to_load or key in mismatched or key.endswith("num_batches_tracked"):
            continue
        if only_prefixes and not key.startswith(only_prefixes):
            continue
        report.missing.append(key)
    model.load_state_dict(to_load, strict=False)
    return report


@dataclass
class ConvertedWeights:
    """A weights file read and renamed to detkit's names (`read_weights`), not yet in a model."""

    source: str
    format: str  # the layout the file was read as (FORMATS)
    state_dict: dict[str, Tensor]  # detkit names
    source_names: dict[str, str]  # detkit name -> the file's name
    unused: list[str]  # file names that mean nothing in detkit's layout
    ignored: list[str]  # file names known to carry nothing for detection (fc, momentum, ...)
    file_state_dict: dict[str, Tensor]  # the file's tensors under its own names
    extras: dict[str, Any]  # the file's other top-level entries ("__author__", "iteration", ...)

    @property
    def num_classes(self) -> int | None:
        """K of the box predictor in the file (cls_score has K + 1 rows), None without one."""
        cls_score = self.state_dict.get("roi_heads.box_predictor.cls_score.weight")
        return None if cls_score is None else int(cls_score.shape[0]) - 1

    def drop_box_predictor(self) -> list[str]:
        """Remove roi_heads.box_predictor.* (to fine-tune on other classes); returns the removed keys."""
        dropped = [k for k in self.state_dict if k.startswith("roi_heads.box_predictor.")]
        for key in dropped:
            del self.state_dict[key]
        return dropped


def read_weights(path: str | os.PathLike, fmt: str = "auto") -> ConvertedWeights:
    """Read a weights file of any format (FORMATS, or "auto": from its tensor names) into detkit names."""
    source = str(path)
    raw, extras = state_dict_from_checkpoint(read_weights_file(path), source)
    if fmt != "auto" and fmt not in FORMATS:
        raise CheckpointError(f"unknown weights format {fmt!r} for {source}: use auto or one of {', '.join(FORMATS)}")
    try:
        detected: str | None = detect_format(raw, source)
    except CheckpointError:
        if fmt == "auto":
            raise
        detected = None
    if fmt == "auto" and detected is not None:  # (with "auto", a failed detection raised above)
        fmt = detected
    if fmt == "detkit":
        conversion = Conversion(dict(raw), {k: k for k in raw}, [], [])
    else:
        conversion = convert_state_dict(raw, fmt, "detkit")
    if not conversion.state_dict:
        hint = f"; its names look like {detected} weights" if detected and detected != fmt else ""
        raise CheckpointError(
            f"{source} holds no tensor that {fmt} weights name{hint} (first names: {', '.join(list(raw)[:4])})"
        )
    if detected and detected != fmt:
        logger.warning("%s: read as %s weights as asked, but its names look like %s weights", source, fmt, detected)
    return ConvertedWeights(
        source=source,
        format=fmt,
        state_dict=conversion.state_dict,
        source_names=conversion.source_names,
        unused=conversion.unused,
        ignored=conversion.ignored,
        file_state_dict=raw,
        extras=extras,
    )


def load_converted(model: nn.Module, weights: ConvertedWeights, *, backbone_only: bool = False) -> LoadReport:
    """Copy `read_weights`'s tensors into a detkit model and report; see `load_weights`."""
    source, fmt = weights.source, weights.format
    report = load_state_dict_into(
        model,
        weights.state_dict,
        source,
        only_prefixes=BACKBONE_PREFIXES if backbone_only else (),
        source_names=weights.source_names,
    )
    report.format = fmt
    report.unused = weights.unused + report.unused
    report.ignored = list(weights.ignored)
    if not report.matched:
        raise CheckpointError(
            f"no tensor of {source} fits this model, read as {fmt} weights (model.depth right? the weights "
            f"format right?): {report.summary()}"
        )
    origin = weights.extras.get("converted_from")  # files written by tools/convert_weights.py
    origin_fmt = origin.get("format") if isinstance(origin, Mapping) and fmt == "detkit" else None
    warn_on_conventions(
        model, origin_fmt if origin_fmt in FORMATS else fmt, weights.file_state_dict, weights.extras, source
    )
    if report.shape_mismatch:
        logger.warning(
            "%s: skipped %d tensors whose shape differs from the model's (another num_classes? they keep "
            "their initialisation, as fine-tuning wants): %s",
            source,
            len(report.shape_mismatch),
            "; ".join(report.shape_mismatch),
        )
    if not backbone_only and fmt in ("msra", "torchvision"):
        logger.warning(
            "%s holds ImageNet backbone weights only (%s format): the RPN and box head keep their random "
            "initialisation; model.backbone.weights is the usual key for such files",
            source,
            fmt,
        )
    logger.info(report.summary())
    return report


def load_weights(
    model: nn.Module, path: str | os.PathLike, *, fmt: str = "auto", backbone_only: bool = False
) -> LoadReport:
    """Load a weights file of any format (FORMATS or "auto") into a detkit model.

    backbone_only: load only the stem, res2..res4 and res5 (ImageNet initialisation); other
    tensors of the file are reported unused and the heads are not reported missing.
    Tensors whose shape differs from the model's (another number of classes) are skipped with a
    warning; a warning also says when the model's input settings (channel order, pixel mean/std,
    stride_in_1x1) differ from those the weights expect. Raises CheckpointError when the file is
    unsafe or unreadable, or when no tensor fits at all.
    """
    return load_converted(model, read_weights(path, fmt), backbone_only=backbone_only)


# `model.backbone.weights: imagenet` means torchvision's ImageNet ResNet of `model.depth`.
IMAGENET_ALIAS = "imagenet"
TORCHVISION_IMAGENET = {depth: f"ResNet{depth}_Weights.IMAGENET1K_V1" for depth in (18, 34, 50, 101, 152)}
# Where the well-known ImageNet files come from, for the message when one is missing locally.
MSRA_URL = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/{name}"
KNOWN_DOWNLOADS = {
    "R-50.pkl": MSRA_URL.format(name="R-50.pkl"),
    "R-101.pkl": MSRA_URL.format(name="R-101.pkl"),
    "resnet18-f37072fd.pth": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34-b627a593.pth": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50-0676ba61.pth": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101-63fe2227.pth": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "resnet152-394f9c45.pth": "https://download.pytorch.org/models/resnet152-394f9c45.pth",
}


def resolve_backbone_weights(name: str, depth: int) -> str:
    """`model.backbone.weights` as load_backbone_weights takes it: "imagenet" becomes the torchvision
    enum name of `depth` (e.g. "ResNet101_Weights.IMAGENET1K_V1"); anything else is returned as is."""
    if name.strip().lower() != IMAGENET_ALIAS:
        return name
    if depth not in TORCHVISION_IMAGENET:
        raise CheckpointError(
            f"model.backbone.weights=imagenet: torchvision has no ImageNet ResNet-{depth}; use model.depth "
            f"{', '.join(map(str, TORCHVISION_IMAGENET))} or a local weights file"
        )
    return TORCHVISION_IMAGENET[depth]


def load_backbone_weights(model: nn.Module, path: str, fmt: str = "auto") -> LoadReport:
    """ImageNet ResNet weights into the stem, res2..res4 and res5: a local file in torchvision, MSRA,
    Detectron2 or detkit layout, or a torchvision enum name such as "ResNet101_Weights.IMAGENET1K_V1"
    (read from torchvision's cache, $TORCH_HOME/hub/checkpoints, and downloaded into it when missing
    and the machine is online)."""
    if not Path(path).exists() and path.startswith("ResNet") and "_Weights." in path:
        raw = torchvision_to_detkit(_torchvision_enum_state_dict(path))
        report = load_state_dict_into(model, raw, path, only_prefixes=BACKBONE_PREFIXES)
        report.format = "torchvision"
        if not report.matched:
            raise CheckpointError(f"no tensor of {path} fits the backbone (model.depth right?): {report.summary()}")
        warn_on_conventions(model, "torchvision", raw, {}, path)
        logger.info(report.summary())
        return report
    if not Path(path).exists():
        url = KNOWN_DOWNLOADS.get(Path(path).name)
        where = f"download {url} to {path}" if url else f"put the ImageNet weights file at {path}"
        raise CheckpointError(
            f"model.backbone.weights={path}: no such file; {where}, or set model.backbone.weights=imagenet "
            "(torchvision's ImageNet ResNet, downloaded once into its cache)"
        )
    return load_weights(model, path, fmt=fmt, backbone_only=True)


def load_detector_weights(model: nn.Module, path: str, fmt: str = "auto") -> LoadReport:
    """A full detector: a detkit checkpoint, or a Detectron2 model (model-zoo .pkl, training .pth).

    Heads whose shapes differ (another number of classes) are skipped with a warning, so
    fine-tuning on a new dataset works.
    """
    return load_weights(model, path, fmt=fmt, backbone_only=False)


def torchvision_to_detkit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ResNet state dict to detkit's names (fc.* is dropped)."""
    return convert_state_dict(state_dict, "torchvision", "detkit").state_dict


def _torchvision_enum_state_dict(name: str) -> Mapping[str, Tensor]:
    import torch.hub
    import torchvision.models as tvm

    enum_name, _, member = name.partition(".")
    try:
        weights = getattr(getattr(tvm, enum_name), member)
    except AttributeError:
        raise CheckpointError(
            f"model.backbone.weights={name!r} is neither a file nor a torchvision weights enum"
        ) from None
    # torchvision reads this file when it is there and downloads it there otherwise.
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        logger.info("downloading %s (%s) into %s", name, weights.url, cached)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # noqa: BLE001 - urllib, socket, SSL and hash errors all mean: no usable file here
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"cannot download the ImageNet weights {name} ({type(exc).__name__}: {reason}): download "
            f"{weights.url} to {cached} (torchvision's cache, read without network afterwards), or set "
            f"model.backbone.weights to a local copy of it"
        ) from None
