"""Any weights format into any other: recognise a file's format, rename every tensor through the
format-neutral key, fold or unfold MSRA's BN on the way.

    conversion = convert_state_dict(state_dict, "detectron2", "detkit")   # .state_dict, .unused, ...
    export_state_dict(model, "msra")                                       # a detkit model, as MSRA names it
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn

from detkit.errors import CheckpointError
from detkit.modeling.weights.detectron2 import Detectron2Names
from detkit.modeling.weights.keys import NamingScheme, NeutralKey
from detkit.modeling.weights.msra import MsraNames, fill_folded_bn_stats, fold_bn_to_scale_shift
from detkit.modeling.weights.torch_style import DETKIT_NAMES, TORCHVISION_NAMES

FORMATS = ("detkit", "detectron2", "msra", "torchvision")

# eps of detkit's (and Detectron2's) FrozenBatchNorm2d / nn.BatchNorm2d.
BN_EPS = 1e-5

SCHEMES: dict[str, NamingScheme] = {
    "detkit": DETKIT_NAMES,
    "torchvision": TORCHVISION_NAMES,
    "detectron2": Detectron2Names(),
    "msra": MsraNames(),
}


def detect_format(names: Mapping[str, Any] | list[str], source: str = "the checkpoint") -> str:
    """The format (FORMATS) whose own names the checkpoint uses most; CheckpointError if none."""
    names = list(names)
    counts = {fmt: sum(1 for n in names if scheme.signature.search(n)) for fmt, scheme in SCHEMES.items()}
    best = max(FORMATS, key=lambda fmt: counts[fmt])  # ties: the first in FORMATS (detkit)
    if counts[best] == 0:
        # A file with only the box predictor (same names in detkit and Detectron2) is detkit's.
        if any(SCHEMES["detkit"].parse(n) is not None for n in names):
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
    ignored: list[str]  # file names known to carry nothing for detection (a scheme's `ignored`)


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
    if src not in SCHEMES or dst not in SCHEMES:
        raise CheckpointError(
            f"unknown weights format {src if src not in SCHEMES else dst!r}: use one of {', '.join(FORMATS)}"
        )
    parse, ignored_pattern = SCHEMES[src].parse, SCHEMES[src].ignored
    keyed: dict[NeutralKey, Tensor] = {}
    key_sources: dict[NeutralKey, str] = {}
    unused: list[str] = []
    ignored: list[str] = []
    for name, value in state_dict.items():
        key = parse(name)
        if key is None or key.param.endswith("num_batches_tracked"):  # a BN counter: no weight
            (ignored if key is not None or ignored_pattern.search(name) else unused).append(name)
            continue
        keyed[key] = value
        key_sources[key] = name

    if src == "msra":
        fill_folded_bn_stats(keyed, key_sources, bn_eps)
    if dst == "msra" and fold_bn:
        keyed = fold_bn_to_scale_shift(keyed, bn_eps)

    out: dict[str, Tensor] = {}
    source_names: dict[str, str] = {}
    for key, value in keyed.items():
        new_name = SCHEMES[dst].name(key)
        if new_name is None:
            continue
        out[new_name] = value
        source_names[new_name] = key_sources.get(key, "<folded>")
    return Conversion(out, source_names, unused, ignored)


def export_state_dict(
    model_or_state_dict: nn.Module | Mapping[str, Tensor], fmt: str, *, fold_bn: bool = True
) -> dict[str, Tensor]:
    """A detkit model's tensors named as `fmt` names them (see `convert_state_dict`).

    detectron2 keeps everything; msra and torchvision hold the backbone (stem, res2..res5) only.
    Save the result with torch.save, or as a pickle of numpy arrays as the model zoos do.
    """
    state_dict = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    return convert_state_dict(state_dict, "detkit", fmt, fold_bn=fold_bn).state_dict
