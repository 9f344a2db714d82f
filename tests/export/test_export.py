"""Export to ONNX / torch.export (pt2): the files hold the same model as the checkpoint.

One randomly initialised ResNet-18 C4 (64 px test size, 100 / 16 proposals, 4 x 4 RoIAlign) is
saved as a detkit checkpoint and exported once to each format (the ONNX export is the slow part,
~30 s on 2 cores). Random weights give dozens of detections per image, enough to pin boxes,
scores and labels. The images of the parity tests have other sizes than the export example
(a 480 x 640 photo resized to 64 x 85), so a size frozen into the graph would show.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detkit.config import config_to_dict, load_config
from detkit.engine.checkpoint import save_checkpoint
from detkit.engine.predictor import Predictor
from detkit.errors import CheckpointError, ConfigError, ExportError
from detkit.export import ExportedPredictor, export_model
from detkit.export.exporter import export_metadata, require_export_packages, smooth_random_image
from detkit.export.parity import compare_backends
from detkit.modeling import build_model

pytestmark = pytest.mark.slow  # one ONNX export (~30 s) and a few tool runs

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
CLASS_NAMES = ["circle", "square", "triangle"]
CATEGORY_IDS = [3, 7, 9]
# Original sizes of the parity images: resized (short side 64, long side <= 96) to 58 x 96, 96 x 58
# and 64 x 64, all other than the export example's 64 x 85.
PARITY_SIZES = [(90, 150), (150, 90), (70, 70)]

CONFIG = """\
_base_: {base}
device: cpu
model:
  depth: 18
  num_classes: 3
  rpn: {{anchor_sizes: [16, 32, 64], pre_nms_topk_test: 100, post_nms_topk_test: 16}}
  roi_heads: {{pooler_resolution: 4}}
data:
  test: [{{type: shapes, root: {data}, split: val, num_images: 4, image_size: [64, 64], num_classes: 3, max_objects: 3}}]
  min_size_test: 64
  max_size_test: 96
  num_workers: 0
test: {{ims_per_batch: 2}}
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(tmp dir, config path, checkpoint, Predictor, ONNX path, pt2 path)."""
    tmp = tmp_path_factory.mktemp("export")
    cfg_path = tmp / "tiny.yaml"
    cfg_path.write_text(CONFIG.format(base=ROOT / "configs" / "base.yaml", data=tmp / "shapes"))
    torch.manual_seed(0)
    cfg = load_config(cfg_path)
    model = build_model(cfg, load_weights=False).eval()
    weights = tmp / "model.pth"
    save_checkpoint(
        {
            "model": model.state_dict(),
            "config": config_to_dict(cfg),
            "class_names": CLASS_NAMES,
            "category_ids": CATEGORY_IDS,
            "iteration": 7,
        },
        weights,
    )
    predictor = Predictor(weights, device="cpu")
    onnx_path = export_model(predictor, tmp / "model.onnx", "onnx")
    pt2_path = export_model(predictor, tmp / "model.pt2", "pt2")
    return tmp, cfg_path, weights, predictor, onnx_path, pt2_path


@pytest.fixture(scope="module")
def loaded_pt2(exported):
    """The pt2 file loaded once (torch.export.load parses the program's symbolic shapes: seconds)."""
    return ExportedPredictor(exported[5])


def run_tool(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([PY, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr lines that are not Python warnings (torchvision's meta registrations warn under torch.export)."""
    return [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and "Warning" not in line and not line.startswith("  warnings.warn")
    ]


# ------------------------------------------------------------------------------------- parity


def test_onnx_runtime_gives_the_pytorch_detections_at_three_sizes(exported):
    _, _, _, predictor, onnx_path, _ = exported
    report = compare_backends(
        predictor, ExportedPredictor(onnx_path, score_thresh=predictor.score_thresh), PARITY_SIZES
    )
    for row in report["rows"]:
        assert row["same"], row
        assert row["reference"] >= 10  # enough detections to mean something
        assert row["max_box_diff_px"] <= 1e-3 and row["max_score_diff"] <= 1e-4, row
    # The three sizes really are three graph shapes.
    shapes = {tuple(predictor.preprocess(smooth_random_image(h, w)).shape) for h, w in PARITY_SIZES}
    assert shapes == {(3, 58, 96), (3, 96, 58), (3, 64, 64)}


def test_openvino_runs_the_onnx_file_with_the_pytorch_detections_at_three_sizes(exported):
    """--backend openvino: the same .onnx file compiled by OpenVINO (float32 forced) keeps eager's
    detections within the ONNX Runtime bounds."""
    _, _, _, predictor, onnx_path, _ = exported
    on_openvino = ExportedPredictor(onnx_path, backend="openvino", score_thresh=predictor.score_thresh)
    assert on_openvino.backend == "openvino"
    report = compare_backends(predictor, on_openvino, PARITY_SIZES)
    for row in report["rows"]:
        assert row["same"], row
        assert row["reference"] >= 10
        assert row["max_box_diff_px"] <= 1e-3 and row["max_score_diff"] <= 1e-4, row


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's stack_t through ctypes")
def test_openvino_models_leave_the_threads_signal_stack_as_they_found_it(exported):
    """Two OpenVINO models built, then freed in the order they were built. Without
    runtime.keep_signal_stack the thread was left with the first model's freed alternate signal
    stack, and the next signal handled in Python (Ctrl-C, or SIGCHLD once a DataLoader had installed
    its handler) ran on freed memory: the whole test suite segfaulted in malloc, tests later."""
    import ctypes
    import gc

    from detkit.export.runtime import _SignalStack

    libc = ctypes.CDLL(None)

    def current() -> tuple:
        stack = _SignalStack()
        assert libc.sigaltstack(None, ctypes.byref(stack)) == 0
        return stack.ss_sp, stack.ss_flags, stack.ss_size

    before = current()
    first = ExportedPredictor(exported[4], backend="openvino")
    second = ExportedPredictor(exported[4], backend="openvino")
    image = smooth_random_image(70, 70)
    assert len(first(image)) == len(second(image)) >= 10
    assert current() == before
    del first
    gc.collect()
    assert current() == before
    del second
    gc.collect()
    assert current() == before


def test_pt2_is_bit_identical_to_pytorch_at_three_sizes(exported, loaded_pt2):
    predictor, program = exported[3], loaded_pt2
    assert program.backend == "pt2" and program.score_thresh == predictor.score_thresh
    for index, (h, w) in enumerate(PARITY_SIZES):
        image = smooth_random_image(h, w, seed=index)
        ref, got = predictor(image), program(image)
        assert len(ref) >= 10
        np.testing.assert_array_equal(got.boxes, ref.boxes)
        np.testing.assert_array_equal(got.scores, ref.scores)
        np.testing.assert_array_equal(got.labels, ref.labels)


def test_onnx_graph_keeps_height_and_width_symbolic(exported):
    import onnx

    model = onnx.load(str(exported[4]), load_external_data=False)
    image, _original_size = model.graph.input
    assert [i.name for i in model.graph.input] == ["image", "original_size"]
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels"]
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_value == 3 and dims[1].dim_param and dims[2].dim_param  # (3, h, w)
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    ops = {node.op_type for node in model.graph.node}
    assert {"NonMaxSuppression", "RoiAlign", "TopK", "NonZero", "Softmax"} <= ops  # all of it inside


def test_metadata_travels_with_both_files(exported, loaded_pt2):
    _, _, _, predictor, onnx_path, _ = exported
    for loaded in (ExportedPredictor(onnx_path), loaded_pt2):
        assert loaded.class_names == CLASS_NAMES and loaded.category_ids == CATEGORY_IDS
        assert loaded.score_thresh == pytest.approx(0.05)
        assert loaded.cfg.data.min_size_test == 64 and loaded.cfg.data.max_size_test == 96
        assert loaded.metadata["input_format"] == "RGB"
        assert json.loads(loaded.metadata["pixel_mean"]) == pytest.approx(list(predictor.cfg.model.pixel_mean))
        assert loaded.iteration == 7
    assert set(export_metadata(predictor)) <= set(ExportedPredictor(onnx_path).metadata)


def test_a_score_threshold_below_the_exported_one_is_refused(exported):
    with pytest.raises(ConfigError, match=r"exported with score threshold 0\.05"):
        ExportedPredictor(exported[4], score_thresh=0.01)


# ------------------------------------------------------------------------------------- tools


def test_infer_onnxruntime_writes_what_the_pytorch_backend_writes(exported, tmp_path):
    _tmp, _, weights, _, onnx_path, _ = exported
    import cv2

    photos = tmp_path / "photos"
    photos.mkdir()
    for index, (h, w) in enumerate(PARITY_SIZES):
        cv2.imwrite(str(photos / f"img{index}.png"), smooth_random_image(h, w, seed=index)[:, :, ::-1])
    common = ["--input", photos, "--score-thresh", "0.1", "--workers", "0"]
    # Eager at its default batch size: batch-invariant, each image gets its detections alone, which
    # is what the exported graph computes.
    run_tool(ROOT / "tools" / "infer.py", "--weights", weights, "--output", tmp_path / "pt", *common)
    run_tool(
        ROOT / "tools" / "infer.py",
        "--backend",
        "onnxruntime",
        "--model",
        onnx_path,
        "--output",
        tmp_path / "ort",
        *common,
    )
    ref = json.loads((tmp_path / "pt" / "predictions.json").read_text())
    assert len(ref) >= 20
    got = json.loads((tmp_path / "ort" / "predictions.json").read_text())
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert (a["file_name"], a["category_id"], a["category_name"]) == (
            b["file_name"],
            b["category_id"],
            b["category_name"],
        )
        assert b["bbox"] == pytest.approx(a["bbox"], abs=1e-3) and b["score"] == pytest.approx(a["score"], abs=1e-4)
    summary_ref = json.loads((tmp_path / "pt" / "summary.json").read_text())
    summary = json.loads((tmp_path / "ort" / "summary.json").read_text())
    for key in ("images", "detections", "skipped", "ignored", "outputs", "score_thresh"):
        assert summary[key] == summary_ref[key], key
    for index in range(len(PARITY_SIZES)):
        drawn_ref = cv2.imread(str(tmp_path / "pt" / f"img{index}.png"))
        drawn = cv2.imread(str(tmp_path / "ort" / f"img{index}.png"))
        assert np.array_equal(drawn, drawn_ref)  # boxes within 1e-3 px round to the same pixels here


@pytest.mark.parametrize("name", ["onnx", "pt2"])
def test_eval_of_the_exported_model_equals_eval_of_the_checkpoint(exported, name):
    tmp, cfg_path, weights, _, onnx_path, pt2_path = exported
    if not (tmp / "eval_pt" / "metrics.json").exists():  # the checkpoint's evaluation, once for both
        run_tool(ROOT / "tools" / "eval.py", cfg_path, "--weights", weights, f"output_dir={tmp / 'eval_pt'}")
    model = {"onnx": onnx_path, "pt2": pt2_path}[name]
    proc = run_tool(ROOT / "tools" / "eval.py", "--model", model, cfg_path, f"output_dir={tmp / ('eval_' + name)}")
    assert "Per-class AP:" in proc.stdout
    ref = json.loads((tmp / "eval_pt" / "predictions.json").read_text())
    got = json.loads((tmp / f"eval_{name}" / "predictions.json").read_text())
    assert len(ref) >= 20 and len(got) == len(ref)
    for a, b in zip(ref, got):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert b["bbox"] == pytest.approx(a["bbox"], abs=1e-3) and b["score"] == pytest.approx(a["score"], abs=1e-4)
    metrics_ref = json.loads((tmp / "eval_pt" / "metrics.json").read_text())
    metrics = json.loads((tmp / f"eval_{name}" / "metrics.json").read_text())
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[key] == pytest.approx(metrics_ref[key], abs=1e-6, nan_ok=True), key


def test_export_cli_check_reports_parity_and_writes_a_loadable_file(exported, tmp_path):
    _, _, weights, _, _, _ = exported
    out = tmp_path / "cli.pt2"
    proc = run_tool(
        ROOT / "tools" / "export.py",
        "--weights",
        weights,
        "--format",
        "pt2",
        "--output",
        out,
        "--check",
        "100x80,64x200",
    )
    assert out.is_file() and not list(tmp_path.glob(".tmp-*"))
    assert "100x80:" in proc.stdout and "64x200:" in proc.stdout and "parity: same detections" in proc.stdout
    assert "max |box| diff 0.00e+00 px" in proc.stdout


# ------------------------------------------------------------------------------------- batched files

# Three batch compositions (original sizes of the images; the tests feed them unresized, so each
# image keeps its own size): one size three times, four mixed sizes, a small image with a large one.
# Every res4 map has more than 16 cells (backbone.small_map_conv2d takes the same path in all runs).
COMPOSITIONS = {
    "same size": [(58, 96)] * 3,
    "mixed sizes": [(58, 96), (96, 58), (80, 80), (72, 130)],
    "small with large": [(72, 72), (192, 288)],
}


@pytest.fixture(scope="module")
def batched(exported):
    """(batched ONNX path written by `detkit export --batched`, batched pt2 path)."""
    from detkit.cli.export import main as export_main

    tmp, _, weights, predictor, _, _ = exported
    onnx_path = tmp / "model_batched.onnx"
    assert export_main(["--weights", str(weights), "--format", "onnx", "--batched", "--output", str(onnx_path)]) == 0
    pt2_path = export_model(predictor, tmp / "model_batched.pt2", "pt2", batched=True)
    return onnx_path, pt2_path


def composition(name: str) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """(3, h, w) uint8 images of COMPOSITIONS[name] and their 'original' sizes (twice as large)."""
    sizes = COMPOSITIONS[name]
    images = [
        torch.from_numpy(smooth_random_image(h, w, seed=i)).permute(2, 0, 1).contiguous()
        for i, (h, w) in enumerate(sizes)
    ]
    return images, [(2 * h, 2 * w) for h, w in sizes]


def assert_same_detections(got, ref) -> None:
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert len(b) >= 5  # random weights: enough detections to pin
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("name", list(COMPOSITIONS))
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "pt2"])
def test_a_batched_file_gives_each_image_its_single_image_detections(exported, batched, loaded_pt2, backend, name):
    """One call of the batched file on the padded batch equals the one-image file run image by image,
    bit for bit, on the same runtime; for pt2 also the eager model."""
    _, _, _, predictor, onnx_path, _ = exported
    images, originals = composition(name)
    if backend == "pt2":
        single, ref_eager = (
            loaded_pt2,
            [predictor.predict_preprocessed([im], [o])[0] for im, o in zip(images, originals)],
        )
        many = ExportedPredictor(batched[1], batch_size=8)
    else:
        single, ref_eager = ExportedPredictor(onnx_path, backend=backend, batch_size=1), None
        many = ExportedPredictor(batched[0], backend=backend, batch_size=8)
    assert many.batched and not single.batched
    ref = single.predict_preprocessed(images, originals)
    assert_same_detections(many.predict_preprocessed(images, originals), ref)
    if ref_eager is not None:
        assert_same_detections(ref, ref_eager)


def test_a_batched_file_takes_n_h_w_free_and_pads_past_each_image(exported, batched):
    import onnx

    from detkit.export.runtime import pad_batch

    model = onnx.load(str(batched[0]), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["images", "image_sizes", "original_sizes"]
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels", "num_detections"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == 3 and dims[2].dim_param and dims[3].dim_param
    assert [node.op_type for node in model.graph.node][-1] == "Loop"
    images, originals = composition("mixed sizes")
    for path in batched:
        runner = ExportedPredictor(path)
        assert runner.metadata["batched"] == "true" and "num_detections" in runner.metadata["outputs"]
        boxes, scores, labels, counts = runner.runner.run_batch(
            *pad_batch(images, [im.shape[1:] for im in images], originals)
        )
        d = exported[3].cfg.model.roi_heads.detections_per_image
        assert boxes.shape == (4, d, 4) and scores.shape == labels.shape == (4, d) and counts.shape == (4,)
        for i, n in enumerate(counts.tolist()):
            assert 5 <= n < d
            assert (labels[i, n:] == -1).all() and (scores[i, n:] == 0).all() and (boxes[i, n:] == 0).all()
            assert (labels[i, :n] >= 0).all() and (np.diff(scores[i, :n]) <= 0).all()  # best first


def test_infer_and_eval_run_a_batched_onnx_file_as_the_one_image_file(exported, batched, tmp_path):
    tmp, cfg_path, _, _, onnx_path, _ = exported
    import cv2

    photos = tmp_path / "photos"
    photos.mkdir()
    for index, (h, w) in enumerate(PARITY_SIZES):
        cv2.imwrite(str(photos / f"img{index}.png"), smooth_random_image(h, w, seed=index)[:, :, ::-1])
    for model, out in ((onnx_path, "one"), (batched[0], "batched")):
        run_tool(
            ROOT / "tools" / "infer.py",
            "--backend",
            "onnxruntime",
            "--model",
            model,
            "--input",
            photos,
            "--output",
            tmp_path / out,
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--score-thresh",
            "0.1",
        )
    ref = json.loads((tmp_path / "one" / "predictions.json").read_text())
    assert len(ref) >= 20 and json.loads((tmp_path / "batched" / "predictions.json").read_text()) == ref
    # tools/eval.py hands the padded batch (test.ims_per_batch 2) to the file in one call.
    run_tool(ROOT / "tools" / "eval.py", "--model", batched[0], cfg_path, f"output_dir={tmp_path / 'eval'}")
    if not (tmp / "eval_onnx" / "predictions.json").exists():
        run_tool(ROOT / "tools" / "eval.py", "--model", onnx_path, cfg_path, f"output_dir={tmp / 'eval_onnx'}")
    ref = json.loads((tmp / "eval_onnx" / "predictions.json").read_text())
    assert len(ref) >= 20 and json.loads((tmp_path / "eval" / "predictions.json").read_text()) == ref


def test_serve_runs_a_batched_file_on_openvino_one_call_per_batch(exported, batched, tmp_path):
    """`detkit serve --backend openvino --model model_batched.onnx`: concurrent requests of three
    sizes run as one call of the batched file, each answered with its one-image file's detections."""
    import cv2

    from detkit.data import read_image
    from tests.serve.test_server import detect, in_threads, start_server, wait_ready

    onnx_path = exported[4]
    sizes = [(90, 150), (150, 90), (70, 70)]
    files = []
    for index, (h, w) in enumerate(sizes):
        files.append(tmp_path / f"img{index}.png")
        cv2.imwrite(str(files[-1]), smooth_random_image(h, w, seed=index)[:, :, ::-1])
    server = start_server(
        *("--backend", "openvino", "--model", str(batched[0]), "--max-batch", "8", "--max-wait-ms", "1500"),
        *("--threads", "1", "--score-thresh", "0.05"),
    )
    try:
        wait_ready(server)
        threads, answers = in_threads(lambda path: detect(server, path.read_bytes(), "", "image/png"), files)
        for thread in threads:
            thread.join(120)
    finally:
        server.proc.terminate()
        server.proc.wait(60)
    single = ExportedPredictor(onnx_path, backend="openvino")
    for path, answer in zip(files, answers):
        assert not isinstance(answer, Exception), answer
        status, _, result = answer
        assert status == 200, result
        assert result["batch_size"] == 3  # all three in one call of the batched file
        ref = single(read_image(path))
        assert len(ref) >= 5 and result["labels"] == ref.labels.tolist()
        np.testing.assert_array_equal(np.float32(result["boxes"]), ref.boxes)
        np.testing.assert_array_equal(np.float32(result["scores"]), ref.scores)


def test_batched_files_benchmark_reuses_the_files_and_finds_them_equal(exported, batched, capsys):
    from benchmarks.batched_files import main as bench_main

    tmp, _, weights, _, _, _ = exported
    before = {p.name: p.stat().st_mtime_ns for p in tmp.glob("model*")}
    code = bench_main(
        [str(weights), "--export-dir", str(tmp), "--batch-size", "3", "--rounds", "2", "--warmup", "0", "--pt2"]
    )
    out = capsys.readouterr().out
    assert code == 0 and {p.name: p.stat().st_mtime_ns for p in tmp.glob("model*")} == before  # nothing re-exported
    for backend in ("onnxruntime", "openvino", "pt2"):
        assert f"| {backend} batched file |" in out and f"- {backend}: detections per image" in out
    assert out.count("bit-identical") == 3


def test_batched_aoti_and_batched_int8_are_refused_with_one_line(exported, tmp_path):
    from detkit.cli.export import main as export_main

    weights = str(exported[2])
    with pytest.raises(ConfigError, match="batched files are onnx and pt2 only"):
        export_main(["--weights", weights, "--format", "aoti", "--batched", "--output", str(tmp_path / "m.pt2")])
    with pytest.raises(ConfigError, match="--int8-res5 with --batched"):
        export_main(
            [
                "--weights",
                weights,
                "--batched",
                "--int8-res5",
                "--calibration",
                str(tmp_path),
                "--output",
                str(tmp_path / "m.onnx"),
            ]
        )
    with pytest.raises(ExportError, match="batched files are onnx and pt2 only"):
        export_model(exported[3], tmp_path / "m.pt2", "aoti", batched=True)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- errors


def test_a_checkpoint_that_is_not_detkit_is_one_line_and_exit_2(tmp_path):
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    proc = run_tool(ROOT / "tools" / "export.py", "--weights", foreign, "--output", tmp_path / "m.onnx", check=False)
    assert proc.returncode == 2
    assert error_lines(proc) == [error_lines(proc)[0]] and "not a detkit checkpoint" in proc.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_a_missing_output_folder_is_one_line_and_exit_2(exported, tmp_path):
    proc = run_tool(
        ROOT / "tools" / "export.py", "--weights", exported[2], "--output", tmp_path / "no" / "m.onnx", check=False
    )
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "does not exist" in proc.stderr


def test_an_onnx_file_from_another_tool_is_one_line_and_exit_2(exported, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    foreign = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    with pytest.raises(CheckpointError, match="no detkit metadata"):
        ExportedPredictor(foreign)
    photos = tmp_path / "photos"
    photos.mkdir()
    import cv2

    cv2.imwrite(str(photos / "a.png"), smooth_random_image(40, 40))
    proc = run_tool(
        ROOT / "tools" / "infer.py",
        "--backend",
        "onnxruntime",
        "--model",
        foreign,
        "--input",
        photos,
        "--output",
        tmp_path / "out",
        check=False,
    )
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "not written by tools/export.py" in proc.stderr
    # A pt2 file given to the ONNX backend (and the other way round): one message too.
    with pytest.raises(CheckpointError, match="is not an ONNX file"):
        ExportedPredictor(exported[5], backend="onnxruntime")
    with pytest.raises(CheckpointError, match=r"is not a torch.export \(\.pt2\) file"):
        ExportedPredictor(exported[4], backend="pt2")


def test_missing_export_packages_name_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ExportError, match=r'onnxruntime not installed.*pip install "detkit\[export\]"'):
        require_export_packages()


def test_a_part_that_cannot_be_exported_is_named_not_traced(exported, tmp_path, monkeypatch):
    from detkit.export.graph import SingleImageDetector

    def data_dependent_detections(self, features, proposals, image_size, original_size):
        if proposals.sum() > 0:  # a Python branch on tensor values: torch.export cannot trace it
            return proposals, proposals[:, 0], proposals[:, 0].long()
        return proposals, proposals[:, 1], proposals[:, 1].long()

    monkeypatch.setattr(SingleImageDetector, "detections", data_dependent_detections)
    with pytest.raises(ExportError, match=r"ONNX export failed at detkit/export/graph.py:\d+ in forward: ") as info:
        export_model(exported[3], tmp_path / "broken.onnx", "onnx")
    assert "\n" not in str(info.value) and len(str(info.value)) < 500
    assert not (tmp_path / "broken.onnx").exists() and not list(tmp_path.glob(".tmp-*"))


# ------------------------------------------------------------------------------------- int8 res5


def write_images(folder: Path, sizes, seed: int = 100) -> list[np.ndarray]:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    images = [smooth_random_image(h, w, seed=seed + i) for i, (h, w) in enumerate(sizes)]
    for i, image in enumerate(images):
        cv2.imwrite(str(folder / f"{i:03d}.png"), image[:, :, ::-1])  # RGB -> BGR on disk
    return images


def test_int8_res5_quantizes_res5_only_and_keeps_the_detections(exported, tmp_path):
    import onnx

    from detkit.benchmark.calibration import compare_detections
    from detkit.export.quantize import QUANTIZATION_KEY, quantize_res5, res5_nodes

    _, _, _, _, onnx_path, _ = exported
    write_images(tmp_path / "calib", [(80, 120), (120, 80), (96, 96), (64, 128)])
    out = quantize_res5(onnx_path, tmp_path / "int8.onnx", tmp_path / "calib", num_images=3)
    assert out.is_file() and not list(tmp_path.glob(".tmp-*"))

    fp32, int8 = onnx.load(str(onnx_path)), onnx.load(str(out))
    res5 = res5_nodes(fp32)
    # R18 res5: two BasicBlocks of two 3 x 3 convs, and the shortcut; on these 4 x 4 RoI maps they
    # run as GEMMs (backbone.Conv2d), exported as MatMul.
    assert len(res5) == 5
    dequantized = {o for n in int8.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.name for n in int8.graph.node if n.op_type in ("Conv", "MatMul") and set(n.input) & dequantized}
    assert quantized == set(res5)  # every res5 conv, nothing else
    for op in ("Conv", "MatMul"):
        assert sum(n.op_type == op for n in int8.graph.node) == sum(n.op_type == op for n in fp32.graph.node)
    meta_fp32 = {p.key: p.value for p in fp32.metadata_props}
    meta_int8 = {p.key: p.value for p in int8.metadata_props}
    info = json.loads(meta_int8.pop(QUANTIZATION_KEY))
    assert meta_int8 == meta_fp32
    assert info["nodes"] == 5 and info["calibration_images"] == 3 and info["method"] == "MinMax"

    # The tiny random model's detections survive int8 res5: every one of the fp32 file's 10 best
    # has a same-label twin at IoU >= 0.9, scores within 0.05.
    images = [smooth_random_image(h, w, seed=7 + i) for i, (h, w) in enumerate(PARITY_SIZES)]
    fp32_dets = ExportedPredictor(onnx_path).predict(images)
    int8_dets = ExportedPredictor(out).predict(images)
    for a, b in zip(fp32_dets, int8_dets):
        top = {
            "boxes": torch.from_numpy(a.boxes[:10]),
            "scores": torch.from_numpy(a.scores[:10]),
            "labels": torch.from_numpy(a.labels[:10]),
        }
        other = {
            "boxes": torch.from_numpy(b.boxes),
            "scores": torch.from_numpy(b.scores),
            "labels": torch.from_numpy(b.labels),
        }
        match = compare_detections([top], [other], iou_thresh=0.9)
        assert match["matched"] == len(top["scores"]) > 0, match
        assert match["max_score_diff"] < 0.05


def test_int8_res5_cli_writes_a_file_tools_can_run(exported, tmp_path):
    _, _, weights, _, _, _ = exported
    write_images(tmp_path / "calib" / "nested", [(80, 120), (120, 80)])
    out = tmp_path / "int8.onnx"
    proc = run_tool(
        ROOT / "tools" / "export.py",
        "--weights",
        weights,
        "--output",
        out,
        "--int8-res5",
        "--calibration",
        tmp_path / "calib",
        "--num-calibration",
        "5",
    )
    assert "(onnx, int8 res5," in proc.stdout
    assert "pre-processing before quantization" not in proc.stdout + proc.stderr  # ORT's advice, not ours
    assert "fewer than --num-calibration 5: using all of them" in proc.stdout  # detkit logs to stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "int8.onnx"]  # no temporary files left
    predictor = ExportedPredictor(out)
    assert json.loads(predictor.metadata["quantization"])["calibration_images"] == 2
    dets = predictor(smooth_random_image(90, 150))
    assert len(dets) > 0 and (dets.scores >= 0.05).all() and set(dets.labels) <= {0, 1, 2}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--int8-res5", "--format", "pt2", "--calibration", "."], "--int8-res5 needs --format onnx"),
        (["--int8-res5"], "--int8-res5 needs --calibration DIR"),
        (["--int8-res5", "--calibration", "no/such/folder"], "--calibration no/such/folder: no such folder"),
        (["--int8-res5", "--calibration", "configs"], "--calibration configs: no images"),
        (["--int8-res5", "--calibration", ".", "--check", "64x64"], "measure an int8 file with tools/eval.py"),
        (["--calibration", "."], "--calibration is only used with --int8-res5"),
    ],
)
def test_int8_res5_bad_arguments_are_one_line_and_exit_2(exported, tmp_path, extra, message):
    proc = run_tool(
        ROOT / "tools" / "export.py", "--weights", exported[2], "--output", tmp_path / "m.onnx", *extra, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert len(error_lines(proc)) == 1 and message in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing exported


def test_trace_export_parity_reads_the_stages_out_of_the_onnx_file(exported, tmp_path):
    """benchmarks.trace_export_parity: the copy of the graph with stage outputs gives the file's own
    detections, its res4 map / proposals / class logits are the eager stages' within float32
    kernel rounding, and eager compared with itself shows no difference at any stage."""
    import onnxruntime as ort

    from benchmarks import trace_export_parity as trace
    from detkit.export.graph import SingleImageDetector

    _, _, _, predictor, onnx_path, _ = exported
    staged = tmp_path / "staged.onnx"
    trace.onnx_with_stages(str(onnx_path), staged)
    session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    detector = SingleImageDetector(predictor.model, predictor.cfg.data.size_divisibility).eval()
    image = torch.from_numpy(smooth_random_image(64, 96, seed=3)).permute(2, 0, 1).contiguous()
    got = trace.ort_stages(session, image)
    ref = trace.eager_stages(detector, image)
    boxes, scores, labels = plain.run(None, {"image": image.numpy(), "original_size": np.array([64, 96])})
    assert np.array_equal(got["boxes"], boxes) and np.array_equal(got["scores"], scores)
    assert np.array_equal(got["labels"], labels)
    assert got["features"].shape == ref["features"].shape == (1, 256, 4, 6)
    assert np.abs(got["features"] - ref["features"]).max() <= 1e-5 * np.abs(ref["features"]).max()
    assert got["proposals"].shape == ref["proposals"].shape and got["cls_logits"].shape == ref["cls_logits"].shape
    exact = ref["features"].astype(np.float64)
    same = trace.compare(ref, ref, exact)
    assert same["features_max_abs_diff"] == 0.0 and same["features_rel_err_vs_float64"] == 0.0
    assert same["proposals_first_rank_differing_by_0.01px"] == len(ref["proposals"]) == 16
    assert same["cls_logits_max_abs_diff"] == 0.0 and same["same_labels_in_order"]
    assert same["max_box_diff_px"] == 0.0 and same["matched_iou_0.99"] == len(ref["scores"])
    row = trace.compare(ref, got, exact)
    assert row["detections"][0] == row["detections"][1] and row["matched_iou_0.99"] == len(ref["scores"])


def test_an_existing_output_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    missing = tmp_path / "no_such_checkpoint.pth"
    proc = run_tool(ROOT / "tools" / "export.py", "--weights", missing, "--output", out, check=False)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"error: --output {out} already exists: add --overwrite to replace it, or give another file name"
    ]
    assert out.read_bytes() == b"an earlier export"
    # With --overwrite the output is no obstacle: the next check (the checkpoint) is what stops it.
    proc = run_tool(ROOT / "tools" / "export.py", "--weights", missing, "--output", out, "--overwrite", check=False)
    assert proc.returncode == 2 and "already exists" not in proc.stderr and "no_such_checkpoint.pth" in proc.stderr


# ------------------------------------------------------------------------------------- TorchScript, retired


def test_torchscript_is_retired_with_one_line_that_points_to_pt2(exported, tmp_path):
    _, _, weights, _, onnx_path, _ = exported
    proc = run_tool(
        ROOT / "tools" / "export.py",
        "--weights",
        weights,
        "--format",
        "torchscript",
        "--output",
        tmp_path / "m.pt",
        check=False,
    )
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "TorchScript was retired" in proc.stderr and "--format pt2" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing exported
    # A .pt file from an earlier detkit, or any file run with --backend torchscript: the same pointer.
    old = tmp_path / "model.pt"
    old.write_bytes(b"an earlier TorchScript export")
    with pytest.raises(ConfigError, match=r"TorchScript was retired.*--format pt2"):
        ExportedPredictor(old)
    with pytest.raises(ConfigError, match=r"TorchScript was retired.*--backend pt2"):
        ExportedPredictor(onnx_path, backend="torchscript")
    with pytest.raises(ExportError, match=r"--format torchscript: TorchScript was retired"):
        export_model(exported[3], tmp_path / "m.pt", "torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
