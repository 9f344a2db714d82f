"""`detkit eval` (also tools/eval.py, detkit-eval): box AP of a model, or of an existing
predictions file: COCO's metric, or Pascal VOC's (test.metric=voc07 | voc12 in model mode,
--metric in file mode; detkit.engine.voc_evaluator).

Model mode (inference on the config's test set, then evaluation):
    detkit eval configs/shapes_r18.yaml --weights output/model_final.pth [key=value ...]
    -> {output_dir}/predictions.json (COCO results) and {output_dir}/metrics.json, tables on stdout.
    detkit eval --model model.onnx [CONFIG] [key=value ...]   (an exported model, README Export)
    CONFIG may be left out: the checkpoint's own config is used. Under torchrun each rank runs its
    shard of the test set and rank 0 evaluates and writes.

File mode (no model, predictions from any tool):
    detkit eval --gt instances_val.json --predictions predictions.json [--out metrics.json] [--metric voc07]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detkit.cli.common import run_cli, setup_logging
from detkit.errors import ConfigError

logger = logging.getLogger("detkit.cli.eval")

_BACKEND_CHOICES = ("auto", "pycocotools", "faster_coco_eval")
_METRIC_CHOICES = ("coco", "voc07", "voc12")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit eval",
        description="Box evaluation (COCO or Pascal VOC AP). Model mode: CONFIG --weights CKPT [key=value ...]. "
        "File mode: --gt instances.json --predictions predictions.json [--out metrics.json].",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  detkit eval configs/shapes_r18.yaml --weights output/shapes_r18/model_final.pth output_dir=output/eval\n"
        "  detkit eval --model model.onnx output_dir=output/eval_onnx          # an exported file, its own config\n"
        "  detkit eval --model model.onnx --runtime openvino output_dir=output/eval_openvino\n"
        "  detkit eval --gt annotations/instances_val2017.json --predictions predictions.json\n"
        "  detkit eval configs/frcnn_r101_voc.yaml --weights model_final.pth    # test.metric: voc07 in the config\n"
        "  detkit eval --gt voc2007_test.json --predictions predictions.json --metric voc07",
    )
    parser.add_argument("config", nargs="?", help="model mode: YAML config (default: the checkpoint's config)")
    parser.add_argument("overrides", nargs="*", help="model mode: config overrides key=value")
    parser.add_argument("--weights", help="model mode: detkit checkpoint (.pth)")
    parser.add_argument(
        "--model",
        help="model mode: an exported model (.onnx: ONNX Runtime, .pt2: torch.export or AOTInductor) "
        "written by detkit export, instead of --weights",
    )
    parser.add_argument(
        "--runtime",
        choices=("onnxruntime", "openvino"),
        default=None,
        help="model mode with --model FILE.onnx: the runtime that runs it (default onnxruntime; openvino "
        'needs pip install "detkit[openvino]")',
    )
    parser.add_argument("--gt", help="file mode: COCO instances json (ground truth)")
    parser.add_argument("--predictions", help="file mode: COCO results json to evaluate")
    parser.add_argument("--out", help="file mode: write metrics.json here (default: only print)")
    parser.add_argument(
        "--backend",
        choices=_BACKEND_CHOICES,
        default=None,
        help="evaluation backend of the COCO metric (default: test.eval_backend in model mode, auto in file mode)",
    )
    parser.add_argument(
        "--metric",
        choices=_METRIC_CHOICES,
        default=None,
        help="file mode: coco (default), voc07 (VOC2007 11-point AP) or voc12 (area under the PR curve); "
        "the ground truth's 'difficult' annotations are ignored by the VOC metrics. "
        "Model mode: set test.metric=... instead",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(list(argv))
    setup_logging()
    # `detkit eval key=value` with no CONFIG: argparse puts the first override into `config`.
    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None

    file_mode = args.gt is not None or args.predictions is not None
    if file_mode:
        if args.weights or args.model or args.config or args.overrides:
            raise ConfigError("choose one mode: --gt/--predictions (file mode) or CONFIG --weights (model mode)")
        if not (args.gt and args.predictions):
            raise ConfigError("file mode needs both --gt instances.json and --predictions predictions.json")
        return _file_mode(args)
    if args.weights and args.model:
        raise ConfigError("give --weights CKPT (PyTorch) or --model FILE (exported), not both")
    if not (args.weights or args.model):
        parser.print_usage(sys.stderr)
        raise ConfigError(
            "nothing to evaluate: give CONFIG --weights CKPT (model mode) or --gt and --predictions (file mode)"
        )
    if args.runtime and not args.model:
        raise ConfigError(f"--runtime {args.runtime} runs an exported file: give --model FILE.onnx (not --weights)")
    if args.out:
        raise ConfigError("--out is for file mode; in model mode metrics.json goes to output_dir (output_dir=DIR)")
    if args.metric:
        raise ConfigError(
            f"--metric is for file mode; in model mode set test.metric={args.metric} (a key=value override)"
        )
    return _model_mode(args)


def _print_metrics(metrics: dict, header: str) -> None:
    from detkit.engine.evaluator import format_metrics

    print(header)
    print(format_metrics(metrics))


def _file_mode(args: argparse.Namespace) -> int:
    from detkit.engine.eval_common import load_predictions
    from detkit.engine.evaluator import build_evaluator, dump_metrics

    predictions = load_predictions(args.predictions)
    metric = args.metric or "coco"
    evaluator = build_evaluator(args.gt, metric, backend=args.backend or "auto")
    metrics = evaluator.run(predictions, source=args.predictions).metrics
    _print_metrics(
        metrics,
        f"{len(predictions)} predictions on {len(evaluator.image_ids)} images of {args.gt} "
        f"({_method(metric, evaluator)}):",
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        dump_metrics(metrics, args.out)
        print(f"metrics written to {args.out}")
    return 0


def load_eval_config(weights_config: dict, config_path: str | None, overrides: Sequence[str]):
    """The config of a model-mode run: CONFIG (when given) or the checkpoint's, plus overrides."""
    from detkit.config import load_config
    from detkit.engine.predictor import config_with_overrides

    if config_path:
        return load_config(config_path, overrides)
    return config_with_overrides(weights_config, overrides)


def _model_mode(args: argparse.Namespace) -> int:
    import torch

    from detkit.config import config_to_dict, dump_config
    from detkit.data import build_test_loader, get_dataset_info
    from detkit.engine.checkpoint import load_checkpoint
    from detkit.engine.distributed import destroy, init_distributed
    from detkit.engine.evaluator import build_evaluator, dump_metrics, dump_predictions, inference_on_dataset
    from detkit.engine.predictor import build_model_from_checkpoint, check_checkpoint
    from detkit.utils.env import resolve_device, select_amp

    exported = None
    state: dict[str, Any]
    if args.model:
        from detkit.export.runtime import ExportedPredictor

        exported = ExportedPredictor(args.model, backend=args.runtime)
        state = {
            "config": config_to_dict(exported.cfg),
            "class_names": exported.class_names,
            "category_ids": exported.category_ids,
        }
        args.weights = args.model  # the name used in messages below
    else:
        state = load_checkpoint(args.weights)
        check_checkpoint(state, args.weights)
    cfg = load_eval_config(state["config"], args.config, args.overrides)
    backend = args.backend or cfg.test.eval_backend
    if not cfg.data.test:
        raise ConfigError(
            f"{args.config or args.weights}: data.test is empty; name a test dataset in the config "
            "(see README, Datasets) or use file mode"
        )

    dist = init_distributed("cuda" if resolve_device(cfg.device).type == "cuda" else "cpu")
    device = resolve_device(cfg.device, dist.local_rank) if exported is None else torch.device("cpu")
    if not dist.is_main:
        logging.getLogger("detkit").setLevel(logging.WARNING)  # one rank reports progress
    info = get_dataset_info(cfg, split="test")
    category_ids = _category_ids_for(state, info, args.weights)
    # Load the ground truth before the long inference so a bad file fails fast.
    evaluator = build_evaluator(info.ann_file, cfg.test.metric, backend=backend) if dist.is_main else None

    if exported is None:
        model = build_model_from_checkpoint(state, cfg, device, source=args.weights)
        amp_dtype = select_amp(cfg.test.amp, device, key="test.amp").dtype
    else:  # ONNX Runtime / pt2 / aoti behind the eager model's call (ImageBatch -> detections)
        model, amp_dtype = exported.as_module(), None
    loader = build_test_loader(cfg, rank=dist.rank, world_size=dist.world_size)
    try:
        predictions = inference_on_dataset(model, loader, category_ids, device, amp_dtype=amp_dtype)
    finally:
        destroy()
    if evaluator is None:
        return 0

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_predictions(predictions, out_dir / "predictions.json")
    metrics = evaluator.run(predictions, source=f"the predictions of {args.weights}").metrics
    dump_metrics(metrics, out_dir / "metrics.json")
    dump_config(cfg, out_dir / "eval_config.yaml")
    _print_metrics(
        metrics,
        f"{args.weights} on {info.ann_file} ({len(predictions)} detections, {_method(cfg.test.metric, evaluator)}):",
    )
    print(f"predictions and metrics written to {out_dir}/predictions.json, {out_dir}/metrics.json")
    return 0


def _method(metric: str, evaluator: Any) -> str:
    """How the numbers were computed, for the header line: the COCO backend or the VOC metric."""
    if metric == "coco":
        return f"backend {evaluator.backend}"
    return f"Pascal VOC metric {metric}, {'11-point' if metric == 'voc07' else 'area under the curve'}"


def _category_ids_for(state: dict, info, weights: str) -> list[int]:
    """The dataset's original id of each contiguous label of the checkpoint's model.

    The model's label k means the checkpoint's class k; the test set must have the same classes in
    the same order, otherwise AP would be computed against the wrong categories.
    """
    ckpt_names = list(state.get("class_names") or [])
    if ckpt_names and ckpt_names != list(info.class_names):
        raise ConfigError(
            f"{weights} was trained on classes {_preview(ckpt_names)} but the test set has "
            f"{_preview(list(info.class_names))}; evaluate on a dataset with the same categories in the same order"
        )
    ckpt_ids = list(state.get("category_ids") or [])
    if ckpt_ids and ckpt_ids != list(info.category_ids):
        logger.warning("%s: category ids differ from the test set's (same names); using the test set's ids", weights)
    return list(info.category_ids)


def _preview(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
