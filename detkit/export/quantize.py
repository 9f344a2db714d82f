"""int8 res5: ONNX Runtime static quantization of an exported detector's per-RoI head
(`tools/export.py --format onnx --int8-res5 --calibration DIR`).

    quantize_res5("model.onnx", "model_int8.onnx", "datasets/coco/val2017", num_images=300)

Only res5 is quantized, where an R101-C4 spends ~94% of its FLOPs (1000 RoIs of 14 x 14): its
Conv nodes (MatMul where backbone.Conv2d runs small RoI maps as a GEMM) get QDQ pairs with per-channel int8 weights and
uint8 activations whose ranges come from MinMax calibration on real images, run through the file's
own resize. The trunk, the RPN and all post-processing stay float32. Measured (README "Export",
BENCHMARKS.md): on the export benchmark's R101-C4 at 480 x 640 ONNX Runtime runs 0.46x the time
of the float32 file; on the shapes R18 (800 iterations) AP moves 28.68 -> 28.93 and the file is
1.24x slower (res5 on 1 x 1 maps is too small a share for the added quantize nodes to pay).

The result is a float32-in / float32-out ONNX file with the fp32 file's metadata plus a
`quantization` entry; ExportedPredictor, tools/infer.py and tools/eval.py run it unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from detkit.errors import ConfigError, ExportError
from detkit.utils.files import atomic_output

logger = logging.getLogger(__name__)

QUANTIZATION_KEY = "quantization"
QUANTIZED_OPS = ("Conv", "MatMul")


def res5_nodes(model) -> list[str]:
    """Names of the Conv / MatMul nodes of res5 in an exported detkit ONNX graph (onnx.ModelProto).

    The dynamo exporter records each node's module path in its "namespace" metadata; res5 is
    `box_head.heads.res5` (detkit.export.graph.BoxHead)."""

    def namespace(node) -> str:
        return next((p.value for p in node.metadata_props if p.key == "namespace"), "")

    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and ".res5" in namespace(n)]


def calibration_images(
    folder: str | Path, num_images: int, folder_flag: str = "--calibration", count_flag: str = "--num-calibration"
) -> list[Path]:
    """The first `num_images` image files of `folder` (sorted, recursive); ConfigError naming the
    folder (as the command line's `folder_flag`) when it is missing or holds none."""
    from detkit.data.image_io import IMAGE_EXTENSIONS

    folder = Path(folder)
    if num_images < 1:
        raise ConfigError(f"{count_flag} {num_images}: must be at least 1")
    if not folder.is_dir():
        raise ConfigError(f"{folder_flag} {folder}: no such folder (give a folder of training or validation images)")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ConfigError(f"{folder_flag} {folder}: no images ({' '.join(IMAGE_EXTENSIONS)}) in it")
    if len(paths) < num_images:
        logger.warning(
            "%s %s has %d images, fewer than %s %d: using all of them",
            folder_flag,
            folder,
            len(paths),
            count_flag,
            num_images,
        )
    return paths[:num_images]


class _DropMessages(logging.Filter):
    """Drops log records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class _Feeds:
    """What onnxruntime's calibration reads (its CalibrationDataReader's `get_next`): the graph's
    inputs for each image file, resized by the exported file's own rule (the Preprocessor of its
    stored config, as ExportedPredictor) with its original size; one image read at a time."""

    def __init__(self, preprocess, paths: list[Path]):
        self.preprocess = preprocess
        self.paths = iter(paths)

    def get_next(self):
        from detkit.data import read_image

        path = next(self.paths, None)
        if path is None:
            return None
        image = read_image(path)
        return {"image": self.preprocess(image).numpy(), "original_size": np.array(image.shape[:2], dtype=np.int64)}


def quantize_res5(model_path: str | Path, output: str | Path, calibration: str | Path, num_images: int = 300) -> Path:
    """Write `model_path` (a float32 detkit ONNX file) with res5 in int8 to `output`; returns it.

    Calibration: MinMax ranges of res5's activations over the first `num_images` images of the
    folder `calibration`. Written to a temporary file next to `output` and renamed over it."""
    from detkit.export.exporter import require_export_packages

    require_export_packages(("onnx", "onnxruntime"))
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from detkit.config import config_from_dict
    from detkit.engine.predictor import Preprocessor
    from detkit.export.exporter import check_metadata

    output = Path(output)
    if not output.parent.is_dir():
        raise ExportError(f"--output {output}: folder {output.parent} does not exist")
    paths = calibration_images(calibration, num_images)
    fp32 = onnx.load(str(model_path))
    metadata = check_metadata({p.key: p.value for p in fp32.metadata_props}, model_path)
    if QUANTIZATION_KEY in metadata:
        raise ExportError(f"{model_path} is already quantized ({metadata[QUANTIZATION_KEY]})")
    preprocess = Preprocessor(config_from_dict(json.loads(metadata["config"])))
    nodes = res5_nodes(fp32)
    if not nodes:
        raise ExportError(f"{model_path}: no res5 Conv / MatMul node found (was it written by tools/export.py?)")

    start = time.perf_counter()
    with atomic_output(output) as tmp_path:
        tmp_name = str(tmp_path)
        quiet = _DropMessages("pre-processing before quantization")  # ORT's advice for image classifiers
        logging.getLogger().addFilter(quiet)
        try:
            quantize_static(
                str(model_path),
                tmp_name,
                _Feeds(preprocess, paths),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                nodes_to_quantize=nodes,
                op_types_to_quantize=list(QUANTIZED_OPS),
            )
        finally:
            logging.getLogger().removeFilter(quiet)
        quantized = onnx.load(tmp_name)
        del quantized.metadata_props[:]
        for prop in fp32.metadata_props:
            quantized.metadata_props.add(key=prop.key, value=prop.value)
        quantized.metadata_props.add(
            key=QUANTIZATION_KEY,
            value=json.dumps(
                {
                    "scheme": "int8 res5: ONNX Runtime static QDQ, per-channel int8 weights, uint8 activations",
                    "nodes": len(nodes),
                    "calibration": str(calibration),
                    "calibration_images": len(paths),
                    "method": "MinMax",
                }
            ),
        )
        quantized.producer_name = "detkit"
        onnx.save(quantized, tmp_name)
    logger.info(
        "quantized %d res5 nodes of %s on %d images in %.1f s -> %s",
        len(nodes),
        model_path,
        len(paths),
        time.perf_counter() - start,
        output,
    )
    return output
