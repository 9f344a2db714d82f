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

`batched=True` (`tools/export.py --batched`, onnx and pt2) writes `graph.BatchedDetector` instead:
N images of their own sizes in one call, each given exactly its single-image detections. pt2
records the loop over images as torch's `map`; ONNX wraps the one-image graph in a `Loop` node
(`batch_onnx_model`), since the ONNX exporter does not lower `map`. AOTInductor files take one
image (BATCHED_FORMATS).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from detkit.errors import ExportError
from detkit.utils.files import atomic_output

if TYPE_CHECKING:
    from detkit.export.graph import BatchedDetector

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2", "aoti")
BATCHED_FORMATS = ("onnx", "pt2")  # formats that can hold graph.BatchedDetector (aoti: not yet)
NOT_BATCHED = "batched files are onnx and pt2 only (AOTInductor cannot compile the loop over images yet)"
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
BATCHED_INPUT_NAMES = ("images", "image_sizes", "original_sizes")
BATCHED_OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
EXTRA_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


SINGLE_INPUTS = (
    "image: (3, h, w) uint8 resized image in input_format channel order; "
    "original_size: (2,) int64 (h0, w0) the size before resizing"
)
SINGLE_OUTPUTS = (
    "boxes: (D, 4) float32 xyxy in original pixels; scores: (D,) float32; "
    "labels: (D,) int64 index into class_names; best first"
)
BATCHED_INPUTS = (
    "images: (N, 3, H, W) uint8 resized images in input_format channel order, each at the top left, "
    "zero-padded to the largest; image_sizes: (N, 2) int64 (h, w) of each; original_sizes: (N, 2) int64 "
    "(h0, w0) the sizes before resizing"
)
BATCHED_OUTPUTS = (
    "boxes: (N, D, 4) float32 xyxy in original pixels; scores: (N, D) float32; labels: (N, D) int64 index "
    "into class_names; num_detections: (N,) int64; image i's detections are rows [0, num_detections[i]), "
    "best first (the rest 0, 0, -1); D = the model's detections per image"
)


def require_export_packages(names=EXTRA_PACKAGES) -> None:
    """ExportError naming the `export` extra when onnx / onnxruntime / onnxscript is missing."""
    import importlib.util

    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"{', '.join(missing)} not installed: ONNX export and ONNX Runtime inference need the export extra, "
            'pip install "detkit[export]"'
        )


def export_metadata(predictor, batched: bool = False) -> dict[str, str]:
    """String key -> string value pairs stored with the model (JSON for lists and the config);
    "batched" says which inputs the file takes (graph.SingleImageDetector or graph.BatchedDetector)."""
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
        "batched": "true" if batched else "false",
        "inputs": BATCHED_INPUTS if batched else SINGLE_INPUTS,
        "outputs": BATCHED_OUTPUTS if batched else SINGLE_OUTPUTS,
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


def export_model(predictor, output: str | Path, fmt: str, batched: bool = False) -> Path:
    """Write `predictor`'s model to `output` as `fmt` ("onnx" | "pt2" | "aoti"); returns the path.
    batched: a file that takes N images at once (graph.BatchedDetector; onnx and pt2 only).

    predictor: a `Predictor`, or anything with its `model`, `cfg`, `class_names`, `category_ids`
    and `iteration` (the export benchmark passes a calibrated model that has no checkpoint).

    The file is written next to `output` and renamed over it, so an interrupted export leaves
    no half-written model.
    """
    if fmt in RETIRED_FORMATS:
        raise ExportError(f"--format {fmt}: {RETIRED_FORMATS[fmt]}")
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if batched and fmt not in BATCHED_FORMATS:
        raise ExportError(
            f"--batched --format {fmt}: {NOT_BATCHED}; export --format {fmt} without --batched, or --batched --format pt2"
        )
    output = Path(output)
    if not output.parent.is_dir():
        raise ExportError(f"--output {output}: folder {output.parent} does not exist")
    if fmt == "onnx":
        require_export_packages()
    detector = build_single_image_detector(predictor)
    image, original_size = example_input(predictor)
    metadata = export_metadata(predictor, batched)
    start = time.perf_counter()
    with atomic_output(output) as tmp_path:
        if fmt == "onnx":
            _export_onnx(detector, image, original_size, metadata, str(tmp_path), batched)
        elif fmt == "pt2" and batched:
            from detkit.export.graph import BatchedDetector

            program = export_batched_program(BatchedDetector(detector), *example_batch(image, original_size))
            torch.export.save(program, str(tmp_path), extra_files=metadata)
        elif fmt == "pt2":
            program = export_program(detector, image, original_size)
            torch.export.save(program, str(tmp_path), extra_files=metadata)
        else:
            _export_aoti(export_program(detector, image, original_size), metadata, str(tmp_path))
    logger.info(
        "exported %s (%s%s, %.1f MB) in %.1f s",
        output,
        fmt,
        ", batched" if batched else "",
        output.stat().st_size / 2**20,
        time.perf_counter() - start,
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
    return _torch_export(detector, (image, original_size), dynamic_shapes)


def _torch_export(module: torch.nn.Module, args: tuple, dynamic_shapes: tuple) -> torch.export.ExportedProgram:
    """Non-strict torch.export of `module` on `args`; ExportError naming the failing line of detkit's code."""
    try:
        with torch.no_grad():
            return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch.export raises many kinds; name the part instead of a trace
        where, error = _failing_part(exc)
        raise ExportError(f"torch.export failed at {where}: {type(error).__name__}: {one_line(error)}") from exc


def example_batch(image: torch.Tensor, original_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images of different sizes as a padded batch (the example of a batched export): `image`
    and its top-left 3/4, (2, 3, h, w) uint8, their sizes (2, 2) and original sizes (2, 2) int64."""
    h, w = image.shape[1:]
    images = torch.zeros((2, 3, h, w), dtype=torch.uint8)
    small = (max(h * 3 // 4, 1), max(w * 3 // 4, 1))
    images[0] = image
    images[1, :, : small[0], : small[1]] = image[:, : small[0], : small[1]]
    sizes = torch.tensor([[h, w], list(small)], dtype=torch.int64)
    return images, sizes, torch.stack([original_size, original_size * 3 // 4])


def export_batched_program(
    detector: BatchedDetector, images: torch.Tensor, image_sizes: torch.Tensor, original_sizes: torch.Tensor
) -> torch.export.ExportedProgram:
    """`detector` as a torch.export program with N, H and W free (graph.BatchedDetector), ready for
    torch.export.save. ExportError naming the failing line when it cannot be exported."""
    from torch.export import Dim

    free = Dim.DYNAMIC
    dynamic_shapes = ({0: free, 2: free, 3: free}, {0: free}, {0: free})
    program = _torch_export(detector, (images, image_sizes, original_sizes), dynamic_shapes)
    _spell_out_sym_sums(program)
    return program


def _spell_out_sym_sums(program: torch.export.ExportedProgram) -> None:
    """Replace every torch.sym_sum node (sizes of the map body, e.g. a convolution's output width
    (w + 2p - k) // s + 1 of a data-dependent w) with a chain of operator.add: torch 2.14's
    torch.export.save cannot serialize sym_sum ("op sym_sum is not in _SYM_OPS"); the sums are the same."""
    import operator

    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        graph = module.graph
        for node in list(graph.nodes):
            if node.target is not torch.sym_sum:
                continue
            terms = list(node.args[0])
            with graph.inserting_before(node):
                total = terms[0]
                for term in terms[1:]:
                    total = graph.call_function(operator.add, (total, term))
                    total.meta.update(node.meta)
            node.replace_all_uses_with(total)
            graph.erase_node(node)
        module.recompile()


# layout_optimization off: with it (the default), torch 2.14's AOTInductor on the CPU computes wrong
# convolutions whose batch size is data-dependent (res5 on the RPN's surviving proposals): the
# R101-C4 package kept 0 of eager's 100 detections, and a three-convolution model on `x[nonzero]`
# rows is off by 0.34 (4e-8 without it). The tiny test model hid it: its res5 maps take the GEMM
# path (backbone.small_map_conv2d), not a convolution.
AOTI_CONFIGS = {"layout_optimization": False}


def _export_aoti(program: torch.export.ExportedProgram, metadata: dict[str, str], path: str) -> None:
    """AOTInductor: the program compiled to C++ / a shared library for this machine's CPU, packaged
    with its weights and `metadata` (AOTIModelPackageLoader::get_metadata in C++) into `path`."""
    try:
        # torch 2.14 has no public successor of this entry point yet (torch._inductor's own docs use it).
        torch._inductor.aoti_compile_and_package(
            program, package_path=path, inductor_configs={**AOTI_CONFIGS, "aot_inductor.metadata": dict(metadata)}
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


def _export_onnx(detector, image, original_size, metadata: dict[str, str], path: str, batched: bool = False) -> None:
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
    if batched:
        model = batch_onnx_model(model, detector.detections_per_image)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "detkit"
    onnx.checker.check_model(model)
    onnx.save(model, path)


def batch_onnx_model(model, max_detections: int):
    """The one-image ONNX model (inputs INPUT_NAMES, outputs OUTPUT_NAMES) as the body of a `Loop`
    over the images of a batch: graph.BatchedDetector's inputs and outputs (BATCHED_INPUT_NAMES,
    BATCHED_OUTPUT_NAMES). Iteration i gathers image i, slices it to image_sizes[i], runs the
    one-image nodes and weights unchanged and pads
    its detections to `max_detections` rows (0, 0, -1), which the Loop stacks into (N, D, ...).
    Returns a new ModelProto; `model` is left as it was."""
    import onnx
    from onnx import TensorProto, helper

    outer = model.graph
    body_name = {name: f"single_{name}" for name in (*INPUT_NAMES, *OUTPUT_NAMES)}  # no clash with the outer names

    def rename(graph) -> None:  # every use of a renamed value, nested graphs included
        for node in graph.node:
            node.input[:] = [body_name.get(name, name) for name in node.input]
            node.output[:] = [body_name.get(name, name) for name in node.output]
            for attribute in node.attribute:
                for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                    rename(sub)

    single = onnx.GraphProto()
    single.CopyFrom(outer)
    rename(single)
    images, image_sizes, original_sizes = BATCHED_INPUT_NAMES

    def const(name: str, values: list[int]):
        return helper.make_node(
            "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
        )

    d = max_detections
    body_nodes = [
        helper.make_node("Identity", ["loop.cond_in"], ["loop.cond_out"]),
        helper.make_node("Gather", [images, "loop.i"], ["loop.image_full"], axis=0),  # (3, H, W)
        helper.make_node("Gather", [image_sizes, "loop.i"], ["loop.image_size"], axis=0),  # (2,)
        helper.make_node("Gather", [original_sizes, "loop.i"], [body_name["original_size"]], axis=0),  # (2,)
        const("loop.zeros_2", [0, 0]),
        const("loop.axes_hw", [1, 2]),
        helper.make_node(
            "Slice", ["loop.image_full", "loop.zeros_2", "loop.image_size", "loop.axes_hw"], [body_name["image"]]
        ),
        *single.node,
        helper.make_node("Shape", [body_name["scores"]], ["loop.count_1"]),  # (1,)
        const("loop.max_1", [d]),
        helper.make_node("Sub", ["loop.max_1", "loop.count_1"], ["loop.pad_1"]),
        const("loop.zero_1", [0]),
        helper.make_node(
            "Concat", ["loop.zero_1", "loop.zero_1", "loop.pad_1", "loop.zero_1"], ["loop.pads_2d"], axis=0
        ),
        helper.make_node("Concat", ["loop.zero_1", "loop.pad_1"], ["loop.pads_1d"], axis=0),
        helper.make_node(
            "Constant",
            [],
            ["loop.float_zero"],
            value=helper.make_tensor("loop.float_zero", TensorProto.FLOAT, [], [0.0]),
        ),
        helper.make_node(
            "Constant", [], ["loop.minus_one"], value=helper.make_tensor("loop.minus_one", TensorProto.INT64, [], [-1])
        ),
        helper.make_node("Pad", [body_name["boxes"], "loop.pads_2d", "loop.float_zero"], ["loop.boxes_i"]),  # (D, 4)
        helper.make_node("Pad", [body_name["scores"], "loop.pads_1d", "loop.float_zero"], ["loop.scores_i"]),  # (D,)
        helper.make_node("Pad", [body_name["labels"], "loop.pads_1d", "loop.minus_one"], ["loop.labels_i"]),  # (D,)
        helper.make_node("Squeeze", ["loop.count_1", "loop.zero_1"], ["loop.count_i"]),  # ()
    ]
    # The weights live in the body (ONNX Runtime's layout optimisations only rewrite convolutions
    # whose weights are initializers of their own graph, not values of the outer scope).
    body = helper.make_graph(
        body_nodes,
        "one_image",
        [
            helper.make_tensor_value_info("loop.i", TensorProto.INT64, []),
            helper.make_tensor_value_info("loop.cond_in", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("loop.cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("loop.boxes_i", TensorProto.FLOAT, [d, 4]),
            helper.make_tensor_value_info("loop.scores_i", TensorProto.FLOAT, [d]),
            helper.make_tensor_value_info("loop.labels_i", TensorProto.INT64, [d]),
            helper.make_tensor_value_info("loop.count_i", TensorProto.INT64, []),
        ],
        initializer=list(single.initializer),
    )
    graph = helper.make_graph(
        [
            helper.make_node("Shape", [images], ["loop.batch_1"], start=0, end=1),
            const("loop.axis_0", [0]),
            helper.make_node("Squeeze", ["loop.batch_1", "loop.axis_0"], ["loop.batch"]),
            helper.make_node("Loop", ["loop.batch", ""], list(BATCHED_OUTPUT_NAMES), body=body),
        ],
        "detkit_batched",
        [
            helper.make_tensor_value_info(images, TensorProto.UINT8, ["N", 3, "H", "W"]),
            helper.make_tensor_value_info(image_sizes, TensorProto.INT64, ["N", 2]),
            helper.make_tensor_value_info(original_sizes, TensorProto.INT64, ["N", 2]),
        ],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", d, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", d]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, ["N", d]),
            helper.make_tensor_value_info("num_detections", TensorProto.INT64, ["N"]),
        ],
    )
    batched = helper.make_model(graph, opset_imports=list(model.opset_import), functions=list(model.functions))
    batched.ir_version = model.ir_version
    return batched


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
    "batched",
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
