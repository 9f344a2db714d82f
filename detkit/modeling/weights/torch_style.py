"""detkit's and torchvision's names: conv1/bn1 stem, layerN.i.{convJ, bnJ, downsample.0/1}.

detkit: backbone.conv1.weight, backbone.layer1.0.bn1.running_var, roi_heads.res5.0.downsample.0.weight,
rpn.head.conv.bias, roi_heads.box_predictor.cls_score.weight. torchvision ImageNet ResNets: the same
without "backbone.", layer4 for res5, no heads.
"""

from __future__ import annotations

import re

from detkit.modeling.weights.keys import PARAM, PREDICTOR_LAYERS, RPN_LAYERS, NeutralKey

_HEADS = rf"(rpn\.head\.{RPN_LAYERS}|roi_heads\.box_predictor\.{PREDICTOR_LAYERS})\.(weight|bias)"


class TorchStyleNames:
    """detkit and torchvision: conv1/bn1 stem, layerN.i.{convJ, bnJ, downsample.0/1}."""

    def __init__(self, stem_prefix: str, stage_prefixes: dict[int, str], heads: bool, signature: str, ignored: str):
        self.signature = re.compile(signature)
        self.ignored = re.compile(ignored)
        self.stem_prefix = stem_prefix
        self.stage_prefixes = stage_prefixes
        self.prefix_stage = {v: k for k, v in stage_prefixes.items()}
        self.heads = heads
        stages = "|".join(re.escape(p) for p in stage_prefixes.values())
        self._stem = re.compile(rf"^{re.escape(stem_prefix)}(conv1\.weight|bn1\.{PARAM})$")
        self._block = re.compile(
            rf"^({stages})\.(\d+)\.(?:conv([123])\.weight|bn([123])\.{PARAM}|downsample\.0\.weight|downsample\.1\.{PARAM})$"
        )
        self._head = re.compile(rf"^{_HEADS}$")

    def parse(self, name: str) -> NeutralKey | None:
        m = self._stem.match(name)
        if m:
            return NeutralKey("stem", 1, 0, "conv1", "weight" if m.group(1) == "conv1.weight" else "norm." + m.group(2))
        m = self._block.match(name)
        if m:
            prefix, block, conv_j, bn_j, bn_param, ds_param = m.groups()
            stage = self.prefix_stage[prefix]
            if conv_j:
                return NeutralKey("block", stage, int(block), f"conv{conv_j}", "weight")
            if bn_j:
                return NeutralKey("block", stage, int(block), f"conv{bn_j}", "norm." + bn_param)
            return NeutralKey("block", stage, int(block), "shortcut", "norm." + ds_param if ds_param else "weight")
        if self.heads:
            m = self._head.match(name)
            if m:
                return NeutralKey("head", 0, 0, m.group(1), m.group(2))
        return None

    def name(self, key: NeutralKey) -> str | None:
        if key.unit == "head":
            return f"{key.layer}.{key.param}" if self.heads else None
        norm = key.param.startswith("norm.")
        param = key.param[len("norm.") :] if norm else key.param
        if key.unit == "stem":
            return f"{self.stem_prefix}bn1.{param}" if norm else f"{self.stem_prefix}conv1.weight"
        prefix = f"{self.stage_prefixes[key.stage]}.{key.block}"
        if key.layer == "shortcut":
            return f"{prefix}.downsample.1.{param}" if norm else f"{prefix}.downsample.0.weight"
        j = key.layer[-1]
        return f"{prefix}.bn{j}.{param}" if norm else f"{prefix}.conv{j}.weight"


DETKIT_NAMES = TorchStyleNames(
    "backbone.",
    {2: "backbone.layer1", 3: "backbone.layer2", 4: "backbone.layer3", 5: "roi_heads.res5"},
    heads=True,
    signature=r"^(backbone\.(conv1|bn1|layer[1-3])\.|rpn\.head\.|roi_heads\.res5\.\d+\.(bn[123]|downsample)\.)",
    ignored=r"^$",
)
TORCHVISION_NAMES = TorchStyleNames(
    "",
    {2: "layer1", 3: "layer2", 4: "layer3", 5: "layer4"},
    heads=False,
    signature=r"^(conv1\.weight|bn1\.|layer[1-4]\.\d+\.)",
    ignored=r"^fc\.",  # the ImageNet classifier
)
