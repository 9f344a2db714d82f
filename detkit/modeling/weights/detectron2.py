"""Detectron2's names (model-zoo .pkl, training .pth, and backbones converted for it).

backbone.stem.conv1.norm.weight, backbone.res2.0.conv1.weight, roi_heads.res5.0.shortcut.norm.bias,
proposal_generator.rpn_head.anchor_deltas.weight, roi_heads.box_predictor.cls_score.weight. The
classifier has K + 1 rows with background last, as in detkit, so the box predictor is copied as is.
"""

from __future__ import annotations

import re

from detkit.modeling.weights.keys import PARAM, PREDICTOR_LAYERS, RPN_LAYERS, NeutralKey


class Detectron2Names:
    """Detectron2: backbone.stem.conv1(.norm), backbone.resN.i.{convJ(.norm), shortcut(.norm)},
    roi_heads.res5, proposal_generator.rpn_head, roi_heads.box_predictor. Backbone files converted
    for Detectron2 (e.g. by its convert-torchvision-to-d2.py) have no "backbone." / "roi_heads."."""

    signature = re.compile(
        r"^(backbone\.)?(stem\.conv1\.|res[2-4]\.\d+\.)|^proposal_generator\.|^(roi_heads\.)?res5\.\d+\.(shortcut|conv[123]\.norm)\."
    )
    ignored = re.compile(r"^(pixel_mean|pixel_std)$|anchor_generator\.cell_anchors")  # constants, not weights
    _stem = re.compile(rf"^(?:backbone\.)?stem\.conv1\.(?:weight|norm\.{PARAM})$")
    _block = re.compile(
        rf"^(?:backbone\.|roi_heads\.)?res([2-5])\.(\d+)\.(conv[123]|shortcut)\.(?:weight|norm\.{PARAM})$"
    )
    _head = re.compile(
        rf"^(proposal_generator\.rpn_head\.{RPN_LAYERS}|roi_heads\.box_predictor\.{PREDICTOR_LAYERS})\.(weight|bias)$"
    )

    def parse(self, name: str) -> NeutralKey | None:
        m = self._stem.match(name)
        if m:
            return NeutralKey("stem", 1, 0, "conv1", "norm." + m.group(1) if m.group(1) else "weight")
        m = self._block.match(name)
        if m:
            stage, block, layer, norm_param = m.groups()
            if (stage == "5") != name.startswith(("roi_heads.", "res5.")):
                return None  # res5 lives in the RoI head; "backbone.res5" is another architecture
            return NeutralKey("block", int(stage), int(block), layer, "norm." + norm_param if norm_param else "weight")
        m = self._head.match(name)
        if m:
            layer = m.group(1).replace("proposal_generator.rpn_head.", "rpn.head.")
            return NeutralKey("head", 0, 0, layer, m.group(2))
        return None

    def name(self, key: NeutralKey) -> str | None:
        if key.unit == "head":
            return f"{key.layer.replace('rpn.head.', 'proposal_generator.rpn_head.')}.{key.param}"
        if key.unit == "stem":
            return f"backbone.stem.conv1.{key.param}"
        module = "roi_heads.res5" if key.stage == 5 else f"backbone.res{key.stage}"
        return f"{module}.{key.block}.{key.layer}.{key.param}"
