"""tools/benchmark.py --mode export (detkit.export.benchmark) on a tiny R18: the calibrated model
is reproducible from the options alone (benchmarks.trace_export_parity rebuilds it), the RPN keeps the
full top-k, the pt2 file is bit-identical, ONNX Runtime gives the same detections, and every backend
(the int8 res5 file included) is timed."""

from __future__ import annotations

import pytest
import torch

from detkit.benchmark.calibration import make_inputs
from detkit.export.benchmark import (
    ExportBenchOptions,
    benchmark_images,
    calibrated_model,
    export_table,
    run_export_benchmark,
)

pytestmark = pytest.mark.slow  # one ONNX and one pt2 export of an R18 and an int8 quantization (~30 s)

OPTIONS = dict(
    depth=18,
    num_classes=3,
    image_size=(96, 128),
    parity_sizes=((64, 96), (112, 80)),
    warmup=0,
    repeats=2,
    overrides=("model.rpn.pre_nms_topk_test=200", "model.rpn.post_nms_topk_test=40"),
)


def test_the_calibrated_model_and_images_are_rebuilt_from_the_options():
    options = ExportBenchOptions(**OPTIONS)
    a, b = calibrated_model(options).model.state_dict(), calibrated_model(options).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = benchmark_images(options)
    assert [tuple(i.shape) for i in images] == [(3, 96, 128), (3, 64, 96), (3, 112, 80)]
    assert torch.equal(images[0], make_inputs(1, 96, 128, 3, seed=0).images[0])
    assert torch.equal(images[2], make_inputs(1, 112, 80, 3, seed=12).images[0])


def test_export_benchmark_times_four_backends_and_checks_parity(tmp_path):
    import cv2

    files = tmp_path / "files"
    result = run_export_benchmark(ExportBenchOptions(**OPTIONS, keep_dir=str(files), int8=True, int8_images=2))
    assert sorted(p.name for p in files.iterdir()) == [
        "int8_calibration",
        "model.onnx",
        "model.pt2",
        "model_int8_res5.onnx",
    ]
    calibration = sorted((files / "int8_calibration").iterdir())
    assert [p.name for p in calibration] == ["0000.png", "0001.png"]  # generated like the timed image
    assert (
        cv2.imread(str(calibration[1]))[:, :, ::-1].tolist()
        == make_inputs(1, 96, 128, 3, seed=1001).images[0].permute(1, 2, 0).tolist()
    )
    assert [r["backend"] for r in result["rows"]] == [
        "pytorch eager",
        "pt2",
        "onnxruntime",
        "onnxruntime int8 res5",
    ]
    assert sorted(result["export_s"]) == ["int8 res5", "onnx", "pt2"]
    for row in result["rows"]:
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        assert row["time_ms_min"] == pytest.approx(min(row["times_s"]) * 1000)
    assert result["rows"][0]["vs_eager_median"] == 1.0
    assert result["proposals_per_image"] == [40, 40, 40]  # calibration: the RPN keeps its full top-k
    by_backend = {}
    for p in result["parity"]:
        by_backend.setdefault(p["backend"], []).append(p)
    assert [p["size"] for p in by_backend["pt2"]] == [[96, 128], [64, 96], [112, 80]]
    for p in by_backend["pt2"]:
        assert p["eager"] > 0 and p["same_count_and_labels"]
        assert p["max_box_diff_px"] == 0.0 and p["max_score_diff"] == 0.0
    for p in by_backend["onnxruntime"]:
        assert p["exported"] == p["eager"] > 0
        if p["same_count_and_labels"]:
            assert p["max_box_diff_px"] < 1e-3 and p["max_score_diff"] < 1e-4
        else:  # near-tied scores may swap places; every detection still has its twin
            assert p["matched_iou_0.99"] == p["eager"]
    assert len(by_backend["onnxruntime int8 res5"]) == 3  # compared too (int8 claims no parity)
    assert "onnxruntime int8 res5" in export_table(result)
