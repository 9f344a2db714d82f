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

Every name is translated through one format-neutral key (`keys.NeutralKey`), so the same tables
turn a detkit model into any of the other layouts (`export_state_dict`), which is how the tests
build checkpoints.

Modules: files (reading a file safely), keys (the neutral key), one naming scheme per format
(torch_style: detkit and torchvision; detectron2; msra, with BN folding), convert (format
detection, renaming between any two formats, export), load (into a model, with the LoadReport),
conventions (the input settings the weights expect). The names below are the public API.

Files: `.pth` / zip files load with `torch.load(weights_only=True)`; pickles (`.pkl`) with
`detkit.modeling.safe_pickle.load_pickle`, which builds numpy arrays and plain containers only.
No code in a weights file can run.
"""

from detkit.modeling.weights.conventions import model_conventions
from detkit.modeling.weights.convert import (
    BN_EPS,
    FORMATS,
    Conversion,
    convert_state_dict,
    detect_format,
    export_state_dict,
)
from detkit.modeling.weights.files import read_torch_file, read_weights_file, state_dict_from_checkpoint
from detkit.modeling.weights.load import (
    BACKBONE_PREFIXES,
    ConvertedWeights,
    LoadReport,
    load_backbone_weights,
    load_converted,
    load_detector_weights,
    load_state_dict_into,
    load_weights,
    read_weights,
    torchvision_to_detkit,
)
from detkit.modeling.weights.msra import MSRA_PIXEL_MEAN_BGR, MSRA_PIXEL_STD

__all__ = [
    "BACKBONE_PREFIXES",
    "BN_EPS",
    "FORMATS",
    "MSRA_PIXEL_MEAN_BGR",
    "MSRA_PIXEL_STD",
    "Conversion",
    "ConvertedWeights",
    "LoadReport",
    "convert_state_dict",
    "detect_format",
    "export_state_dict",
    "load_backbone_weights",
    "load_converted",
    "load_detector_weights",
    "load_state_dict_into",
    "load_weights",
    "model_conventions",
    "read_torch_file",
    "read_weights",
    "read_weights_file",
    "state_dict_from_checkpoint",
    "torchvision_to_detkit",
]
