"""detkit.modeling.weights and safe_pickle: Detectron2, MSRA/Caffe2 and torchvision weights, safely.

Each format's checkpoint is built from a small detkit model with random norm statistics and
heads, written the way that toolkit writes it (numpy pickles for the model zoos, torch.save for
training files), loaded back, and the outputs must equal the original model's.
"""

from __future__ import annotations

import builtins
import collections
import functools
import logging
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from detkit.config import load_config, replace
from detkit.errors import CheckpointError
from detkit.modeling import build_model
from detkit.modeling.backbone import FrozenBatchNorm2d
from detkit.modeling.safe_pickle import load_pickle
from detkit.modeling.weights import (
    BN_EPS,
    MSRA_PIXEL_MEAN_BGR,
    convert_state_dict,
    detect_format,
    export_state_dict,
    load_backbone_weights,
    load_detector_weights,
    read_weights,
)

MSRA_INPUT = {
    "model.input_format": "BGR",
    "model.pixel_mean": MSRA_PIXEL_MEAN_BGR,
    "model.pixel_std": (1.0, 1.0, 1.0),
    "model.backbone.stride_in_1x1": True,
}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def tiny_cfg(depth: int = 18, num_classes: int = 3, **changes):
    """A config for small CPU models: few proposals and detections."""
    cfg = replace(
        load_config(None),
        **{
            "model.depth": depth,
            "model.num_classes": num_classes,
            "model.rpn.pre_nms_topk_test": 200,
            "model.rpn.post_nms_topk_test": 5,  # res5 runs per RoI: the cost of a CPU test
            "model.roi_heads.detections_per_image": 20,
            **changes,
        },
    )
    return cfg


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial statistics and the heads weights that separate classes,
    so a wrong mapping of any tensor shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                c = module.weight.shape[0]
                module.weight.copy_(torch.rand(c, generator=gen) * 0.6 + 0.4)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
        for name, p in model.named_parameters():
            if name.startswith(("rpn.head", "roi_heads.box_predictor")):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if p.dim() > 1 else 0.2))
    return model


def tiny_model(cfg, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_(build_model(cfg), seed).eval()


@functools.cache
def shared_original(depth: int, msra_input: bool = False, num_classes: int = 3) -> tuple:
    """(cfg, randomised model) shared by the tests, which only read it (building R-50 takes seconds)."""
    cfg = tiny_cfg(depth=depth, num_classes=num_classes, **(MSRA_INPUT if msra_input else {}))
    return cfg, tiny_model(cfg)


def images(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (3, 48, 64), generator=gen, dtype=torch.uint8),
        torch.randint(0, 256, (3, 64, 48), generator=gen, dtype=torch.uint8),
    ]


@torch.no_grad()
def detections(model: nn.Module) -> list[dict]:
    return model.eval()(images())


def assert_same_detections(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    assert sum(len(d["scores"]) for d in a) > 0, "the test model must detect something to compare"
    for da, db in zip(a, b):
        torch.testing.assert_close(da["boxes"], db["boxes"], rtol=0, atol=1e-6)
        torch.testing.assert_close(da["scores"], db["scores"], rtol=0, atol=1e-6)
        assert torch.equal(da["labels"], db["labels"])


@torch.no_grad()
def backbone_outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """res4 features of a batch and res5 of crops of them: every backbone tensor takes part."""
    x = torch.stack([img[:, :48, :48] for img in images()]).float() - 100.0
    res4 = model.backbone(x)
    res5 = model.roi_heads.res5(res4.repeat(1, 1, 5, 5)[:, :, :14, :14])
    return res4, res5


def assert_same_backbone(a: nn.Module, b: nn.Module, folded_bn: bool = False) -> None:
    """folded_bn: b's norms hold the statistics folded into weight and bias (mean 0, var 1 - eps), so
    F.batch_norm computes x * scale + shift instead of (x - mean) * rsqrt(var + eps) * w + b: the
    same function rounded differently (measured: up to 1.7e-5 on values of ~10 after 18 layers)."""
    tol = dict(rtol=1e-5, atol=1e-4) if folded_bn else dict(rtol=1e-6, atol=1e-6)
    for out_a, out_b in zip(backbone_outputs(a), backbone_outputs(b)):
        assert out_a.abs().max() > 0
        torch.testing.assert_close(out_a, out_b, **tol)


def to_numpy(state_dict: dict) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def write_pickle(path, obj, protocol: int = pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


# --------------------------------------------------------------------------------------------
# Names: hand-written from each toolkit's naming, independent of the mapping tables
# --------------------------------------------------------------------------------------------


def test_export_names_follow_each_toolkit():
    model = shared_original(50, msra_input=True)[1]
    d2 = export_state_dict(model, "detectron2")
    for name in [
        "backbone.stem.conv1.weight",
        "backbone.stem.conv1.norm.weight",
        "backbone.stem.conv1.norm.running_var",
        "backbone.res2.0.conv1.weight",
        "backbone.res2.0.conv3.norm.bias",
        "backbone.res2.0.shortcut.weight",
        "backbone.res2.0.shortcut.norm.running_mean",
        "backbone.res3.3.conv2.norm.weight",
        "backbone.res4.5.conv3.weight",
        "roi_heads.res5.0.shortcut.norm.weight",
        "roi_heads.res5.2.conv3.norm.running_var",
        "proposal_generator.rpn_head.conv.weight",
        "proposal_generator.rpn_head.objectness_logits.bias",
        "proposal_generator.rpn_head.anchor_deltas.weight",
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.bbox_pred.bias",
    ]:
        assert name in d2, name
    assert d2["roi_heads.box_predictor.cls_score.weight"].shape == (4, 2048)  # K + 1, background last
    assert d2["roi_heads.box_predictor.bbox_pred.weight"].shape == (12, 2048)
    assert not any(k.startswith(("backbone.res5", "backbone.layer", "rpn.")) for k in d2)
    # Every Detectron2 R-C4 tensor, no more: 4 BN tensors + 1 conv weight per conv (53 convs in
    # R-50 = stem + 16 blocks * 3 + 4 shortcuts) and 10 head tensors.
    assert len(d2) == 53 * 5 + 10

    msra = export_state_dict(model, "msra")
    for name in [
        "conv1_w",
        "res_conv1_bn_s",
        "res_conv1_bn_b",
        "res2_0_branch1_w",
        "res2_0_branch1_bn_s",
        "res2_0_branch2a_w",
        "res3_3_branch2c_bn_b",
        "res5_2_branch2b_bn_s",
        "res5_0_branch1_bn_b",
    ]:
        assert name in msra, name
    assert len(msra) == 53 * 3  # conv weight, scale, shift: BN folded, no heads

    tv = export_state_dict(model, "torchvision")
    for name in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.bias",
        "layer3.5.bn3.running_var",
        "layer4.0.conv2.weight",
        "layer4.2.bn3.weight",
    ]:
        assert name in tv, name
    assert len(tv) == 53 * 5


@pytest.mark.parametrize("fmt", ["detectron2", "msra", "torchvision"])
def test_each_format_is_recognised_from_its_names(fmt):
    model = shared_original(18)[1]
    assert detect_format(export_state_dict(model, fmt)) == fmt
    assert detect_format(model.state_dict()) == "detkit"


def test_unknown_names_are_refused_with_the_names_shown():
    with pytest.raises(CheckpointError, match=r"cannot tell the layout of x\.pkl.*encoder\.weight"):
        detect_format({"encoder.weight": torch.zeros(1)}, "x.pkl")


# --------------------------------------------------------------------------------------------
# Detectron2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, pytest.param(50, marks=pytest.mark.slow)])
def test_detectron2_model_zoo_pkl_via_model_weights_gives_the_same_detections(tmp_path, depth):
    cfg, original = shared_original(depth, msra_input=True)
    zoo = {"model": to_numpy(export_state_dict(original, "detectron2")), "__author__": "Detectron2 Model Zoo"}
    path = write_pickle(tmp_path / "model_final.pkl", zoo)

    loaded = build_model(replace(cfg, **{"model.weights": str(path)})).eval()
    assert_same_detections(detections(original), detections(loaded))

    report = load_detector_weights(build_model(cfg), str(path))
    own = [k for k in original.state_dict() if not k.endswith("num_batches_tracked")]
    assert report.format == "detectron2"
    assert sorted(report.matched) == sorted(own)
    assert report.missing == report.unused == report.shape_mismatch == []


def test_detectron2_training_pth_loads_with_weights_only(tmp_path):
    cfg, original = shared_original(18)
    ckpt = {
        "model": export_state_dict(original, "detectron2"),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.02, "params": [0, 1]}]},
        "scheduler": {"base_lrs": [0.02], "last_epoch": 10},
        "iteration": 10,
    }
    # Old Detectron2 checkpoints also hold these; they are not weights.
    ckpt["model"]["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    ckpt["model"]["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(15, 4)
    torch.save(ckpt, tmp_path / "model_0000010.pth")

    model = build_model(cfg)
    report = load_detector_weights(model, str(tmp_path / "model_0000010.pth"))
    assert report.missing == report.unused == []
    assert sorted(report.ignored) == ["pixel_mean", "proposal_generator.anchor_generator.cell_anchors.0"]
    assert_same_detections(detections(original), detections(model))


def test_detectron2_backbone_without_prefix_loads_as_backbone_weights(tmp_path):
    """Backbones converted for Detectron2 (its convert-torchvision-to-d2.py) name stem.*, res2..res5.*."""
    cfg, original = shared_original(18)
    bare = {
        k.replace("backbone.", "").replace("roi_heads.", ""): v
        for k, v in export_state_dict(original, "detectron2").items()
        if not k.startswith(("proposal", "roi_heads.box"))
    }
    assert "stem.conv1.weight" in bare and "res5.1.conv2.norm.bias" in bare
    path = write_pickle(tmp_path / "R-18-d2.pkl", {"model": to_numpy(bare), "__author__": "torchvision"})
    model = build_model(cfg)
    report = load_backbone_weights(model, str(path))
    assert report.format == "detectron2" and report.missing == report.unused == []
    assert_same_backbone(original, model)


def test_full_detectron2_model_as_backbone_weights_loads_only_the_backbone(tmp_path):
    cfg, original = shared_original(18)
    path = write_pickle(tmp_path / "m.pkl", {"model": to_numpy(export_state_dict(original, "detectron2"))})
    model = build_model(cfg)
    head_before = model.rpn.head.conv.weight.clone()
    report = load_backbone_weights(model, str(path))
    assert report.missing == []
    assert sorted(report.unused) == sorted(
        k
        for k in export_state_dict(original, "detectron2")
        if k.startswith(("proposal_generator.", "roi_heads.box_predictor."))
    )
    assert torch.equal(model.rpn.head.conv.weight, head_before)
    assert_same_backbone(original, model)


def test_other_num_classes_skips_the_predictor_with_a_warning_and_loads_the_rest(tmp_path, caplog):
    _, original = shared_original(18)
    path = write_pickle(tmp_path / "k3.pkl", {"model": to_numpy(export_state_dict(original, "detectron2"))})

    torch.manual_seed(1)
    model = build_model(tiny_cfg(depth=18, num_classes=5))
    predictor_before = {k: v.clone() for k, v in model.roi_heads.box_predictor.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="detkit.modeling.weights"):
        report = load_detector_weights(model, str(path))

    assert sorted(m.split(":")[0] for m in report.shape_mismatch) == [
        "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.cls_score.weight",
    ]
    assert "roi_heads.box_predictor.cls_score.weight: file (4, 512) vs model (6, 512)" in report.shape_mismatch
    assert report.missing == report.unused == []
    assert len(report.matched) == len([k for k in model.state_dict() if not k.endswith("num_batches_tracked")]) - 4
    assert any("shape differs" in r.message and "cls_score" in r.message for r in caplog.records)
    for key, value in model.roi_heads.box_predictor.state_dict().items():
        assert torch.equal(value, predictor_before[key])  # kept its initialisation
    assert_same_backbone(original, model)
    torch.testing.assert_close(
        model.rpn.head.anchor_deltas.weight, original.rpn.head.anchor_deltas.weight, rtol=0, atol=0
    )


# --------------------------------------------------------------------------------------------
# MSRA / Caffe2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, pytest.param(50, marks=pytest.mark.slow)])
def test_msra_folded_bn_pkl_gives_the_same_backbone_outputs(tmp_path, depth):
    cfg, original = shared_original(depth, msra_input=True)
    blobs = to_numpy(export_state_dict(original, "msra"))
    assert "res2_0_branch2a_bn_s" in blobs and "res2_0_branch2a_bn_rm" not in blobs
    blobs["fc1000_w"] = np.zeros((1000, 2048 if depth == 50 else 512), np.float32)
    blobs["fc1000_b"] = np.zeros(1000, np.float32)
    blobs["res2_0_branch2a_w_momentum"] = np.zeros_like(blobs["res2_0_branch2a_w"])
    # Protocol 2 as the Python-2 era files (slow for big arrays: only for the small model).
    path = write_pickle(tmp_path / f"R-{depth}.pkl", blobs, protocol=2 if depth == 18 else 4)

    model = build_model(replace(cfg, **{"model.backbone.weights": str(path)}))
    assert_same_backbone(original, model, folded_bn=True)
    # Folded BN: running_var = 1 - eps makes weight * rsqrt(var + eps) exactly the Caffe2 scale.
    assert torch.all(model.backbone.bn1.running_mean == 0)
    assert torch.all(model.backbone.bn1.running_var + BN_EPS == 1.0)
    torch.testing.assert_close(model.backbone.bn1.weight, torch.from_numpy(blobs["res_conv1_bn_s"]), rtol=0, atol=0)

    report = load_backbone_weights(build_model(cfg), str(path))
    assert report.format == "msra" and report.missing == report.unused == report.shape_mismatch == []
    assert sorted(report.ignored) == ["fc1000_b", "fc1000_w", "res2_0_branch2a_w_momentum"]


@pytest.mark.slow
def test_msra_unfolded_bn_in_blobs_dict_keeps_its_statistics(tmp_path):
    cfg, original = shared_original(50, msra_input=True)
    blobs = to_numpy(export_state_dict(original, "msra", fold_bn=False))
    assert "res3_1_branch2b_bn_riv" in blobs
    path = write_pickle(tmp_path / "R-50.pkl", {"blobs": blobs})
    model = build_model(cfg)
    report = load_backbone_weights(model, str(path), fmt="msra")
    assert report.missing == report.unused == []
    assert torch.equal(model.backbone.layer2[1].bn2.running_var, original.backbone.layer2[1].bn2.running_var)
    assert_same_backbone(original, model)


def test_msra_weights_warn_when_the_model_expects_other_input(tmp_path, caplog):
    _, original = shared_original(50, msra_input=True)
    path = write_pickle(tmp_path / "R-50.pkl", to_numpy(export_state_dict(original, "msra")))
    model = build_model(tiny_cfg(depth=50))  # torchvision conventions: RGB, std 58, stride in 3x3
    with caplog.at_level(logging.WARNING, logger="detkit.modeling.weights"):
        load_backbone_weights(model, str(path))
    message = " ".join(r.message for r in caplog.records)
    for key in ("model.input_format", "model.pixel_mean", "model.pixel_std", "model.backbone.stride_in_1x1"):
        assert key in message


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------


def test_torchvision_resnet_state_dict_matches_torchvision_itself(tmp_path, depth=18):
    """An independent reference: torchvision's own ResNet, with random BN statistics, gives the
    same res4 features as detkit's trunk loaded from its state dict (depth 50: test_backbone.py)."""
    import torchvision

    torch.manual_seed(0)
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    randomize_(tv, seed=1)
    tv.eval()
    torch.save(tv.state_dict(), tmp_path / "resnet.pth")

    model = build_model(tiny_cfg(depth=depth)).eval()
    report = load_backbone_weights(model, str(tmp_path / "resnet.pth"))
    assert report.format == "torchvision"
    assert report.missing == report.unused == []
    assert sorted(report.ignored) == sorted(k for k in tv.state_dict() if k.startswith("fc.") or "num_batches" in k)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
        ref5 = tv.layer4(ref)
        torch.testing.assert_close(model.backbone(x), ref, rtol=1e-5, atol=1e-5)  # BN folded vs F.batch_norm
        torch.testing.assert_close(model.roi_heads.res5(ref), ref5, rtol=1e-5, atol=1e-5)


def test_torchvision_export_round_trip_is_exact(tmp_path):
    cfg, original = shared_original(18)
    torch.save(export_state_dict(original, "torchvision"), tmp_path / "r18.pth")
    model = build_model(replace(cfg, **{"model.backbone.weights": str(tmp_path / "r18.pth")}))
    assert_same_backbone(original, model)


# --------------------------------------------------------------------------------------------
# Safety
# --------------------------------------------------------------------------------------------


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Execs:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _PlainObject:
    """Harmless, but not an array or container: refused as well."""


@pytest.mark.parametrize(
    "payload, refused_name",
    [(_RunsShell, "posix.system"), (_Execs, "builtins.exec"), (None, "_PlainObject")],
)
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, payload, refused_name):
    marker = tmp_path / "marker"
    evil = payload(marker) if payload else _PlainObject()
    weights = {"model": {"backbone.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "x": evil}}
    path = write_pickle(tmp_path / "model_final.pkl", weights)

    with pytest.raises(CheckpointError) as info:
        load_pickle(path)
    assert (
        str(path) in str(info.value) and refused_name in str(info.value) and "none of its code ran" in str(info.value)
    )
    with pytest.raises(CheckpointError, match="refused to load"):
        build_model(replace(tiny_cfg(), **{"model.weights": str(path)}))
    with pytest.raises(CheckpointError, match="refused to load"):
        build_model(replace(tiny_cfg(), **{"model.backbone.weights": str(path)}))
    assert not marker.exists()
    # The test's own payload really would run with a plain pickle.load (so the check above means something).
    if payload is not None:
        with open(path, "rb") as f:
            pickle.load(f)
        assert marker.exists()


def test_a_pth_with_pickled_code_is_refused_by_weights_only(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "hook": _RunsShell(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth.*weights_only"):
        load_detector_weights(build_model(tiny_cfg()), str(tmp_path / "evil.pth"))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_pickles_of_every_protocol_load(tmp_path, protocol):
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    obj = {
        "a": array,
        "b": np.float64(2.5),
        "c": np.arange(5, dtype=">i8"),
        "d": collections.OrderedDict(x=[1, (2.0, "s")]),
        "e": array[:, ::2],
    }  # non-contiguous
    loaded = load_pickle(write_pickle(tmp_path / "w.pkl", obj, protocol=protocol))
    np.testing.assert_array_equal(loaded["a"], array)
    np.testing.assert_array_equal(loaded["e"], array[:, ::2])
    np.testing.assert_array_equal(loaded["c"], np.arange(5))
    assert loaded["b"] == 2.5 and loaded["d"] == collections.OrderedDict(x=[1, (2.0, "s")])


def test_read_only_and_big_endian_arrays_become_tensors_without_warnings(tmp_path):
    weights = {"conv1_w": np.arange(6, dtype=">f4").reshape(1, 6, 1, 1), "res_conv1_bn_s": np.ones(1, np.float32)}
    path = write_pickle(tmp_path / "w.pkl", weights, protocol=5)  # protocol 5: read-only arrays over the bytes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = read_weights(path)
    assert converted.format == "msra"
    assert converted.state_dict["backbone.conv1.weight"].flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_truncated_or_foreign_files_give_clear_errors(tmp_path):
    good = write_pickle(
        tmp_path / "w.pkl", {"model": {"backbone.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}}
    )
    (tmp_path / "cut.pkl").write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=r"cut\.pkl.*truncated"):
        read_weights(tmp_path / "cut.pkl")
    (tmp_path / "text.pkl").write_text("not a pickle")
    with pytest.raises(CheckpointError, match=r"text\.pkl"):
        read_weights(tmp_path / "text.pkl")
    with pytest.raises(CheckpointError, match="not found"):
        read_weights(tmp_path / "missing.pkl")
    write_pickle(tmp_path / "list.pkl", [1, 2])
    with pytest.raises(CheckpointError, match="does not hold a dict"):
        read_weights(tmp_path / "list.pkl")
    with pytest.raises(CheckpointError, match="unknown weights format 'caffe'"):
        read_weights(good, "caffe")


def test_a_file_read_as_the_wrong_format_says_what_it_looks_like(tmp_path):
    original = shared_original(18)[1]
    path = write_pickle(tmp_path / "R-18.pkl", to_numpy(export_state_dict(original, "msra")))
    with pytest.raises(CheckpointError, match="look like msra"):
        read_weights(path, "detectron2")


def test_convert_state_dict_maps_msra_folded_bn_to_identity_statistics():
    s = torch.tensor([2.0, 0.5])
    b = torch.tensor([0.1, -0.3])
    out = convert_state_dict(
        {"res_conv1_bn_s": s, "res_conv1_bn_b": b, "conv1_w": torch.ones(2, 3, 7, 7)}, "msra"
    ).state_dict
    bn = FrozenBatchNorm2d(2)
    bn.load_state_dict({k[len("backbone.bn1.") :]: v for k, v in out.items() if k.startswith("backbone.bn1.")})
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(bn(x), x * s.view(1, 2, 1, 1) + b.view(1, 2, 1, 1), rtol=0, atol=0)  # y = x * s + b
