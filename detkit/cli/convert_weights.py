"""`detkit convert-weights` (also tools/convert_weights.py, detkit-convert-weights): Detectron2,
MSRA/Caffe2 or torchvision weights -> a detkit checkpoint.

    # Detectron2's R101-C4 3x (COCO) -> a checkpoint `detkit eval` and `detkit infer` take as it is
    detkit convert-weights --from detectron2 model_final_298dad.pkl weights/frcnn_r101_c4_3x.pth \\
        --config configs/frcnn_r101_detectron2.yaml
    detkit infer --weights weights/frcnn_r101_c4_3x.pth --input photos/ --output out/
    # ImageNet backbones (for model.backbone.weights)
    detkit convert-weights --from msra R-101.pkl weights/R-101.pth
    detkit convert-weights --from torchvision resnet101-63fe2227.pth weights/R-101-torchvision.pth
    # fine-tuning on 6 classes: keep backbone, RPN and res5, drop the 81-class box predictor
    detkit convert-weights --from detectron2 model_final_298dad.pkl weights/r101_c4_init.pth --num-classes 6

IN is read without running any code from it (pickles through detkit's restricted unpickler, torch
files with weights_only=True), every tensor is renamed to detkit's names (BN statistics filled in
for MSRA's folded BN), and OUT is written with torch.save as

    {"model": state_dict, "converted_from": {"file": IN, "format": FMT}, "num_classes": K or None}

With --config the weights are also loaded into the model that config builds (any missing tensor
or shape mismatch is an error), and when they make the whole model, OUT also gets the config and
the class names of its test dataset, which makes it a detkit checkpoint for `detkit eval` and
`detkit infer`. Key=value overrides after OUT apply to that config. A model of 80 classes whose
test annotation file is not there (a model-zoo download without COCO on disk) gets COCO's 80 class
names and category ids (detkit.data.coco_classes); an annotation file that is there gives them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from detkit.cli.common import run_cli, setup_logging
from detkit.errors import CheckpointError, ConfigError, DetkitError

logger = logging.getLogger("detkit.cli.convert_weights")

SOURCE_FORMATS = ("detectron2", "msra", "torchvision", "detkit", "auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit convert-weights",
        description="Convert Detectron2 (model-zoo .pkl, training .pth), MSRA/Caffe2 (R-50.pkl, R-101.pkl) or "
        "torchvision ResNet weights into a detkit checkpoint. Nothing in IN is executed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  detkit convert-weights --from detectron2 model_final_298dad.pkl weights/frcnn_r101_c4_3x.pth \\\n"
        "      --config configs/frcnn_r101_detectron2.yaml\n"
        "  detkit convert-weights --from msra R-101.pkl weights/R-101.pth\n"
        "  detkit convert-weights --from detectron2 model_final_298dad.pkl init.pth --num-classes 6",
    )
    parser.add_argument(
        "--from",
        dest="src",
        required=True,
        choices=SOURCE_FORMATS,
        help="layout of IN (auto: recognise it from the tensor names)",
    )
    parser.add_argument("input", metavar="IN", help="weights file to convert (.pkl or .pth)")
    parser.add_argument("output", metavar="OUT", help="detkit checkpoint to write (.pth)")
    parser.add_argument("overrides", nargs="*", help="with --config: config overrides key=value")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        metavar="K",
        help="foreground classes of the target model; a box predictor for another K is dropped "
        "(fine-tuning re-initialises it). Default: the --config's model.num_classes, else keep it",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="check the weights against the model of this YAML config and, when they make the "
        "whole model, store the config and class names in OUT (ready for eval/infer)",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_intermixed_args(list(argv))
    setup_logging()
    from detkit.config import config_to_dict, load_config, replace
    from detkit.engine.checkpoint import save_checkpoint
    from detkit.modeling.weights import BACKBONE_PREFIXES, load_converted, read_weights

    if args.overrides and not args.config:
        raise ConfigError(f"overrides {args.overrides} need --config CONFIG")
    if args.num_classes is not None and args.num_classes < 1:
        raise ConfigError(f"--num-classes {args.num_classes}: must be at least 1")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ConfigError(f"OUT {args.output} is IN: write the converted checkpoint to another file")
    cfg = load_config(args.config, args.overrides) if args.config else None
    num_classes = args.num_classes
    if cfg is not None:
        if num_classes is not None and num_classes != cfg.model.num_classes:
            raise ConfigError(
                f"--num-classes {num_classes} differs from model.num_classes={cfg.model.num_classes} of {args.config}; "
                f"give one of them (or override model.num_classes={num_classes})"
            )
        num_classes = cfg.model.num_classes

    weights = read_weights(args.input, args.src)
    logger.info(
        "read %s as %s weights: %d tensors renamed to detkit's names, %d unused%s, %d ignored%s",
        args.input,
        weights.format,
        len(weights.state_dict),
        len(weights.unused),
        _some(weights.unused),
        len(weights.ignored),
        _some(weights.ignored),
    )
    if weights.unused:
        logger.warning(
            "%s: %d tensors have no place in detkit's R-C4 model and are left out: %s",
            args.input,
            len(weights.unused),
            ", ".join(weights.unused),
        )
    file_classes = weights.num_classes
    dropped: list[str] = []
    if file_classes is not None and num_classes is not None and file_classes != num_classes:
        dropped = weights.drop_box_predictor()
        logger.warning(
            "%s has a box predictor for %d classes, the target has %d: dropped %s (fine-tuning initialises it anew)",
            args.input,
            file_classes,
            num_classes,
            ", ".join(dropped),
        )

    state: dict = {
        "model": {k: v.contiguous() for k, v in weights.state_dict.items()},
        "converted_from": {"file": str(args.input), "format": weights.format},
        "num_classes": None if dropped else file_classes,
    }
    if isinstance(weights.extras.get("iteration"), int):
        state["iteration"] = weights.extras["iteration"]

    if cfg is not None:
        from detkit.modeling import build_model

        backbone_only = not any(not k.startswith(BACKBONE_PREFIXES) for k in weights.state_dict)
        model = build_model(cfg, load_weights=False)
        report = load_converted(model, weights, backbone_only=backbone_only)
        missing = [k for k in report.missing if not k.startswith("roi_heads.box_predictor.") or not dropped]
        if missing or report.shape_mismatch:
            raise CheckpointError(
                f"{args.input} does not fit the model of {args.config} (model.depth={cfg.model.depth}, "
                f"num_classes={cfg.model.num_classes}): {report.summary()}"
            )
        if not report.missing and not backbone_only:
            # The whole model: make OUT a checkpoint eval/infer take as it is. Its config names no
            # weights files (the tensors are all here).
            cfg = replace(cfg, **{"model.weights": "", "model.weights_format": "auto", "model.backbone.weights": ""})
            state["config"] = config_to_dict(cfg)
            state.setdefault("iteration", 0)
            _add_class_names(state, cfg, args.config)
        else:
            logger.info(
                "%s covers %s only: OUT is for model.weights / model.backbone.weights, not for eval/infer",
                args.input,
                "the backbone" if backbone_only else "part of the model",
            )

    save_checkpoint(state, args.output)
    usage = "model.backbone.weights" if not any(k.startswith("rpn.") for k in state["model"]) else "model.weights"
    print(
        f"wrote {args.output}: {len(state['model'])} tensors from {weights.format} weights "
        f"({len(weights.unused)} unused, {len(weights.ignored)} ignored, {len(dropped)} dropped); "
        f"use it as {usage}" + (" or with detkit eval / detkit infer --weights" if "class_names" in state else "")
    )
    return 0


def _some(names: list[str], limit: int = 4) -> str:
    return f" ({', '.join(names[:limit])}{', ...' if len(names) > limit else ''})" if names else ""


def _add_class_names(state: dict, cfg, config_path: str) -> None:
    """Class names and category ids of the config's test dataset (read from its annotation file);
    for a model of 80 classes whose test annotation file is not there, COCO's (detkit.data.coco_classes)."""
    from detkit.data import get_dataset_info
    from detkit.data.coco_classes import COCO_CATEGORY_IDS, COCO_CLASS_NAMES, NUM_COCO_CLASSES

    try:
        info = get_dataset_info(cfg, "test")
    except DetkitError as exc:
        missing = _missing_test_annotations(cfg)
        if missing is not None and cfg.model.num_classes == NUM_COCO_CLASSES:
            # A model-zoo download without COCO on disk: 80 classes are COCO's, in COCO's label order.
            state["class_names"] = list(COCO_CLASS_NAMES)
            state["category_ids"] = list(COCO_CATEGORY_IDS)
            logger.warning(
                "class names: COCO's 80 (person, bicycle, ..., toothbrush; category ids 1..90) stored, as the model "
                "has 80 classes and the test annotation file of %s is not there (%s); for other names run the "
                "conversion again with a config whose data.test names their annotation file",
                config_path,
                missing,
            )
            return
        logger.warning(
            "no class names stored (cannot read the test dataset of %s: %s); detkit eval and detkit infer need "
            "them, so run the conversion again once the dataset is in place",
            config_path,
            exc,
        )
        return
    state["class_names"] = list(info.class_names)
    state["category_ids"] = list(info.category_ids)


def _missing_test_annotations(cfg) -> str | None:
    """What is missing when the config names no test annotation file that exists: the absent
    path, or "no data.test entry"; None when there is one (readable or not: its error stands)."""
    from detkit.data.datasets import resolve_path

    if not cfg.data.test:
        return "no data.test entry"
    first = cfg.data.test[0]
    if first.type != "coco":
        return None  # shapes: generated, never missing
    ann_file = resolve_path(first.ann_file)
    return None if ann_file.is_file() else f"{ann_file} does not exist"


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
