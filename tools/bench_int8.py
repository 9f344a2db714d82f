#!/usr/bin/env python
"""Experiment (issue #13): int8 static quantization of an exported detector's res5 with ONNX Runtime.

Quantizes the res5 Conv/MatMul nodes of a detkit ONNX file (QDQ format, per-channel int8 weights,
uint8 activations) calibrated on N images of a folder, copies detkit's metadata into the result,
then times the fp32 and int8 files interleaved on M images (1 thread, ms per image). Evaluate both
with tools/eval.py --model FILE. Not an export option: on the shapes R18 demo model it kept AP but
ran slower (README "Export", int8).

    python tools/export.py --weights output/shapes_amp/model_final.pth --format onnx --output output/int8/model.onnx
    python tools/bench_int8.py output/int8/model.onnx --calibration datasets/shapes/train_*/images --timing datasets/shapes/val_*/images
    python tools/eval.py --model output/int8/model_int8_res5.onnx output_dir=output/int8/eval_int8
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from detkit.config import config_from_dict
from detkit.data import read_image
from detkit.engine.predictor import Preprocessor


def namespace(node) -> str:
    return next((p.value for p in node.metadata_props if p.key == "namespace"), "")


def feeds(model_path: str, folder: Path, count: int) -> list[dict]:
    """Model inputs (resized image, original size) for the first `count` images of `folder`."""
    meta = {p.key: p.value for p in onnx.load(model_path).metadata_props}
    preprocess = Preprocessor(config_from_dict(json.loads(meta["config"])))
    names = [i.name for i in onnx.load(model_path).graph.input]
    out = []
    for path in sorted(folder.glob("*"))[:count]:
        image = read_image(str(path))
        out.append({names[0]: preprocess(image).numpy(), names[1]: np.array(image.shape[:2], dtype=np.int64)})
    return out


class Reader(CalibrationDataReader):
    def __init__(self, items: list[dict]):
        self.items = iter(items)

    def get_next(self):
        return next(self.items, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a detkit ONNX file (tools/export.py --format onnx)")
    parser.add_argument("--calibration", type=Path, required=True, help="folder of calibration images")
    parser.add_argument("--num-calibration", type=int, default=300)
    parser.add_argument("--timing", type=Path, required=True, help="folder of images to time on")
    parser.add_argument("--num-timing", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    model = onnx.load(args.model)
    res5 = [n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul") and "res5" in namespace(n)]
    output = str(Path(args.model).with_name(Path(args.model).stem + "_int8_res5.onnx"))
    start = time.perf_counter()
    quantize_static(args.model, output, Reader(feeds(args.model, args.calibration, args.num_calibration)),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, nodes_to_quantize=res5, op_types_to_quantize=["Conv", "MatMul"])
    quantized = onnx.load(output)
    del quantized.metadata_props[:]
    for prop in model.metadata_props:
        quantized.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(quantized, output)
    print(f"quantized {len(res5)} res5 nodes in {time.perf_counter() - start:.1f} s -> {output}")

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {name: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                for name, path in (("fp32", args.model), ("int8", output))}
    inputs = feeds(args.model, args.timing, args.num_timing)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for name, session in sessions.items():
            tic = time.perf_counter()
            for feed in inputs:
                session.run(None, feed)
            if round_index:
                times[name].append((time.perf_counter() - tic) / len(inputs) * 1000)
    for name, values in times.items():
        print(f"{name}: {min(values):.2f} / {statistics.median(values):.2f} ms per image (min / median)")
    print("int8 / fp32 per round:", [round(b / a, 3) for a, b in zip(times["fp32"], times["int8"])])


if __name__ == "__main__":
    main()
