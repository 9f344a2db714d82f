"""Load pretrained weights into a detkit model, whatever toolkit wrote them, with one report.

Formats (`fmt`; "auto" recognises each by its tensor names):

| fmt         | what                                   | example names                                      |
| ----------- | -------------------------------------- | -------------------------------------------------- |
| detkit      | detkit checkpoints / state dicts       | backbone.layer1.0.conv1.weight, rpn.head.conv.bias |
| detectron2  | Detectron2 models (model-zoo .pkl of   | backbone.res2.0.conv1.norm.weight,                 |
|             | numpy arrays, training .pth), and its  | proposal_generator.rpn_head.anchor_deltas.weight,  |
|             | converted backbones (no "backbone.")   | roi_heads.res5.0.shortcut.weight, stem.conv1.weight|
| msra        | MSRA/Caffe2 ImageNet ResNets (R-50.pkl,| conv1_w, res_conv1_bn_s, res2_0_branch2a_w,        |
|             | R-101.pkl), backbone only              | res3_0_branch1_bn_b (_bn_rm/_bn_riv when unfolded) |
| torchvision | torchvision ImageNet ResNets, backbone | conv1.weight, bn1.running_var, layer4.2.conv3.weight|

Stages: detkit `backbone.layer1..layer3` = Detectron2 `res2..res4` = MSRA `res2..res4` =
torchvision `layer1..layer3`; detkit `roi_heads.res5` = Detectron2 `roi_heads.res5` = MSRA `res5` =
torchvision `layer4`. In a block, detkit/torchvision `conv{j}`, `bn{j}`, `downsample.0/1` are
Detectron2 `conv{j}`, `conv{j}.norm`, `shortcut`, `shortcut.norm` and MSRA `branch2{a,b,c}`,
`branch1`. The classifier has K + 1 rows with background last in both detkit and Detectron2, so
the box predictor is copied as is.

Every name is translated through one format-neutral key (`_Key`), so the same tables turn a detkit
model into any of the other layouts (`export_state_dict`), which is how the tests build checkpoints.

Files: `.pth` / zip files load with `torch.load(weights_only=True)`; pickles (`.pkl`) with
`detkit.modeling.safe_pickle.load_pickle`, which builds numpy arrays and plain containers only.
No code in a weights file can run.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from detkit.errors import CheckpointError
from detkit.modeling.safe_pickle import load_pickle

logger = logging.getLogger(__name__)

FORMATS = ("detkit", "detectron2", "msra", "torchvision")
BACKBONE_PREFIXES = ("backbone.", "roi_heads.res5.")

# MSRA/Caffe2 detection weights expect these (Detectron2's defaults for them).
MSRA_PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)
MSRA_PIXEL_STD = (1.0, 1.0, 1.0)

# eps of detkit's (and Detectron2's) FrozenBatchNorm2d / nn.BatchNorm2d.
BN_EPS = 1e-5

# torch.save's legacy (non-zip) format starts with a pickle of this number.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


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


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


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
            "Only files of tensors and plain containers are loaded (no pickled objects can run)."
        ) from None


def read_weights_file(path: str | os.PathLike) -> object:
    """The object in a weights file, read without running code from it.

    torch.save files (zip, or the legacy format) go through `torch.load(weights_only=True)`;
    anything else is read as a pickle by `safe_pickle.load_pickle` (numpy arrays only).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path} (give a local path; nothing is downloaded here)")
    if zipfile.is_zipfile(path):
        return read_torch_file(path)
    obj = load_pickle(path)
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
        return read_torch_file(path)
    return obj


def state_dict_from_checkpoint(obj: object, source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a loaded file into its tensors and everything else.

    Takes `obj["model"]` (Detectron2 and detkit checkpoints), `obj["blobs"]` (Caffe2 detection
    files), `obj["state_dict"]`, or `obj` itself. numpy arrays become tensors (sharing memory);
    non-array entries of the weights dict are dropped. Returns (state dict, the other top-level
    entries of the file, e.g. "__author__", "iteration").
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} does not hold a dict of weights (got {type(obj).__name__})")
    extras: dict[str, Any] = {}
    weights: Any = obj
    for key in ("model", "blobs", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            weights = obj[key]
            extras = {k: v for k, v in obj.items() if k != key}
            break
    state_dict: dict[str, Tensor] = {}
    for name, value in weights.items():
        if isinstance(value, np.ndarray):
            if value.dtype == object or not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
                raise CheckpointError(f"{source}: {name} is a numpy array of {value.dtype}, not numbers")
            # torch.from_numpy wants a writable array in native byte order (protocol-5 pickles give
            # read-only arrays over the file's bytes; big-endian files exist).
            native = value.dtype.newbyteorder("=")
            value = np.ascontiguousarray(value)
            if value.dtype != native or not value.flags.writeable:
                value = value.astype(native)
            value = torch.from_numpy(value)
        if isinstance(value, Tensor):
            state_dict[str(name)] = value
    if not state_dict:
        keys = ", ".join(list(map(str, weights.keys()))[:6])
        raise CheckpointError(f"{source} holds no tensors or numpy arrays (top-level keys: {keys})")
    return state_dict, extras


# --------------------------------------------------------------------------------------------
# Names: every format <-> one neutral key
# --------------------------------------------------------------------------------------------

# "norm.*" params of a norm layer; running stats exist for BatchNorm kinds only.
_NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")


class _Key(NamedTuple):
    """A tensor's meaning, independent of naming.

    Backbone: unit "stem" (stage 1, block 0) or "block" (stage 2..5 = res2..res5, block index),
    layer "conv1".."conv3" | "shortcut", param "weight" (the conv) | "norm.<weight|bias|running_mean|
    running_var|num_batches_tracked>". Heads: unit "head", layer = the detkit module path
    ("rpn.head.conv", "roi_heads.box_predictor.cls_score"), param "weight" | "bias".
    """

    unit: str
    stage: int
    block: int
    layer: str
    param: str


_P = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_RPN_LAYERS = r"(?:conv|objectness_logits|anchor_deltas)"
_PREDICTOR_LAYERS = r"(?:cls_score|bbox_pred)"
_HEADS_DETKIT = rf"(rpn\.head\.{_RPN_LAYERS}|roi_heads\.box_predictor\.{_PREDICTOR_LAYERS})\.(weight|bias)"


class _TorchStyle:
    """detkit and torchvision: conv1/bn1 stem, layerN.i.{convJ, bnJ, downsample.0/1}."""

    def __init__(self, stem_prefix: str, stage_prefixes: dict[int, str], heads: bool):
        self.stem_prefix = stem_prefix
        self.stage_prefixes = stage_prefixes
        self.prefix_stage = {v: k for k, v in stage_prefixes.items()}
        self.heads = heads
        stages = "|".join(re.escape(p) for p in stage_prefixes.values())
        self._stem = re.compile(rf"^{re.escape(stem_prefix)}(conv1\.weight|bn1\.{_P})$")
        self._block = re.compile(
            rf"^({stages})\.(\d+)\.(?:conv([123])\.weight|bn([123])\.{_P}|downsample\.0\.weight|downsample\.1\.{_P})$"
        )
        self._head = re.compile(rf"^{_HEADS_DETKIT}$")

    def parse(self, name: str) -> Optional[_Key]:
        m = self._stem.match(name)
        if m:
            return _Key("stem", 1, 0, "conv1", "weight" if m.group(1) == "conv1.weight" else "norm." + m.group(2))
        m = self._block.match(name)
        if m:
            prefix, block, conv_j, bn_j, bn_param, ds_param = m.groups()
            stage = self.prefix_stage[prefix]
            if conv_j:
                return _Key("block", stage, int(block), f"conv{conv_j}", "weight")
            if bn_j:
                return _Key("block", stage, int(block), f"conv{bn_j}", "norm." + bn_param)
            return _Key("block", stage, int(block), "shortcut", "norm." + ds_param if ds_param else "weight")
        if self.heads:
            m = self._head.match(name)
            if m:
                return _Key("head", 0, 0, m.group(1), m.group(2))
        return None

    def name(self, key: _Key) -> Optional[str]:
        if key.unit == "head":
            return f"{key.layer}.{key.param}" if self.heads else None
        norm = key.param.startswith("norm.")
        param = key.param[len("norm."):] if norm else key.param
        if key.unit == "stem":
            return f"{self.stem_prefix}bn1.{param}" if norm else f"{self.stem_prefix}conv1.weight"
        prefix = f"{self.stage_prefixes[key.stage]}.{key.block}"
        if key.layer == "shortcut":
            return f"{prefix}.downsample.1.{param}" if norm else f"{prefix}.downsample.0.weight"
        j = key.layer[-1]
        return f"{prefix}.bn{j}.{param}" if norm else f"{prefix}.conv{j}.weight"


class _Detectron2:
    """Detectron2: backbone.stem.conv1(.norm), backbone.resN.i.{convJ(.norm), shortcut(.norm)},
    roi_heads.res5, proposal_generator.rpn_head, roi_heads.box_predictor. Backbone files converted
    for Detectron2 (e.g. by its convert-torchvision-to-d2.py) have no "backbone." / "roi_heads."."""

    _stem = re.compile(rf"^(?:backbone\.)?stem\.conv1\.(?:weight|norm\.{_P})$")
    _block = re.compile(rf"^(?:backbone\.|roi_heads\.)?res([2-5])\.(\d+)\.(conv[123]|shortcut)\.(?:weight|norm\.{_P})$")
    _head = re.compile(
        rf"^(proposal_generator\.rpn_head\.{_RPN_LAYERS}|roi_heads\.box_predictor\.{_PREDICTOR_LAYERS})\.(weight|bias)$"
    )

    def parse(self, name: str) -> Optional[_Key]:
        m = self._stem.match(name)
        if m:
            return _Key("stem", 1, 0, "conv1", "norm." + m.group(1) if m.group(1) else "weight")
        m = self._block.match(name)
        if m:
            stage, block, layer, norm_param = m.groups()
            if (stage == "5") != name.startswith(("roi_heads.", "res5.")):
                return None  # res5 lives in the RoI head; "backbone.res5" is another architecture
            return _Key("block", int(stage), int(block), layer, "norm." + norm_param if norm_param else "weight")
        m = self._head.match(name)
        if m:
            layer = m.group(1).replace("proposal_generator.rpn_head.", "rpn.head.")
            return _Key("head", 0, 0, layer, m.group(2))
        return None

    def name(self, key: _Key) -> Optional[str]:
        if key.unit == "head":
            return f"{key.layer.replace('rpn.head.', 'proposal_generator.rpn_head.')}.{key.param}"
        if key.unit == "stem":
            return f"backbone.stem.conv1.{key.param}"
        module = "roi_heads.res5" if key.stage == 5 else f"backbone.res{key.stage}"
        return f"{module}.{key.block}.{key.layer}.{key.param}"


class _Msra:
    """MSRA/Caffe2: conv1_w, res_conv1_bn_{s,b}, resN_i_branch{2a,2b,2c,1}_w and _bn_{s,b}; BN
    unfolded files add _bn_rm / _bn_riv (names as Detectron2's c2_model_loading reads them)."""

    _BRANCH_TO_LAYER = {"2a": "conv1", "2b": "conv2", "2c": "conv3", "1": "shortcut"}
    _LAYER_TO_BRANCH = {v: k for k, v in _BRANCH_TO_LAYER.items()}
    _SUFFIX_TO_PARAM = {
        "w": "weight",
        "bn_s": "norm.weight", "bn_b": "norm.bias", "bn_rm": "norm.running_mean", "bn_riv": "norm.running_var",
        "bn_gamma": "norm.weight", "bn_beta": "norm.bias",
        "bn_running_mean": "norm.running_mean", "bn_running_var": "norm.running_var",
        "gn_s": "norm.weight", "gn_b": "norm.bias",
    }
    _PARAM_TO_SUFFIX = {
        "weight": "w", "norm.weight": "bn_s", "norm.bias": "bn_b",
        "norm.running_mean": "bn_rm", "norm.running_var": "bn_riv",
    }
    _suffixes = "|".join(sorted(_SUFFIX_TO_PARAM, key=len, reverse=True))
    _stem = re.compile(rf"^(?:conv1_(w)|res_conv1_({_suffixes}))$")
    _block = re.compile(rf"^res([2-5])_(\d+)_branch(2a|2b|2c|1)_({_suffixes})$")

    def parse(self, name: str) -> Optional[_Key]:
        m = self._stem.match(name)
        if m:
            if m.group(1):
                return _Key("stem", 1, 0, "conv1", "weight")
            param = self._SUFFIX_TO_PARAM[m.group(2)]
            return _Key("stem", 1, 0, "conv1", param) if param != "weight" else None
        m = self._block.match(name)
        if m:
            stage, block, branch, suffix = m.groups()
            return _Key("block", int(stage), int(block), self._BRANCH_TO_LAYER[branch], self._SUFFIX_TO_PARAM[suffix])
        return None

    def name(self, key: _Key) -> Optional[str]:
        suffix = self._PARAM_TO_SUFFIX.get(key.param)
        if key.unit == "head" or suffix is None:
            return None
        if key.unit == "stem":
            return "conv1_w" if key.param == "weight" else f"res_conv1_{suffix}"
        return f"res{key.stage}_{key.block}_branch{self._LAYER_TO_BRANCH[key.layer]}_{suffix}"


_SCHEMES = {
    "detkit": _TorchStyle(
        "backbone.", {2: "backbone.layer1", 3: "backbone.layer2", 4: "backbone.layer3", 5: "roi_heads.res5"}, heads=True
    ),
    "torchvision": _TorchStyle("", {2: "layer1", 3: "layer2", 4: "layer3", 5: "layer4"}, heads=False),
    "detectron2": _Detectron2(),
    "msra": _Msra(),
}

# File keys that carry no detection weights: ImageNet classifiers, solver state, constants.
_IGNORED = {
    "detkit": re.compile(r"^$"),
    "torchvision": re.compile(r"^fc\."),
    "detectron2": re.compile(r"^(pixel_mean|pixel_std)$|anchor_generator\.cell_anchors"),
    "msra": re.compile(r"_momentum$|^fc1000_|^pred_[wb]$"),
}

# Names that only one format uses, to recognise a file's format ("roi_heads.*" is shared by
# detkit and Detectron2 and so decides nothing).
_SIGNATURES = {
    "detkit": re.compile(r"^(backbone\.(conv1|bn1|layer[1-3])\.|rpn\.head\.|roi_heads\.res5\.\d+\.(bn[123]|downsample)\.)"),
    "detectron2": re.compile(
        r"^(backbone\.)?(stem\.conv1\.|res[2-4]\.\d+\.)|^proposal_generator\.|^(roi_heads\.)?res5\.\d+\.(shortcut|conv[123]\.norm)\."
    ),
    "msra": re.compile(r"^(conv1_w|res_conv1_bn_|res[2-5]_\d+_branch)"),
    "torchvision": re.compile(r"^(conv1\.weight|bn1\.|layer[1-4]\.\d+\.)"),
}


def detect_format(names: Union[Mapping[str, Any], list[str]], source: str = "the checkpoint") -> str:
    """The format (FORMATS) whose own names the checkpoint uses most; CheckpointError if none."""
    names = list(names)
    counts = {fmt: sum(1 for n in names if pattern.search(n)) for fmt, pattern in _SIGNATURES.items()}
    best = max(FORMATS, key=lambda fmt: counts[fmt])  # ties: the first in FORMATS (detkit)
    if counts[best] == 0:
        # A file with only the box predictor (same names in detkit and Detectron2) is detkit's.
        if any(_SCHEMES["detkit"].parse(n) is not None for n in names):
            return "detkit"
        shown = ", ".join(names[:5])
        raise CheckpointError(
            f"cannot tell the layout of {source} from its tensor names ({shown}, ...): expected detkit, "
            "Detectron2 (backbone.res2.0.conv1.weight), MSRA/Caffe2 (res2_0_branch2a_w) or torchvision "
            "(layer1.0.conv1.weight) names"
        )
    return best


class Conversion(NamedTuple):
    """`convert_state_dict`'s result: the renamed tensors and what happened to the others."""

    state_dict: dict[str, Tensor]
    source_names: dict[str, str]  # new name -> the file's name (synthesised tensors: "<filled>")
    unused: list[str]  # file names no key of the target format means
    ignored: list[str]  # file names known to carry nothing for detection (see _IGNORED)


def convert_state_dict(
    state_dict: Mapping[str, Tensor], src: str, dst: str = "detkit", *, fold_bn: bool = True, bn_eps: float = BN_EPS
) -> Conversion:
    """Rename (and where needed transform) the tensors of one format into another.

    src, dst: FORMATS. MSRA files with folded BN (only `_bn_s` scale and `_bn_b` shift) get
    running_mean 0 and running_var 1 - eps, so that the FrozenBatchNorm2d scale
    weight * rsqrt(running_var + eps) is exactly s (1 - 1e-5 + 1e-5 is 1.0 in float32) and the
    layer computes x * s + b as Caffe2's AffineChannel did; Detectron2's FrozenBatchNorm2d keeps the
    same 1 - eps init for these files. Exporting to msra with `fold_bn` writes that folded form
    (s = weight * rsqrt(var + eps), b = bias - mean * s, computed as FrozenBatchNorm2d does), else
    _bn_rm / _bn_riv beside _bn_s / _bn_b. Tensors the target format has no name for (the heads, for
    msra and torchvision) are left out.
    """
    if src not in _SCHEMES or dst not in _SCHEMES:
        raise CheckpointError(f"unknown weights format {src if src not in _SCHEMES else dst!r}: use one of {', '.join(FORMATS)}")
    parse, ignored_pattern = _SCHEMES[src].parse, _IGNORED[src]
    keyed: dict[_Key, Tensor] = {}
    key_sources: dict[_Key, str] = {}
    unused, ignored = [], []
    for name, value in state_dict.items():
        key = parse(name)
        if key is None or key.param.endswith("num_batches_tracked"):  # a BN counter: no weight
            (ignored if key is not None or ignored_pattern.search(name) else unused).append(name)
            continue
        keyed[key] = value
        key_sources[key] = name

    if src == "msra":
        _fill_folded_bn_stats(keyed, key_sources, bn_eps)
    if dst == "msra" and fold_bn:
        keyed = _fold_bn(keyed, bn_eps)

    out: dict[str, Tensor] = {}
    source_names: dict[str, str] = {}
    for key, value in keyed.items():
        new_name = _SCHEMES[dst].name(key)
        if new_name is None:
            continue
        out[new_name] = value
        source_names[new_name] = key_sources.get(key, "<folded>")
    return Conversion(out, source_names, unused, ignored)


def _norm_units(keyed: Mapping[_Key, Tensor]) -> set[tuple]:
    return {(k.unit, k.stage, k.block, k.layer) for k in keyed if k.param.startswith("norm.")}


def _fill_folded_bn_stats(keyed: dict[_Key, Tensor], key_sources: dict[_Key, str], eps: float) -> None:
    """Give each MSRA BN that has a scale but no statistics running_mean 0, running_var 1 - eps."""
    for unit in _norm_units(keyed):
        scale_key = _Key(*unit, "norm.weight")
        if scale_key not in keyed or "_bn_" not in key_sources.get(scale_key, ""):
            continue  # GroupNorm (_gn_s) has no statistics
        mean_key, var_key = _Key(*unit, "norm.running_mean"), _Key(*unit, "norm.running_var")
        scale = keyed[scale_key]
        if mean_key not in keyed:
            keyed[mean_key] = torch.zeros_like(scale, dtype=torch.float32)
            key_sources[mean_key] = "<filled: 0>"
        if var_key not in keyed:
            keyed[var_key] = torch.full_like(scale, 1.0 - eps, dtype=torch.float32)
            key_sources[var_key] = "<filled: 1 - eps>"


def _fold_bn(keyed: Mapping[_Key, Tensor], eps: float) -> dict[_Key, Tensor]:
    """Replace each BN's four tensors by Caffe2's scale (norm.weight) and shift (norm.bias)."""
    out = {k: v for k, v in keyed.items() if not k.param.startswith("norm.")}
    for unit in _norm_units(keyed):
        try:
            weight, bias, mean, var = (keyed[_Key(*unit, "norm." + p)].float() for p in _NORM_PARAMS)
        except KeyError:
            raise CheckpointError(
                f"cannot fold the norm of {unit}: MSRA export needs BatchNorm weight, bias, running_mean and running_var"
            ) from None
        scale = weight * (var + eps).rsqrt()  # the same float32 ops as FrozenBatchNorm2d.forward
        out[_Key(*unit, "norm.weight")] = scale
        out[_Key(*unit, "norm.bias")] = bias - mean * scale
    return out


def export_state_dict(
    model_or_state_dict: Union[nn.Module, Mapping[str, Tensor]], fmt: str, *, fold_bn: bool = True
) -> dict[str, Tensor]:
    """A detkit model's tensors named as `fmt` names them (see `convert_state_dict`).

    detectron2 keeps everything; msra and torchvision hold the backbone (stem, res2..res5) only.
    Save the result with torch.save, or as a pickle of numpy arrays as the model zoos do.
    """
    state_dict = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    return convert_state_dict(state_dict, "detkit", fmt, fold_bn=fold_bn).state_dict


# --------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------


def load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    only_prefixes: tuple[str, ...] = (),
    source_names: Optional[Mapping[str, str]] = None,
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
    def num_classes(self) -> Optional[int]:
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
        detected: Optional[str] = detect_format(raw, source)
    except CheckpointError:
        if fmt == "auto":
            raise
        detected = None
    fmt = detected if fmt == "auto" else fmt
    if fmt == "detkit":
        conversion = Conversion(dict(raw), {k: k for k in raw}, [], [])
    else:
        conversion = convert_state_dict(raw, fmt, "detkit")
    if not conversion.state_dict:
        hint = f"; its names look like {detected} weights" if detected and detected != fmt else ""
        raise CheckpointError(f"{source} holds no tensor that {fmt} weights name{hint} (first names: {', '.join(list(raw)[:4])})")
    if detected and detected != fmt:
        logger.warning("%s: read as %s weights as asked, but its names look like %s weights", source, fmt, detected)
    return ConvertedWeights(
        source=source, format=fmt, state_dict=conversion.state_dict, source_names=conversion.source_names,
        unused=conversion.unused, ignored=conversion.ignored, file_state_dict=raw, extras=extras,
    )


def load_converted(model: nn.Module, weights: ConvertedWeights, *, backbone_only: bool = False) -> LoadReport:
    """Copy `read_weights`'s tensors into a detkit model and report; see `load_weights`."""
    source, fmt = weights.source, weights.format
    report = load_state_dict_into(
        model, weights.state_dict, source,
        only_prefixes=BACKBONE_PREFIXES if backbone_only else (), source_names=weights.source_names,
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
    _warn_on_conventions(model, origin_fmt if origin_fmt in FORMATS else fmt, weights.file_state_dict, weights.extras, source)
    if report.shape_mismatch:
        logger.warning(
            "%s: skipped %d tensors whose shape differs from the model's (another num_classes? they keep "
            "their initialisation, as fine-tuning wants): %s",
            source, len(report.shape_mismatch), "; ".join(report.shape_mismatch),
        )
    if not backbone_only and fmt in ("msra", "torchvision"):
        logger.warning(
            "%s holds ImageNet backbone weights only (%s format): the RPN and box head keep their random "
            "initialisation; model.backbone.weights is the usual key for such files", source, fmt,
        )
    logger.info(report.summary())
    return report


def load_weights(model: nn.Module, path: str | os.PathLike, *, fmt: str = "auto", backbone_only: bool = False) -> LoadReport:
    """Load a weights file of any format (FORMATS or "auto") into a detkit model.

    backbone_only: load only the stem, res2..res4 and res5 (ImageNet initialisation); other
    tensors of the file are reported unused and the heads are not reported missing.
    Tensors whose shape differs from the model's (another number of classes) are skipped with a
    warning; a warning also says when the model's input settings (channel order, pixel mean/std,
    stride_in_1x1) differ from those the weights expect. Raises CheckpointError when the file is
    unsafe or unreadable, or when no tensor fits at all.
    """
    return load_converted(model, read_weights(path, fmt), backbone_only=backbone_only)


def load_backbone_weights(model: nn.Module, path: str, fmt: str = "auto") -> LoadReport:
    """ImageNet ResNet weights into the stem, res2..res4 and res5: a local file in torchvision, MSRA,
    Detectron2 or detkit layout, or a torchvision enum name such as "ResNet101_Weights.IMAGENET1K_V1"
    (downloaded by torchvision when the machine is online)."""
    if not Path(path).exists() and path.startswith("ResNet") and "_Weights." in path:
        raw = torchvision_to_detkit(_torchvision_enum_state_dict(path))
        report = load_state_dict_into(model, raw, path, only_prefixes=BACKBONE_PREFIXES)
        report.format = "torchvision"
        if not report.matched:
            raise CheckpointError(f"no tensor of {path} fits the backbone (model.depth right?): {report.summary()}")
        _warn_on_conventions(model, "torchvision", raw, {}, path)
        logger.info(report.summary())
        return report
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


# --------------------------------------------------------------------------------------------
# Input conventions: weights only give their results with the input they were trained on
# --------------------------------------------------------------------------------------------


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


def _warn_on_conventions(model: nn.Module, fmt: str, raw: Mapping[str, Tensor], extras: Mapping[str, Any], source: str) -> None:
    """Log a warning when the model's input settings differ from those the weights were trained with."""
    have = model_conventions(model)
    want: dict[str, Any] = {}
    if fmt == "msra":
        want = {"input_format": "BGR", "pixel_mean": MSRA_PIXEL_MEAN_BGR, "pixel_std": MSRA_PIXEL_STD, "stride_in_1x1": True}
    elif fmt == "torchvision":
        want = {"input_format": "RGB", "stride_in_1x1": False}
    elif fmt == "detectron2":
        for name in ("pixel_mean", "pixel_std"):  # old Detectron2 checkpoints store them
            if name in raw:
                want[name] = tuple(round(float(v), 4) for v in raw[name].flatten())
        if "Detectron2 Model Zoo" in str(extras.get("__author__", "")):
            # The zoo's R50/R101 models start from MSRA weights (Detectron2's defaults).
            want = {"input_format": "BGR", "pixel_mean": MSRA_PIXEL_MEAN_BGR, "pixel_std": MSRA_PIXEL_STD,
                    "stride_in_1x1": True, **want}
    differ = []
    for key, value in want.items():
        if have.get(key) is None:
            continue
        expected = tuple(round(float(v), 4) for v in value) if isinstance(value, tuple) else value
        if have[key] != expected:
            differ.append(f"{key}: model {have[key]}, weights {expected}")
    if differ:
        keys = {"input_format": "model.input_format", "pixel_mean": "model.pixel_mean", "pixel_std": "model.pixel_std",
                "stride_in_1x1": "model.backbone.stride_in_1x1"}
        logger.warning(
            "%s (%s weights) was trained with other input settings than this model's, so its outputs will be off: "
            "%s. Set %s as the weights expect (as %s does).",
            source, fmt, "; ".join(differ), ", ".join(keys[d.split(":")[0]] for d in differ), _EXAMPLE_CONFIG[fmt],
        )
