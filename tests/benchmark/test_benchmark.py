"""tools/benchmark.py and what makes its comparison trustworthy: the torchvision reference, fed
detkit's weights, gives detkit's proposals and detections; the tool writes the JSON it promises;
the generated COCO set evaluates to the same AP with every evaluator."""

from __future__ import annotations

import json

import pytest
import torch

from detkit.benchmark.calibration import calibrate_, compare_detections, make_inputs
from detkit.benchmark.eval_speed import make_synthetic_coco, run_eval_benchmark
from detkit.benchmark.tv_reference import (
    TorchvisionDetector,
    build_torchvision_reference,
    check_no_resize,
    from_torchvision_detections,
    to_torchvision_images,
)
from detkit.cli.benchmark import main as benchmark_main
from detkit.config import load_config
from detkit.modeling import build_model
from detkit.structures.image_batch import ImageBatch

# Same function, two implementations in fp32: differences are summation order only.
BOX_TOL_PX = 1e-3
SCORE_TOL = 1e-4


def _tiny_model(post_nms_topk_test: int = 32, **extra: str):
    overrides = [
        "model.depth=18",
        "model.num_classes=5",
        "model.roi_heads.aligned=false",
        f"model.rpn.post_nms_topk_test={post_nms_topk_test}",
        *(f"{k}={v}" for k, v in extra.items()),
    ]
    torch.manual_seed(0)
    return build_model(load_config(None, overrides)).eval()


def test_reference_weight_mapping_permutes_the_background_row_to_the_front():
    model = _tiny_model()
    reference = build_torchvision_reference(model, (64, 96))
    k = model.num_classes
    dk_cls = model.roi_heads.box_predictor.cls_score
    tv_cls = reference.roi_heads.box_predictor.cls_score
    assert torch.equal(tv_cls.weight[0], dk_cls.weight[k])  # background: last in detkit, first in torchvision
    assert torch.equal(tv_cls.weight[1:], dk_cls.weight[:k])
    dk_box = model.roi_heads.box_predictor.bbox_pred
    tv_box = reference.roi_heads.box_predictor.bbox_pred
    assert tv_box.weight.shape == (4 * (k + 1), dk_box.weight.shape[1])
    assert torch.equal(tv_box.weight[4:], dk_box.weight)
    assert torch.equal(reference.rpn.head.conv[0][0].weight, model.rpn.head.conv.weight)
    assert torch.equal(reference.roi_heads.box_head.layer4[1].conv2.weight, model.roi_heads.res5[1].conv2.weight)
    # The anchors are detkit's (size-major, not rounded), not torchvision's defaults.
    assert torch.equal(reference.rpn.anchor_generator.cell_anchors[0], model.rpn.anchor_generator.cell_anchors)
    # Frozen parts match: stem and res2 frozen (freeze_at 2), res3 onwards trainable.
    assert not reference.backbone.layer1[0].conv1.weight.requires_grad
    assert reference.backbone.layer2[0].conv1.weight.requires_grad


def test_reference_mirrors_batchnorm_and_trains_behind_detkits_api():
    from torch import nn
    from torchvision.ops.misc import FrozenBatchNorm2d

    # As configs/shapes_*.yaml: BatchNorm from scratch, nothing frozen.
    model = _tiny_model(
        **{
            "model.backbone.norm": "BN",
            "model.backbone.freeze_at": "0",
            "model.rpn.post_nms_topk_train": "16",
            "model.roi_heads.batch_size_per_image": "8",
            "model.roi_heads.pooler_resolution": "4",
        }
    )
    reference = build_torchvision_reference(model)
    assert isinstance(reference.backbone.bn1, nn.BatchNorm2d) and reference.backbone.conv1.weight.requires_grad
    assert isinstance(reference.roi_heads.box_head.layer4[0].downsample[1], nn.BatchNorm2d)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in reference.modules())
    assert torch.equal(reference.backbone.layer3[1].bn2.running_var, model.backbone.layer3[1].bn2.running_var)

    detector = TorchvisionDetector(reference).train()
    inputs = make_inputs(2, 64, 96, num_classes=5, boxes_per_image=2)
    losses = detector(ImageBatch.from_tensors(list(inputs.images)), inputs.targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert reference.backbone.conv1.weight.grad is not None


def test_reference_refuses_inputs_it_would_resize():
    reference = build_torchvision_reference(_tiny_model(), (64, 96))
    check_no_resize(reference, (64, 96))
    with pytest.raises(ValueError, match="resize"):
        check_no_resize(reference, (32, 48))  # min_size 64 would upsample it


@pytest.mark.slow
def test_torchvision_reference_gives_detkits_proposals_and_detections():
    model = _tiny_model(post_nms_topk_test=32)
    inputs = make_inputs(2, 96, 128, num_classes=5, seed=0)
    calibrate_(model, inputs.images)
    reference = build_torchvision_reference(model, (96, 128))
    model.batch_invariant = False  # torchvision runs a batch as one tensor: like with like, one RPN call

    captured = {}
    model.rpn.register_forward_hook(lambda m, a, out: captured.__setitem__("detkit", out))
    reference.rpn.register_forward_hook(lambda m, a, out: captured.__setitem__("torchvision", out))
    with torch.no_grad():
        ours = model(ImageBatch.from_tensors(list(inputs.images)))
        theirs = from_torchvision_detections(reference(to_torchvision_images(inputs.images)))

    proposals, valid, _ = captured["detkit"]
    for i, tv_boxes in enumerate(captured["torchvision"][0]):
        assert int(valid[i].sum()) == 32 == tv_boxes.shape[0]  # calibration: the full post-NMS top-k
        assert torch.allclose(proposals[i][valid[i]], tv_boxes, atol=BOX_TOL_PX, rtol=0)

    agreement = compare_detections(ours, theirs)
    assert agreement["num_a"] == agreement["num_b"] >= 20
    assert agreement["match_fraction"] == 1.0
    assert agreement["max_box_diff"] < BOX_TOL_PX
    assert agreement["max_score_diff"] < SCORE_TOL

    # Behind detkit's API (what the accuracy comparison trains and evaluates): the same detections,
    # rescaled to the original image size like detkit's.
    batch = ImageBatch.from_tensors(list(inputs.images), original_sizes=[(192, 256), (144, 192)])
    with torch.no_grad():
        ours = model(batch)
        theirs = TorchvisionDetector(reference).eval()(batch)
    agreement = compare_detections(ours, theirs)
    assert agreement["match_fraction"] == 1.0 and agreement["num_a"] >= 20
    assert agreement["max_box_diff"] < 2 * BOX_TOL_PX


def test_compare_detections_counts_only_same_label_overlaps():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 50.0]])
    a = [{"boxes": boxes, "scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([1, 2])}]
    same = compare_detections(a, a)
    assert same["matched"] == 2 and same["match_fraction"] == 1.0 and same["max_box_diff"] == 0.0
    relabelled = [{"boxes": boxes + 0.01, "scores": torch.tensor([0.8, 0.5]), "labels": torch.tensor([1, 3])}]
    other = compare_detections(a, relabelled)
    assert other["matched"] == 1 and other["match_fraction"] == 0.5
    assert other["max_box_diff"] == pytest.approx(0.01, abs=1e-5)
    assert other["max_score_diff"] == pytest.approx(0.1, abs=1e-6)
    assert (
        compare_detections(
            [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * 2,
            [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * 2,
        )["match_fraction"]
        == 1.0
    )


@pytest.mark.slow
def test_benchmark_tool_tiny_run_writes_the_promised_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = benchmark_main(
        [
            "--device",
            "cpu",
            "--threads",
            "1",
            "--depth",
            "18",
            "--image-size",
            "128",
            "128",
            "--batch-size",
            "1",
            "--iters",
            "1",
            "--warmup",
            "1",
            "--num-classes",
            "5",
            "--json",
            str(out),
            "model.rpn.post_nms_topk_test=16",
            "model.rpn.post_nms_topk_train=64",
            "model.roi_heads.batch_size_per_image=16",
            "model.roi_heads.pooler_resolution=7",
        ]
    )
    assert rc == 0
    assert "| infer | 1 | fp32 | detkit |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result) >= {"environment", "settings", "rows", "ratios", "agreement", "flops"}
    assert {"date", "commit", "command", "device", "load_average_start"} <= set(result["environment"])
    rows = {(r["model"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(m, s) for m in ("detkit", "torchvision") for s in ("infer", "train")}
    for row in rows.values():
        assert row["ims_per_s_median"] > 0 and row["ims_per_s_best"] >= row["ims_per_s_median"]
        assert row["time_ms_min"] > 0 and row["peak_mem_mb"] > row["state_mem_mb"] > 0
        assert row["rois_per_image"] == 16  # both models ran the same RoIs
    assert {r["mode"] for r in result["ratios"]} == {"infer", "train"}
    assert all(r["speedup_median"] > 0 for r in result["ratios"])
    assert result["agreement"][0]["match_fraction"] == 1.0
    flops = result["flops"]["infer"]
    assert flops["gflops_per_image"] > flops["res5_gflops_per_image"] > 0
    assert 0 < flops["res5_share"] < 1
    assert result["flops"]["train"]["gflops_per_image"] > flops["gflops_per_image"]  # forward + backward


def test_synthetic_coco_has_exactly_the_requested_detections():
    gt, predictions = make_synthetic_coco(num_images=20, dets_per_image=100, seed=1)
    assert len(gt["images"]) == 20 and len(gt["categories"]) == 80
    assert len(predictions) == 2000
    per_image = {}
    for p in predictions:
        per_image[p["image_id"]] = per_image.get(p["image_id"], 0) + 1
    assert set(per_image.values()) == {100}
    category_ids = {c["id"] for c in gt["categories"]}
    assert all(p["category_id"] in category_ids and p["bbox"][2] > 0 and p["bbox"][3] > 0 for p in predictions)
    assert 4 < len(gt["annotations"]) / 20 < 11


@pytest.mark.slow
def test_eval_benchmark_gives_the_same_ap_with_every_evaluator():
    result = run_eval_benchmark(num_images=40, dets_per_image=100, repeats=1)
    names = [r["evaluator"] for r in result["rows"]]
    assert names[0] == "pycocotools COCOeval (direct)"
    assert "detkit COCOEvaluator (pycocotools)" in names
    assert all(r["eval_s_min"] > 0 for r in result["rows"])
    assert 5 < result["rows"][0]["AP"] < 95
    assert result["max_ap_difference"] < 1e-9
