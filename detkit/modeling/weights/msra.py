"""MSRA/Caffe2 ImageNet ResNets (R-50.pkl, R-101.pkl): their names, and BN folded into scale + shift.

conv1_w, res_conv1_bn_s, res2_0_branch2a_w, res3_0_branch1_bn_b (_bn_rm / _bn_riv when unfolded);
backbone only. These weights expect BGR input with the pixel statistics below and the stride in
the 1x1 conv (Detectron2's defaults for them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from detkit.errors import CheckpointError
from detkit.modeling.weights.keys import NORM_PARAMS, NeutralKey

MSRA_PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)
MSRA_PIXEL_STD = (1.0, 1.0, 1.0)


class MsraNames:
    """MSRA/Caffe2: conv1_w, res_conv1_bn_{s,b}, resN_i_branch{2a,2b,2c,1}_w and _bn_{s,b}; BN
    unfolded files add _bn_rm / _bn_riv (names as Detectron2's c2_model_loading reads them)."""

    signature = re.compile(r"^(conv1_w|res_conv1_bn_|res[2-5]_\d+_branch)")
    ignored = re.compile(r"_momentum$|^fc1000_|^pred_[wb]$")  # solver state and the ImageNet classifier
    _BRANCH_TO_LAYER: ClassVar[dict[str, str]] = {"2a": "conv1", "2b": "conv2", "2c": "conv3", "1": "shortcut"}
    _LAYER_TO_BRANCH: ClassVar[dict[str, str]] = {v: k for k, v in _BRANCH_TO_LAYER.items()}
    _SUFFIX_TO_PARAM: ClassVar[dict[str, str]] = {
        "w": "weight",
        "bn_s": "norm.weight",
        "bn_b": "norm.bias",
        "bn_rm": "norm.running_mean",
        "bn_riv": "norm.running_var",
        "bn_gamma": "norm.weight",
        "bn_beta": "norm.bias",
        "bn_running_mean": "norm.running_mean",
        "bn_running_var": "norm.running_var",
        "gn_s": "norm.weight",
        "gn_b": "norm.bias",
    }
    _PARAM_TO_SUFFIX: ClassVar[dict[str, str]] = {
        "weight": "w",
        "norm.weight": "bn_s",
        "norm.bias": "bn_b",
        "norm.running_mean": "bn_rm",
        "norm.running_var": "bn_riv",
    }
    _suffixes = "|".join(sorted(_SUFFIX_TO_PARAM, key=len, reverse=True))
    _stem = re.compile(rf"^(?:conv1_(w)|res_conv1_({_suffixes}))$")
    _block = re.compile(rf"^res([2-5])_(\d+)_branch(2a|2b|2c|1)_({_suffixes})$")

    def parse(self, name: str) -> NeutralKey | None:
        m = self._stem.match(name)
        if m:
            if m.group(1):
                return NeutralKey("stem", 1, 0, "conv1", "weight")
            param = self._SUFFIX_TO_PARAM[m.group(2)]
            return NeutralKey("stem", 1, 0, "conv1", param) if param != "weight" else None
        m = self._block.match(name)
        if m:
            stage, block, branch, suffix = m.groups()
            return NeutralKey(
                "block", int(stage), int(block), self._BRANCH_TO_LAYER[branch], self._SUFFIX_TO_PARAM[suffix]
            )
        return None

    def name(self, key: NeutralKey) -> str | None:
        suffix = self._PARAM_TO_SUFFIX.get(key.param)
        if key.unit == "head" or suffix is None:
            return None
        if key.unit == "stem":
            return "conv1_w" if key.param == "weight" else f"res_conv1_{suffix}"
        return f"res{key.stage}_{key.block}_branch{self._LAYER_TO_BRANCH[key.layer]}_{suffix}"


def norm_units(keyed: Mapping[NeutralKey, Tensor]) -> set[tuple[str, int, int, str]]:
    return {(k.unit, k.stage, k.block, k.layer) for k in keyed if k.param.startswith("norm.")}


def fill_folded_bn_stats(keyed: dict[NeutralKey, Tensor], key_sources: dict[NeutralKey, str], eps: float) -> None:
    """Give each MSRA BN that has a scale but no statistics running_mean 0, running_var 1 - eps."""
    for unit in norm_units(keyed):
        scale_key = NeutralKey(*unit, "norm.weight")
        if scale_key not in keyed or "_bn_" not in key_sources.get(scale_key, ""):
            continue  # GroupNorm (_gn_s) has no statistics
        mean_key, var_key = NeutralKey(*unit, "norm.running_mean"), NeutralKey(*unit, "norm.running_var")
        scale = keyed[scale_key]
        if mean_key not in keyed:
            keyed[mean_key] = torch.zeros_like(scale, dtype=torch.float32)
            key_sources[mean_key] = "<filled: 0>"
        if var_key not in keyed:
            keyed[var_key] = torch.full_like(scale, 1.0 - eps, dtype=torch.float32)
            key_sources[var_key] = "<filled: 1 - eps>"


def fold_bn_to_scale_shift(keyed: Mapping[NeutralKey, Tensor], eps: float) -> dict[NeutralKey, Tensor]:
    """Replace each BN's four tensors by Caffe2's scale (norm.weight) and shift (norm.bias)."""
    out = {k: v for k, v in keyed.items() if not k.param.startswith("norm.")}
    for unit in norm_units(keyed):
        try:
            weight, bias, mean, var = (keyed[NeutralKey(*unit, "norm." + p)].float() for p in NORM_PARAMS)
        except KeyError:
            raise CheckpointError(
                f"cannot fold the norm of {unit}: MSRA export needs BatchNorm weight, bias, running_mean and running_var"
            ) from None
        scale = weight * (var + eps).rsqrt()  # the same float32 ops as FrozenBatchNorm2d.forward
        out[NeutralKey(*unit, "norm.weight")] = scale
        out[NeutralKey(*unit, "norm.bias")] = bias - mean * scale
    return out
