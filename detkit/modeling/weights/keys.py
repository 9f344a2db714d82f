"""The format-neutral key every tensor name is translated through, and what each naming scheme provides.

A scheme (one file per format: torch_style.py for detkit and torchvision, detectron2.py, msra.py)
parses its own names into `NeutralKey`s and names keys back, so any format converts into any other
through one table per format (convert.py).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Protocol

# "norm.*" params of a norm layer; running stats exist for BatchNorm kinds only.
NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")

# Name pieces the schemes share.
PARAM = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
RPN_LAYERS = r"(?:conv|objectness_logits|anchor_deltas)"
PREDICTOR_LAYERS = r"(?:cls_score|bbox_pred)"


class NeutralKey(NamedTuple):
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


class NamingScheme(Protocol):
    """One format's names.

    signature: matches names only this format uses, to recognise a file's format ("roi_heads.*" is
    shared by detkit and Detectron2 and so decides nothing);
    ignored: matches file names that carry nothing for detection (ImageNet classifier, solver state).
    """

    signature: re.Pattern
    ignored: re.Pattern

    def parse(self, name: str) -> NeutralKey | None: ...

    def name(self, key: NeutralKey) -> str | None: ...
