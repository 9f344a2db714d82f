"""Write a detkit checkpoint as one self-contained ONNX, torch.export or AOTInductor file (`tools/export.py`).

    predictor = Predictor("output/model_final.pth", device="cpu")
    export_model(predictor, "model.onnx", fmt="onnx")            # or fmt="pt2" / "aoti", "model.pt2"

The file holds the whole test-time model of `detkit.export.graph.SingleImageDetector` (image in,
detections out) and, as ONNX metadata_props / torch.export extra files / AOTInductor package
metadata, everything a consumer needs besides it (`export_metadata`): class names and dataset
category ids, the input channel order, the pixel statistics (already inside the graph;
informative), the test-time resize rule and the detkit config it was built from.

All three go through `torch.export` with H and W symbolic (`export_program`): ONNX then lowers the
program with onnxscript (nonzero, top-k of min(k, M), torchvision's nms and roi_align become ONNX
ops); "pt2" saves the ExportedProgram itself (`torch.export.save`, run by `torch.export.load`: the
eager kernels, bit-identical); "aoti" compiles it ahead of time with AOTInductor into a `.pt2`
package of a shared library for the CPU it is built on (loadable from Python and from C++).
TorchScript (`--format torchscript`) is retired: RETIRED_FORMATS says why and what replaces it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from detkit.errors import ExportError
from detkit.utils.files import atomic_output

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2", "aoti")
# Formats detkit wrote before, with the one-line reason and replacement shown to whoever asks for them.
RETIRED_FORMATS = {
    "torchscript": "TorchScript was retired: PyTorch deprecates it in favour of torch.export, and torch 2.14 "
    "no longer supports torch.jit.save / torch.jit.load on Python 3.14+; use --format pt2 (torch.export, "
    "bit-identical to eager, run with --backend pt2) or --format aoti (compiled, loadable from C++)",
}
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "aoti": ".pt2"}
# Bumped when the inputs, outputs or metadata keys change; consumers check it.
EXPORT_FORMAT_VERSION = "1"
METADATA_VERSION_KEY = "detkit_export_version"
INPUT_NAMES = ("image", "original_size")
OUTPUT_NAMES = ("boxes", "scores", "labels")
EXTRA_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


def require_export_packages(names=EXTRA_PACKAGES) -> None:
    """ExportError naming the `export` extra when onnx / onnxruntime / onnxscript is missing."""
    import importlib.util

    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"{', '.join(missing)} not installed: ONNX export and ONNX Runtime inference need the export extra, "
            'pip install "detkit[export]"'
        )


def export_metadata(predictor) -> dict[str, str]:
    """String key -> string value pairs stored with the model (JSON for lists and the config)."""
    from detkit.config import config_to_dict

    cfg = predictor.cfg
    return {
        METADATA_VERSION_KEY: EXPORT_FORMAT_VERSION,
        "class_names": json.dumps(predictor.class_names),
        "category_ids": json.dumps(predictor.category_ids),
        "input_format": cfg.model.input_format,
        "pixel_mean": json.dumps(list(cfg.model.pixel_mean)),
        "pixel_std": json.dumps(list(cfg.model.pixel_std)),
        "resize": json.dumps(
            {
                "min_size_test": cfg.data.min_size_test,
                "max_size_test": cfg.data.max_size_test,
                "resize_method": getattr(cfg.data, "resize_method", "cv2"),
                "rule": "Detectron2's ResizeShortestEdge, bilinear (README, Export)",
            }
        ),
        "size_divisibility": str(cfg.data.size_divisibility),
        "score_thresh": repr(float(cfg.model.roi_heads.score_thresh)),
        "inputs": "image: (3, h, w) uint8 resized image in input_format channel order; "
        "original_size: (2,) int64 (h0, w0) the size before resizing",
        "outputs": "boxes: (D, 4) float32 xyxy in original pixels; scores: (D,) float32; "
        "labels: (D,) int64 index into class_names; best first",
        "config": json.dumps(config_to_dict(cfg)),
        "iteration": str(predictor.iteration),
    }


def example_input(predictor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random image at the model's test size for a 480 x 640 photo: (3, h, w) uint8, (2,)."""
    from detkit.data.transforms import resized_hw

    data = predictor.cfg.data
    h, w = resized_hw(480, 640, data.min_size_test, data.max_size_test)
    generator = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (1, 3, max(h // 16, 2), max(w // 16, 2)), generator=generator).float()
    image = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return image[0].round().clamp(0, 255).to(torch.uint8), torch.tensor([480, 640], dtype=torch.int64)


def build_single_image_detector(predictor):
    from detkit.export.graph import SingleImageDetector

    if predictor.cfg.model.compile:
        raise ExportError("model.compile=true: export the eager model (add the override model.compile=false)")
    return SingleImageDetector(predictor.model.float().cpu().eval(), predictor.cfg.data.size_divisibility).eval()


def export_model(predictor, output: str | Path, fmt: str) -> Path:
    """Write `predictor`'s model to `output` as `fmt` ("onnx" | "pt2" | "aoti"); returns the path.

    predictor: a `Predictor`, or anything with its `model`, `cfg`, `class_names`, `category_ids`
    and `iteration` (the export benchmark passes a calibrated model that has no checkpoint).

    The file is written next to `output` and renamed over it, so an interrupted export leaves
    no half-written model.
    """
    if fmt in RETIRED_FORMATS:
        raise ExportError(f"--format {fmt}: {RETIRED_FORMATS[fmt]}")
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    output = Path(output)
    if not output.parent.is_dir():
        raise ExportError(f"--output {output}: folder {output.parent} does not exist")
    if fmt == "onnx":
        require_export_packages()
    detector = build_single_image_detector(predictor)
    image, original_size = example_input(predictor)
    metadata = export_metadata(predictor)
    start = time.perf_counter()
    with atomic_output(output) as tmp_path:
        if fmt == "onnx":
            _export_onnx(detector, image, original_size, metadata, str(tmp_path))
        elif fmt == "pt2":
            program = export_program(detector, image, original_size)
            torch.export.save(program, str(tmp_path), extra_files=metadata)
        else:
            _export_aoti(export_program(detector, image, original_size), metadata, str(tmp_path))
    logger.info(
        "exported %s (%s, %.1f MB) in %.1f s", output, fmt, output.stat().st_size / 2**20, time.perf_counter() - start
    )
    return output


def export_program(detector, image: torch.Tensor, original_size: torch.Tensor) -> torch.export.ExportedProgram:
    """`detector` (graph.SingleImageDetector) as a torch.export ExportedProgram with the image's
    h and w symbolic: image (3, h, w) uint8, original_size (2,) int64 -> boxes, scores, labels.

    Non-strict export (the Python of the model runs on fake tensors): the model's code needs no
    rewrite, and the shapes it branches on (backbone.small_map_conv2d) stay free. ExportError
    naming the failing line of detkit's code when it cannot be exported.
    """
    from torch.export import Dim

    dynamic_shapes = ({1: Dim.DYNAMIC, 2: Dim.DYNAMIC}, None)  # image (3, h, w): h and w free
    try:
        with torch.no_grad():
            return torch.export.export(detector, (image, original_size), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch.export raises many kinds; name the part instead of a trace
        where, error = _failing_part(exc)
        raise ExportError(f"torch.export failed at {where}: {type(error).__name__}: {one_line(error)}") from exc


def _export_aoti(program: torch.export.ExportedProgram, metadata: dict[str, str], path: str) -> None:
    """AOTInductor: the program compiled to C++ / a shared library for this machine's CPU, packaged
    with its weights and `metadata` (AOTIModelPackageLoader::get_metadata in C++) into `path`."""
    try:
        # torch 2.14 has no public successor of this entry point yet (torch._inductor's own docs use it).
        torch._inductor.aoti_compile_and_package(
            program, package_path=path, inductor_configs={"aot_inductor.metadata": dict(metadata)}
        )
    except Exception as exc:  # a C++ compiler error, a missing compiler, an unsupported op
        raise ExportError(
            f"AOTInductor compilation failed: {type(exc).__name__}: {one_line(exc)}; --format aoti needs a C++ "
            "compiler (g++ or clang++) on PATH and the Python headers; --format pt2 needs neither"
        ) from exc


def _failing_part(exc: BaseException) -> tuple[str, BaseException]:
    """Where the export failed: ('detkit/...py:LINE in FUNCTION', the exception raised there), from
    the innermost detkit frame (outside this file) of the deepest exception in `exc`'s cause chain."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    marker = f"{os.sep}detkit{os.sep}"
    for error in reversed(chain):  # the root cause first
        frames = [
            f
            for f in traceback.extract_tb(error.__traceback__)
            if marker in f.filename and not f.filename.endswith(f"export{os.sep}exporter.py")
        ]
        if frames:
            frame = frames[-1]
            return f"{frame.filename[frame.filename.rfind(marker) + 1 :]}:{frame.lineno} in {frame.name}", error
    return "the model", chain[-1]


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The message of `exc` on one line (no terminal colour codes), cut at `limit` characters."""
    text = " ".join(line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip())
    return text[:limit]


def _export_onnx(detector, image, original_size, metadata: dict[str, str], path: str) -> None:
    import onnx
    from torch.export import Dim

    dynamic_shapes = ({1: Dim.DYNAMIC, 2: Dim.DYNAMIC}, None)  # image (3, h, w): h and w free
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                detector,
                (image, original_size),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                verbose=False,
            )
    except Exception as exc:  # torch.export / onnxscript raise many kinds; name the part instead of a trace
        where, error = _failing_part(exc)
        raise ExportError(f"ONNX export failed at {where}: {type(error).__name__}: {one_line(error)}") from exc
    assert program is not None  # torch.onnx.export returns None only with dynamo=False
    model = program.model_proto
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "detkit"
    onnx.checker.check_model(model)
    onnx.save(model, path)


def check_metadata(metadata: dict[str, str], path: str | Path) -> dict[str, str]:
    """`metadata` if it is detkit's (export_metadata); CheckpointError for another tool's model."""
    from detkit.errors import CheckpointError

    if metadata.get(METADATA_VERSION_KEY) != EXPORT_FORMAT_VERSION or any(k not in metadata for k in REQUIRED_METADATA):
        raise CheckpointError(
            f"--model {path} has no detkit metadata ({METADATA_VERSION_KEY}={EXPORT_FORMAT_VERSION}): it was not "
            "written by tools/export.py; export a detkit checkpoint with tools/export.py first"
        )
    return metadata


REQUIRED_METADATA = ("class_names", "category_ids", "input_format", "score_thresh", "config")
# Every key export_metadata writes (torch.export extra files are read by name).
METADATA_KEYS = (
    METADATA_VERSION_KEY,
    *REQUIRED_METADATA,
    "pixel_mean",
    "pixel_std",
    "resize",
    "size_divisibility",
    "inputs",
    "outputs",
    "iteration",
)


def smooth_random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An RGB (h, w, 3) uint8 image of smooth random blobs, for parity checks."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
