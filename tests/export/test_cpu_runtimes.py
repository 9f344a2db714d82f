"""benchmarks.cpu_runtimes on a tiny R18: the files are built once and reused, every ONNX Runtime
variant gives eager's detections, the rows are timed interleaved with per-round ratios to eager;
and the `openvino` backend names its extra when the package is missing.

OpenVINO itself is not installed by the dev extra (CI does not have it), so the benchmark runs
here with openvino=False; its OpenVINO rows are measured by hand (docs, "The fastest CPU runtime")."""

from __future__ import annotations

import importlib.util

import pytest

from benchmarks.cpu_runtimes import build_files, run_cpu_runtimes, table
from detkit.errors import ExportError
from detkit.export.benchmark import ExportBenchOptions
from detkit.export.runtime import load_exported, require_openvino

OPTIONS = dict(
    depth=18,
    num_classes=3,
    image_size=(64, 96),
    parity_sizes=((80, 64),),
    warmup=0,
    repeats=2,
    threads=1,
    overrides=("model.rpn.pre_nms_topk_test=100", "model.rpn.post_nms_topk_test=24"),
    int8_images=1,
)


@pytest.mark.slow  # one ONNX export of an R18 (~25 s) and an int8 quantization on one image
def test_cpu_runtimes_reuses_its_files_and_every_onnx_runtime_variant_keeps_the_detections(tmp_path):
    options = ExportBenchOptions(**OPTIONS)
    fp32, int8, seconds = build_files(options, tmp_path, int8_images=1, reuse=True)
    assert sorted(seconds) == ["int8 res5 quantization", "onnx export"]  # nothing there yet: both built
    stamps = (fp32.stat().st_mtime_ns, int8.stat().st_mtime_ns)

    result = run_cpu_runtimes(options, tmp_path, ort_levels=("all", "disabled"), openvino=False, reuse=True)
    assert result["files_s"] == {}  # reused, not rebuilt
    assert (fp32.stat().st_mtime_ns, int8.stat().st_mtime_ns) == stamps
    assert result["threads"] == 1
    rows = result["rows"]
    assert [r["backend"] for r in rows] == [
        "pytorch eager",
        "onnxruntime fp32 (all)",
        "onnxruntime fp32 (disabled)",
        "onnxruntime int8 res5",
    ]
    eager_times = rows[0]["times_s"]
    for row in rows:
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        assert row["vs_eager_per_round"] == pytest.approx([t / e for t, e in zip(row["times_s"], eager_times)])
    assert rows[0]["vs_eager_median"] == 1.0

    # Both images, every runtime; float32 ONNX Runtime at either level finds eager's detections.
    assert [(p["size"], p["backend"]) for p in result["parity"]] == [
        (size, name) for size in ([64, 96], [80, 64]) for name in [r["backend"] for r in rows[1:]]
    ]
    for p in result["parity"]:
        assert p["eager"] > 0
        if "fp32" in p["backend"]:
            assert p["same_detections"] and p["exported"] == p["eager"], p
            if p["same_count_and_labels"]:
                assert p["max_box_diff_px"] < 1e-3 and p["max_score_diff"] < 1e-4, p
    text = table(result)
    assert text.count("| onnxruntime fp32 (all) |") == 3  # the timing row and one per image
    assert "same " in text


def test_the_openvino_backend_names_its_extra_when_openvino_is_missing(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(ExportError, match=r'openvino not installed.*pip install "detkit\[openvino\]"'):
        require_openvino()
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read: the missing package is named first")
    with pytest.raises(ExportError, match=r"detkit\[openvino\]"):
        load_exported(model, "openvino")


def test_eval_runtime_is_for_exported_files_only(tmp_path):
    from detkit.cli import eval as eval_cli
    from detkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--runtime openvino runs an exported file: give --model FILE.onnx"):
        eval_cli.main(["--weights", str(tmp_path / "model.pth"), "--runtime", "openvino"])
