"""Where do ONNX Runtime's detections part from eager PyTorch's? Stage by stage, on the export
benchmark's R101-C4 (README "Export", measured parity).

For each benchmark image (480x640 and the three parity sizes of `detkit benchmark --mode export`)
this compares each candidate with eager PyTorch (oneDNN convolutions, the reference):
- res4 features (the trunk's output): max |difference|, relative to max |feature|, and each
  float32 map's error against the same trunk run in float64;
- the RPN's proposals: count, the first rank where they differ, max |box| difference before it;
- the box head's class logits on the proposals (when the proposals are the same);
- the detections, matched by IoU >= 0.99 and label whatever their order: how many match, max box
  and score differences, and how many ranks changed.
It also lists the closest decisions eager made (score gaps at the ranks where order matters),
which a difference of that size can flip, and the FrozenBN statistics (|mean| / std per channel).
The candidates:
- `onnxruntime`: the exported file, default session (all graph optimisations and fusions; the
  exporter has already folded each FrozenBN into its convolution);
- `onnxruntime-noopt`: the same file with graph optimisations off (every op as exported);
- `pytorch-slow-conv`: the same eager model with oneDNN off (PyTorch's own im2col + GEMM
  convolution): how far fp32 PyTorch moves from itself with another valid convolution kernel.

    detkit benchmark --mode export --depth 101 --image-size 480 640 --export-dir r101/
    python -m benchmarks.trace_export_parity r101/model.onnx --threads 2 [--json trace.json]

The model is rebuilt with the benchmark's seeds (detkit.export.benchmark.calibrated_model), so it is
the one the file was exported from; --depth / --num-classes / --seed must match that run.
"""

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from detkit.cli.common import run_cli
from detkit.errors import ExportError
from detkit.export.benchmark import ExportBenchOptions, benchmark_images, calibrated_model
from detkit.export.graph import SingleImageDetector
from detkit.structures.compare import diff_detections


def eager_stages(detector: SingleImageDetector, image: torch.Tensor) -> dict:
    """The eager graph's intermediate tensors on one image, caught by hooks during one forward
    (the exported code, run once): the trunk's input and output, the RPN logits, the proposals and
    class logits of the box head, and the detections."""
    caught = {}

    def keep(name, take):
        def hook(module, args, output) -> None:  # returns None: the output goes on unchanged
            caught[name] = take(args, output)

        return hook

    hooks = [
        detector.trunk.register_forward_hook(keep("trunk", lambda a, o: (a[0], o))),
        detector.rpn_head.register_forward_hook(keep("rpn", lambda a, o: o[0])),
        detector.box_head.register_forward_hook(keep("box", lambda a, o: (a[1], o[0]))),
    ]
    try:
        with torch.no_grad():
            size = torch.tensor(image.shape[1:])
            boxes, scores, labels = detector(image, size)
    finally:
        for hook in hooks:
            hook.remove()
    (trunk_input, features), (proposals, cls_logits) = caught["trunk"], caught["box"]
    return {
        "trunk_input": trunk_input,
        "features": features.numpy(),
        "rpn_logits": caught["rpn"][0].numpy(),
        "proposals": proposals.numpy(),
        "cls_logits": cls_logits.numpy(),
        "boxes": boxes.numpy(),
        "scores": scores.numpy(),
        "labels": labels.numpy(),
    }


def onnx_with_stages(path: str, out_path: Path) -> None:
    """A copy of the exported graph that also outputs res4 features, proposals and class logits:
    the RoiAlign node's inputs (features, rois) and the Softmax node's input."""
    import onnx

    model = onnx.load(path)
    roi_align = [n for n in model.graph.node if n.op_type == "RoiAlign"]
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    if len(roi_align) != 1 or len(softmax) != 1:
        raise ExportError(
            f"{path}: expected one RoiAlign and one Softmax node, found {len(roi_align)} and "
            f"{len(softmax)}: give a detkit ONNX file (detkit benchmark --mode export --export-dir DIR)"
        )
    for name in (roi_align[0].input[0], roi_align[0].input[1], softmax[0].input[0]):
        model.graph.output.add(name=name)
    onnx.save(model, str(out_path), save_as_external_data=False)


def ort_stages(session, image: torch.Tensor) -> dict:
    h, w = image.shape[1:]
    boxes, scores, labels, features, rois, cls_logits = session.run(
        None, {"image": image.numpy(), "original_size": np.array([h, w], dtype=np.int64)}
    )
    return {
        "features": features,
        "proposals": rois,
        "cls_logits": cls_logits,
        "boxes": boxes,
        "scores": scores,
        "labels": labels.astype(np.int64),
    }


def first_difference(a: np.ndarray, b: np.ndarray, tol: float) -> int:
    """First row where two (N, 4) box lists differ by more than tol px (min length if one is a prefix)."""
    n = min(len(a), len(b))
    bad = np.nonzero(np.abs(a[:n] - b[:n]).max(axis=1) > tol)[0]
    return int(bad[0]) if len(bad) else n


def closest_decisions(ref: dict, pre_nms_topk: int, post_nms_topk: int, detections: int) -> dict:
    """Score gaps eager decided on: neighbouring RPN logits inside the pre-NMS top-k, the logit gap
    at the top-k cut, neighbouring detection scores, and the score gap at the detection cut."""
    logits = np.sort(ref["rpn_logits"])[::-1]
    k = min(pre_nms_topk, len(logits))
    rpn_gaps = np.diff(logits[:k])
    det = ref["scores"]
    return {
        "rpn_min_neighbour_logit_gap": float(np.abs(rpn_gaps).min()) if len(rpn_gaps) else None,
        "rpn_topk_cut_gap": float(logits[k - 1] - logits[k]) if k < len(logits) else None,
        "rpn_neighbour_gaps_below_1e-4": int((np.abs(rpn_gaps) < 1e-4).sum()),
        "det_min_neighbour_score_gap": float(np.abs(np.diff(det)).min()) if len(det) > 1 else None,
        "det_neighbour_gaps_below_1e-4": int((np.abs(np.diff(det)) < 1e-4).sum()),
    }


def frozen_bn_cancellation(model: torch.nn.Module) -> dict:
    """Per channel |mean| / std of every FrozenBN's input statistics: x - mean loses that factor of
    relative precision (1 for a centred input)."""
    from detkit.modeling.backbone import FrozenBatchNorm2d

    ratios = torch.cat(
        [
            (m.running_mean.abs() / (m.running_var + m.eps).sqrt()).flatten()
            for m in model.modules()
            if isinstance(m, FrozenBatchNorm2d)
        ]
    ).double()
    return {
        "channels": int(ratios.numel()),
        "median": float(ratios.median()),
        "p99": float(ratios.quantile(0.99)),
        "max": float(ratios.max()),
    }


def relative_error(features: np.ndarray, exact: np.ndarray) -> float:
    return float(np.abs(features.astype(np.float64) - exact).max() / np.abs(exact).max())


def compare(ref: dict, got: dict, exact: np.ndarray) -> dict:
    scale = float(np.abs(ref["features"]).max())
    row = {"features_max_abs_diff": float(np.abs(ref["features"] - got["features"]).max()), "features_max_abs": scale}
    row["features_rel_diff"] = row["features_max_abs_diff"] / scale
    row["features_rel_err_vs_float64"] = relative_error(got["features"], exact)
    first = first_difference(ref["proposals"], got["proposals"], 0.01)
    row.update(
        {
            "proposals": [len(ref["proposals"]), len(got["proposals"])],
            "proposals_first_rank_differing_by_0.01px": first,
            "proposals_max_diff_before_it_px": float(
                np.abs(ref["proposals"][:first] - got["proposals"][:first]).max(initial=0.0)
            ),
        }
    )
    if first == len(ref["proposals"]) == len(got["proposals"]):
        row["cls_logits_max_abs_diff"] = float(np.abs(ref["cls_logits"] - got["cls_logits"]).max())
    diff = diff_detections(ref, got)
    same_order = diff["same"]
    row.update(
        {
            "detections": [diff["reference"], diff["candidate"]],
            "same_labels_in_order": same_order,
            "matched_iou_0.99": diff["matched"],
            "matched_max_box_diff_px": diff["matched_max_box_diff_px"],
            "matched_max_score_diff": diff["matched_max_score_diff"],
        }
    )
    if same_order:
        row["max_box_diff_px"] = diff["max_box_diff_px"]
        row["max_score_diff"] = diff["max_score_diff"]
    else:
        n = min(len(ref["labels"]), len(got["labels"]))
        row["ranks_with_other_label_or_box"] = int(
            (
                (ref["labels"][:n] != got["labels"][:n])
                | (np.abs(ref["boxes"][:n] - got["boxes"][:n]).max(axis=1) > 0.01)
            ).sum()
        )
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.trace_export_parity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="model.onnx written by detkit benchmark --mode export --export-dir DIR")
    parser.add_argument("--depth", type=int, default=101)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=["onnxruntime", "onnxruntime-noopt", "pytorch-slow-conv"],
        choices=["onnxruntime", "onnxruntime-noopt", "pytorch-slow-conv"],
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    if args.threads:
        torch.set_num_threads(args.threads)
    options = ExportBenchOptions(depth=args.depth, num_classes=args.num_classes, seed=args.seed)
    source = calibrated_model(options)
    detector = SingleImageDetector(source.model, int(source.cfg.data.size_divisibility)).eval()
    trunk64 = copy.deepcopy(detector.trunk).double()
    print(
        "FrozenBN |running_mean| / sqrt(running_var) over all channels (the cancellation in x - mean): "
        + json.dumps(frozen_bn_cancellation(source.model))
    )
    staged = Path(args.model).with_name(Path(args.model).stem + "_stages.onnx")
    onnx_with_stages(args.model, staged)
    sessions = {}
    for name, level in (
        ("onnxruntime", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
        ("onnxruntime-noopt", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
    ):
        if name in args.candidates:
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            so.intra_op_num_threads = args.threads or torch.get_num_threads()
            so.inter_op_num_threads = 1
            sessions[name] = ort.InferenceSession(str(staged), so, providers=["CPUExecutionProvider"])

    rows = []
    for image in benchmark_images(options):
        h, w = image.shape[1:]
        ref = eager_stages(detector, image)
        with torch.no_grad():  # the trunk in float64: how far each float32 kernel is from exact
            exact = trunk64(ref["trunk_input"].double()).numpy()
        decisions = closest_decisions(ref, detector.pre_nms_topk, detector.post_nms_topk, detector.detections_per_image)
        decisions["eager_features_rel_err_vs_float64"] = relative_error(ref["features"], exact)
        print(f"\n{h}x{w}: eager closest decisions {json.dumps(decisions)}")
        for name in args.candidates:
            if name == "pytorch-slow-conv":
                with torch.backends.mkldnn.flags(enabled=False):
                    got = eager_stages(detector, image)
            else:
                got = ort_stages(sessions[name], image)
            row = {"size": [h, w], "candidate": name, **compare(ref, got, exact), "eager_decisions": decisions}
            rows.append(row)
            print(
                f"  {name}: "
                + json.dumps({k: v for k, v in row.items() if k not in ("size", "candidate", "eager_decisions")})
            )
    staged.unlink()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
