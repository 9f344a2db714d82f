"""tools/convert_weights.py: Detectron2 / MSRA / torchvision files in, detkit checkpoints out."""

from __future__ import annotations

import functools
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detkit.cli.convert_weights import main
from detkit.config import load_config, replace
from detkit.errors import CheckpointError, ConfigError
from detkit.modeling import build_model
from detkit.modeling.backbone import FrozenBatchNorm2d
from detkit.modeling.weights import export_state_dict

ROOT = Path(__file__).resolve().parents[1]
TOOL = [sys.executable, str(ROOT / "tools" / "convert_weights.py")]


def tiny_cfg(num_classes: int = 3, **changes):
    return replace(load_config(None), **{
        "model.depth": 18, "model.num_classes": num_classes,
        "model.rpn.pre_nms_topk_test": 200, "model.rpn.post_nms_topk_test": 5, **changes,
    })


@functools.cache
def original() -> nn.Module:
    """A ResNet-18 detector with random norm statistics and heads (read-only in the tests)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                c = module.weight.shape[0]
                module.weight.copy_(torch.rand(c, generator=gen) * 0.6 + 0.4)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
        for name, p in model.named_parameters():
            if name.startswith(("rpn.head", "roi_heads.box_predictor")):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if p.dim() > 1 else 0.2))
    return model.eval()


@torch.no_grad()
def detect(model: nn.Module) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return model.eval()([torch.randint(0, 256, (3, 48, 64), generator=gen, dtype=torch.uint8)])


def write_pickle(path: Path, obj) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def detectron2_pkl(tmp_path: Path) -> Path:
    weights = {k: v.numpy() for k, v in export_state_dict(original(), "detectron2").items()}
    return write_pickle(tmp_path / "model_final.pkl", {"model": weights, "__author__": "Detectron2 Model Zoo"})


def test_detectron2_pkl_converts_to_a_checkpoint_with_the_same_detections(tmp_path, capsys):
    out = tmp_path / "converted.pth"
    assert main(["--from", "detectron2", str(detectron2_pkl(tmp_path)), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out

    state = torch.load(out, weights_only=True)
    assert state["converted_from"] == {"file": str(tmp_path / "model_final.pkl"), "format": "detectron2"}
    assert state["num_classes"] == 3
    expected = {k: v for k, v in original().state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sorted(state["model"]) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state["model"][key], value), key

    model = build_model(replace(tiny_cfg(), **{"model.weights": str(out)}))
    a, b = detect(original()), detect(model)
    assert len(a[0]["scores"]) > 0
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(a[0][key], b[0][key], rtol=0, atol=1e-6)


def test_num_classes_drops_a_predictor_for_other_classes(tmp_path):
    out = tmp_path / "init.pth"
    assert main(["--from", "detectron2", str(detectron2_pkl(tmp_path)), str(out), "--num-classes", "6"]) == 0
    state = torch.load(out, weights_only=True)
    assert state["num_classes"] is None
    assert not any(k.startswith("roi_heads.box_predictor.") for k in state["model"])
    assert "rpn.head.conv.weight" in state["model"] and "roi_heads.res5.1.bn2.running_var" in state["model"]

    model = build_model(tiny_cfg(num_classes=6))
    from detkit.modeling.weights import load_detector_weights

    report = load_detector_weights(model, str(out))
    assert report.format == "detkit"
    assert sorted(report.missing) == ["roi_heads.box_predictor.bbox_pred.bias", "roi_heads.box_predictor.bbox_pred.weight",
                                      "roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.cls_score.weight"]
    assert report.shape_mismatch == report.unused == []

    # The same number of classes keeps it.
    assert main(["--from", "detectron2", str(tmp_path / "model_final.pkl"), str(out), "--num-classes", "3"]) == 0
    assert "roi_heads.box_predictor.cls_score.weight" in torch.load(out, weights_only=True)["model"]


@pytest.mark.parametrize("fmt", ["msra", "torchvision"])
def test_imagenet_backbones_convert_to_backbone_weights(tmp_path, fmt):
    weights = export_state_dict(original(), fmt)
    if fmt == "msra":
        src = write_pickle(tmp_path / "R-18.pkl", {k: v.numpy() for k, v in weights.items()})
    else:
        src = tmp_path / "resnet18.pth"
        torch.save({**weights, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, src)
    out = tmp_path / "backbone.pth"
    assert main(["--from", fmt, str(src), str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert all(k.startswith(("backbone.", "roi_heads.res5.")) for k in state["model"])
    assert state["num_classes"] is None

    model = build_model(replace(tiny_cfg(), **{"model.backbone.weights": str(out)})).eval()
    x = torch.randn(1, 3, 48, 48) * 50
    # MSRA files hold BN folded into a scale and shift: F.batch_norm rounds that differently from
    # the unfolded statistics (measured: 1.2e-5 at most); torchvision files keep the statistics.
    tol = dict(rtol=1e-5, atol=1e-4) if fmt == "msra" else dict(rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), original().backbone(x), **tol)
        res4 = original().backbone(x)
        torch.testing.assert_close(model.roi_heads.res5(res4), original().roi_heads.res5(res4), **tol)


def shapes_config(tmp_path: Path) -> Path:
    """A YAML config for a ResNet-18 on a 2-image shapes test set with 3 classes."""
    import yaml

    text = {
        "_base_": str(ROOT / "configs" / "base.yaml"),
        "model": {"depth": 18, "num_classes": 3, "weights": str(tmp_path / "model_final.pkl"),
                  "rpn": {"pre_nms_topk_test": 200, "post_nms_topk_test": 5}},
        "data": {"test": [{"type": "shapes", "name": "shapes_test", "root": str(tmp_path / "shapes"), "split": "test",
                           "num_images": 2, "image_size": [64, 64], "num_classes": 3}],
                 "min_size_test": 64, "max_size_test": 64, "num_workers": 0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(text))
    return path


def test_with_config_the_output_is_a_checkpoint_the_predictor_takes(tmp_path):
    from detkit.engine.predictor import Predictor

    cfg_path = shapes_config(tmp_path)
    out = tmp_path / "ready.pth"
    assert main(["--from", "detectron2", str(detectron2_pkl(tmp_path)), str(out), "--config", str(cfg_path)]) == 0
    state = torch.load(out, weights_only=True)
    assert len(state["class_names"]) == 3 and len(state["category_ids"]) == 3
    assert state["config"]["model"]["weights"] == "" and state["config"]["model"]["depth"] == 18

    predictor = Predictor(out, device="cpu")
    for key, value in original().state_dict().items():
        assert torch.equal(predictor.model.state_dict()[key], value), key


def test_with_config_weights_that_do_not_fit_are_an_error(tmp_path):
    cfg_path = shapes_config(tmp_path)
    with pytest.raises(ConfigError, match=re.escape("--num-classes 5 differs from model.num_classes=3")):
        main(["--from", "detectron2", str(detectron2_pkl(tmp_path)), str(tmp_path / "o.pth"), "--config", str(cfg_path),
              "--num-classes", "5"])
    with pytest.raises(CheckpointError, match="does not fit the model"):
        main(["--from", "detectron2", str(tmp_path / "model_final.pkl"), str(tmp_path / "o.pth"), "--config", str(cfg_path),
              "model.depth=34"])
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.slow  # a fresh Python importing torch: ~15 s on 2 busy cores
def test_the_tool_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = write_pickle(tmp_path / "model_final.pkl", {"model": {"backbone.stem.conv1.weight": np.zeros(3, np.float32)},
                                                      "__author__": Evil()})
    out = tmp_path / "out.pth"
    result = subprocess.run(TOOL + ["--from", "detectron2", str(src), str(out)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: refused to load") and "posix.system" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    assert not marker.exists() and not out.exists()
