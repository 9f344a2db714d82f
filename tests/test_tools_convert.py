"""tools/convert_weights.py: Detectron2 / MSRA / torchvision files in, detkit checkpoints out."""

from __future__ import annotations

import functools
import json
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
    return replace(
        load_config(None),
        **{
            "model.depth": 18,
            "model.num_classes": num_classes,
            "model.rpn.pre_nms_topk_test": 200,
            "model.rpn.post_nms_topk_test": 5,
            **changes,
        },
    )


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
    assert sorted(report.missing) == [
        "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.cls_score.weight",
    ]
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
        "model": {
            "depth": 18,
            "num_classes": 3,
            "weights": str(tmp_path / "model_final.pkl"),
            "rpn": {"pre_nms_topk_test": 200, "post_nms_topk_test": 5},
        },
        "data": {
            "test": [
                {
                    "type": "shapes",
                    "name": "shapes_test",
                    "root": str(tmp_path / "shapes"),
                    "split": "test",
                    "num_images": 2,
                    "image_size": [64, 64],
                    "num_classes": 3,
                }
            ],
            "min_size_test": 64,
            "max_size_test": 64,
            "num_workers": 0,
        },
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
        main(
            [
                "--from",
                "detectron2",
                str(detectron2_pkl(tmp_path)),
                str(tmp_path / "o.pth"),
                "--config",
                str(cfg_path),
                "--num-classes",
                "5",
            ]
        )
    with pytest.raises(CheckpointError, match="does not fit the model"):
        main(
            [
                "--from",
                "detectron2",
                str(tmp_path / "model_final.pkl"),
                str(tmp_path / "o.pth"),
                "--config",
                str(cfg_path),
                "model.depth=34",
            ]
        )
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.slow  # a fresh Python importing torch: ~15 s on 2 busy cores
def test_the_tool_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = write_pickle(
        tmp_path / "model_final.pkl",
        {"model": {"backbone.stem.conv1.weight": np.zeros(3, np.float32)}, "__author__": Evil()},
    )
    out = tmp_path / "out.pth"
    result = subprocess.run(
        TOOL + ["--from", "detectron2", str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: refused to load") and "posix.system" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    assert not marker.exists() and not out.exists()


# --------------------------------------------------------------------------------------------
# COCO class names for a model-zoo file converted without COCO on disk
# --------------------------------------------------------------------------------------------


def torchvision_coco_categories() -> list[tuple[int, str]]:
    """(category id, name) of COCO's 80 classes from torchvision's weights metadata (an independent
    copy: a 91-slot list indexed by category id, with placeholders at the unused ids)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return [(i, n) for i, n in enumerate(names) if n not in ("__background__", "N/A")]


@functools.cache
def coco_model() -> nn.Module:
    """A ResNet-18 detector with 80 classes whose classifier gives every RoI the same scores, which
    favour label 0 and label 79 (COCO's person and toothbrush): e^6 / (2 e^6 + 79) = 0.455 for each
    of the two, 0.001 for the other 78 and the background."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(num_classes=80))
    with torch.no_grad():
        cls_score = model.roi_heads.box_predictor.cls_score  # 81 outputs, background last
        cls_score.weight.zero_()
        cls_score.bias.zero_()
        cls_score.bias[0] = cls_score.bias[79] = 6.0
    return model.eval()


def coco_args(tmp_path: Path, num_classes: int = 80) -> list[str]:
    """configs/frcnn_r101_detectron2.yaml as a user runs it, made cheap (ResNet-18, 64 px, 8 RoIs),
    its test set pointing at a COCO folder that does not exist here."""
    coco = tmp_path / "coco"
    return [
        "--config",
        str(ROOT / "configs" / "frcnn_r101_detectron2.yaml"),
        "model.depth=18",
        f"model.num_classes={num_classes}",
        "model.rpn.pre_nms_topk_test=100",
        "model.rpn.post_nms_topk_test=8",
        "data.min_size_test=64",
        "data.max_size_test=96",
        f"data.test=[{{type: coco, name: coco_2017_val, ann_file: {coco}/annotations/instances_val2017.json, "
        f"image_root: {coco}/val2017}}]",
    ]


@pytest.fixture
def console(capsys):
    """console(main, argv) -> (exit status, stdout, stderr) through run_cli, with detkit's log lines
    in stdout (setup_logging binds its handler to this test's capture; the old ones come back)."""
    import logging

    from detkit.cli.common import run_cli

    detkit_logger = logging.getLogger("detkit")

    def run(tool_main, argv):
        saved = list(detkit_logger.handlers), detkit_logger.propagate
        detkit_logger.handlers[:] = []
        try:
            code = run_cli(tool_main, [str(a) for a in argv])
        finally:
            detkit_logger.handlers[:], detkit_logger.propagate = saved
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def photo_folder(folder: Path, count: int = 2) -> Path:
    import cv2

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for k in range(count):  # smooth random colours, 64 x 96
        small = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"photo{k}.jpg"), cv2.resize(small, (96, 64), interpolation=cv2.INTER_CUBIC))
    return folder


def test_a_coco_model_without_the_coco_json_gets_cocos_names_and_infer_shows_them(tmp_path, console):
    from detkit.cli.infer import main as infer_main

    weights = {k: v.numpy() for k, v in export_state_dict(coco_model(), "detectron2").items()}
    pkl = write_pickle(tmp_path / "model_final_298dad.pkl", {"model": weights, "__author__": "Detectron2 Model Zoo"})
    out = tmp_path / "frcnn_r101_c4_3x.pth"
    code, stdout, stderr = console(main, ["--from", "detectron2", pkl, out, *coco_args(tmp_path)])
    assert code == 0, stderr
    assert "class names: COCO's 80 (person, bicycle, ..., toothbrush; category ids 1..90) stored" in stdout
    assert f"{tmp_path / 'coco' / 'annotations' / 'instances_val2017.json'} does not exist" in stdout

    state = torch.load(out, weights_only=True)
    reference = torchvision_coco_categories()
    assert len(reference) == 80
    assert state["class_names"] == [name for _, name in reference]
    assert state["category_ids"] == [cid for cid, _ in reference]
    assert state["category_ids"][:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13] and state["category_ids"][-1] == 90

    # Step two: detect on a folder of photos with the converted file as it is.
    photos = photo_folder(tmp_path / "photos")
    code, stdout, stderr = console(
        infer_main,
        [
            "--weights",
            out,
            "--input",
            photos,
            "--output",
            tmp_path / "det",
            "--device",
            "cpu",
            "--score-thresh",
            "0.3",
            "--workers",
            "0",
        ],
    )
    assert code == 0, stderr
    assert "images:     2 processed, 0 skipped" in stdout
    predictions = json.loads((tmp_path / "det" / "predictions.json").read_text())
    assert {p["file_name"] for p in predictions} == {"photo0.jpg", "photo1.jpg"}
    # Labels 0 and 79 are COCO's person (id 1) and toothbrush (id 90), each scoring 0.455.
    assert {(p["category_name"], p["category_id"]) for p in predictions} == {("person", 1), ("toothbrush", 90)}
    np.testing.assert_allclose([p["score"] for p in predictions], np.exp(6) / (2 * np.exp(6) + 79), atol=1e-4)


def test_a_readable_annotation_file_gives_the_names_of_an_80_class_model(tmp_path, console):
    weights = {k: v.numpy() for k, v in export_state_dict(coco_model(), "detectron2").items()}
    pkl = write_pickle(tmp_path / "model_final.pkl", {"model": weights})
    ann = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    ann.parent.mkdir(parents=True)
    photo_folder(tmp_path / "coco" / "val2017", count=1)
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "photo0.jpg", "height": 64, "width": 96}],
                "annotations": [],
                "categories": [{"id": 100 + k, "name": f"part{k}"} for k in range(80)],
            }
        )
    )
    out = tmp_path / "mine.pth"
    code, stdout, stderr = console(main, ["--from", "detectron2", pkl, out, *coco_args(tmp_path)])
    assert code == 0, stderr
    assert "COCO's 80" not in stdout
    state = torch.load(out, weights_only=True)
    assert state["class_names"] == [f"part{k}" for k in range(80)]
    assert state["category_ids"] == list(range(100, 180))


def test_a_model_of_other_classes_without_names_gives_the_clear_error(tmp_path, console):
    from detkit.cli.infer import main as infer_main

    out = tmp_path / "three.pth"
    code, stdout, stderr = console(
        main, ["--from", "detectron2", detectron2_pkl(tmp_path), out, *coco_args(tmp_path, num_classes=3)]
    )
    assert code == 0, stderr
    assert "no class names stored (cannot read the test dataset of" in stdout and "COCO's 80" not in stdout
    state = torch.load(out, weights_only=True)
    assert "class_names" not in state and "category_ids" not in state
    assert state["config"]["model"]["num_classes"] == 3

    code, stdout, stderr = console(
        infer_main,
        [
            "--weights",
            out,
            "--input",
            photo_folder(tmp_path / "photos"),
            "--output",
            tmp_path / "det",
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
    )
    assert code == 2
    assert stderr.strip().splitlines() == [
        f"error: {out} has no class names: it was converted from {tmp_path / 'model_final.pkl'} while the test "
        "annotation file of its --config could not be read. Convert it again with a --config whose data.test names "
        "the annotation file of the model's classes (a model of 80 classes gets COCO's names without one)"
    ]
    assert not (tmp_path / "det").exists()
