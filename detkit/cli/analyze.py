"""`detkit analyze` (also tools/analyze.py, detkit-analyze): why a detector fails, and whether a
dataset fits the anchors.

Predictions against ground truth (error analysis + a dataset report of that ground truth):
    detkit analyze --gt instances_val.json --predictions predictions.json --out report/
        [--images IMAGE_ROOT] [--iou 0.5] [--score-thresh 0.3] [--config CONFIG]
    detkit analyze output/run [--out DIR]     # a training or eval output folder: its config.yaml
        names the test set and the anchors, predictions.json holds the detections (detkit eval
        writes it); images are drawn from the test set's image root. Default --out: output/run/analysis.
Dataset only, before any training:
    detkit analyze --gt instances_train.json --out report/ [--config CONFIG]
    detkit analyze --config configs/shapes_r18.yaml --out report/   # the config's training set

Writes into --out: report.html (every figure with its table), analysis.json (every number), and
the PNGs: summary.png (TIDE + PR curves + confusion in one picture), tide.png, pr_overall.png, pr_<class>.png, confusion.png, per_class_ap.png,
false_positives.png / missed.png (with images), dataset.png, anchor_coverage.png.
Anchors and input scale come from the config (--config, the run's config.yaml, else the defaults
of configs/base.yaml).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from detkit.cli.common import run_cli, setup_logging
from detkit.errors import ConfigError, DataError

logger = logging.getLogger("detkit.cli.analyze")

NUM_EXAMPLES = 12


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit analyze",
        description="Error analysis of COCO predictions (COCO analyze curves, TIDE, confusion matrix, per-class "
        "table) and a dataset report (box statistics, anchor coverage), as PNGs + report.html + analysis.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  detkit analyze --gt val.json --predictions predictions.json --out report/ --images val_images/\n"
        "  detkit analyze output/shapes_r18                 # a run folder with predictions.json\n"
        "  detkit analyze --config configs/shapes_r18.yaml --out report/   # dataset report only",
    )
    parser.add_argument("run", nargs="?", help="a training or eval output folder (config.yaml + predictions.json)")
    parser.add_argument("--gt", help="COCO instances json (ground truth)")
    parser.add_argument("--predictions", help="COCO results json to analyse (leave out for a dataset report only)")
    parser.add_argument("--out", help="output folder (default: RUN/analysis in run mode; required otherwise)")
    parser.add_argument("--images", help="image folder of the ground truth: draws the worst false positives and misses")
    parser.add_argument(
        "--config", help="YAML config: anchors and input scale (and, alone, the training set to report)"
    )
    parser.add_argument(
        "--iou", type=float, default=0.5, help="IoU of a correct detection for TIDE and the confusion matrix"
    )
    parser.add_argument(
        "--score-thresh", type=float, default=0.3, help="detections scoring below are left out of the confusion matrix"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    setup_logging()
    if not 0.1 < args.iou < 1.0:
        raise ConfigError(f"--iou {args.iou} must lie in (0.1, 1): TIDE's background IoU is 0.1")
    cfg, gt_path, predictions_path, image_root, out = _resolve_inputs(args)
    written = analyze(
        gt_path=gt_path,
        predictions_path=predictions_path,
        out_dir=out,
        cfg=cfg,
        image_root=image_root,
        iou_threshold=args.iou,
        score_threshold=args.score_thresh,
    )
    print(f"report: {written}")
    return 0


def _resolve_inputs(args):
    from detkit.config import load_config

    if args.run:
        if args.gt or args.predictions:
            raise ConfigError("choose one: RUN_DIR, or --gt [--predictions]")
        run = Path(args.run)
        if not (run / "config.yaml").is_file():
            raise DataError(
                f"{run} is not a detkit output folder: it has no config.yaml (give --gt and --predictions instead)"
            )
        predictions = run / "predictions.json"
        if not predictions.is_file():
            raise DataError(
                f"{run} has no predictions.json; write it with `detkit eval {run / 'config.yaml'} "
                f"--weights {run / 'model_final.pth'} output_dir={run}` (or give --gt and --predictions)"
            )
        cfg = load_config(args.config or run / "config.yaml")
        gt_path, image_root = _dataset_paths(cfg, "test")
        return cfg, gt_path, str(predictions), args.images or image_root, Path(args.out or run / "analysis")
    if args.out is None:
        raise ConfigError("--out DIR is required (the folder for report.html, analysis.json and the PNGs)")
    cfg = load_config(args.config) if args.config else load_config(None)
    if args.gt is None:
        if args.predictions:
            raise ConfigError("--predictions needs --gt (the ground truth they were made on)")
        if not args.config:
            raise ConfigError(
                "nothing to analyse: give RUN_DIR, --gt [--predictions], or --config for its training set"
            )
        gt_path, image_root = _dataset_paths(cfg, "train")
        return cfg, gt_path, None, args.images or image_root, Path(args.out)
    return cfg, args.gt, args.predictions, args.images, Path(args.out)


def _dataset_paths(cfg, split: str) -> tuple[str, str]:
    """(ann_file, image_root) of the config's first dataset of `split` (a shapes set is generated here)."""
    from detkit.data.datasets import dataset_files

    entries = cfg.data.train if split == "train" else cfg.data.test
    if not entries:
        raise ConfigError(f"the config has no data.{split} dataset to analyse")
    if len(entries) > 1:
        logger.warning("data.%s lists %d datasets; analysing the first", split, len(entries))
    return dataset_files(entries[0])


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def analyze(
    *,
    gt_path: str,
    predictions_path: str | None,
    out_dir: Path,
    cfg,
    image_root: str | None = None,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
) -> Path:
    """Write the report of `predictions_path` (None: dataset report only) into `out_dir`; returns report.html."""
    from detkit.analysis import plots
    from detkit.analysis.dataset import anchor_coverage, box_statistics
    from detkit.analysis.errors import ANALYZE_TYPES, AREA_NAMES, TIDE_SPECIAL, TIDE_TYPES, analyze_errors
    from detkit.analysis.report import HtmlReport, write_json_atomic
    from detkit.engine.eval_common import check_predictions, load_ground_truth, load_predictions
    from detkit.engine.evaluator import METRIC_KEYS, COCOEvaluator

    out_dir.mkdir(parents=True, exist_ok=True)
    gt = load_ground_truth(gt_path)
    report = HtmlReport(f"detkit analysis of {Path(predictions_path).name if predictions_path else Path(gt_path).name}")
    numbers: dict = {"ground_truth": str(gt_path), "predictions": predictions_path}
    report.paragraph(
        f"ground truth: {gt_path}" + (f"; predictions: {predictions_path}" if predictions_path else ""), note=True
    )

    if predictions_path:
        raw = load_predictions(predictions_path)
        image_ids = [img["id"] for img in gt["images"]]
        category_ids = [c["id"] for c in gt["categories"]]
        predictions = check_predictions(raw, image_ids, category_ids, source=str(predictions_path))
        metrics = COCOEvaluator(gt_path, backend="pycocotools").run(raw, source=str(predictions_path)).metrics
        analysis = analyze_errors(gt, predictions, iou_threshold=iou_threshold, score_threshold=score_threshold)
        tide, curves = analysis.tide, analysis.curves
        numbers["coco"] = {k: metrics[k] for k in METRIC_KEYS}
        plots.plot_summary(analysis, out_dir / "summary.png")
        report.image("summary.png", "TIDE errors, PR curves and confusion matrix")
        report.heading("COCO box AP")
        report.table([{k: metrics[k] for k in METRIC_KEYS}], digits=2)

        report.heading(f"TIDE: what each error type costs (IoU {iou_threshold:g})")
        plots.plot_tide(tide, out_dir / "tide.png")
        report.image("tide.png", "TIDE error breakdown")
        report.table(
            [{"type": k, "dAP": tide.delta_ap[k], "count": tide.counts.get(k, "")} for k in TIDE_TYPES + TIDE_SPECIAL],
            digits=2,
        )
        report.paragraph(
            f"AP at IoU {iou_threshold:g} (TIDE's: top 100 detections per image over all classes) {tide.ap:.2f}. "
            "dAP = AP after fixing every error of that type alone, minus that AP (definitions of Bolya et al. 2020 "
            "as tidecv 1.0.1 computes them, re-implemented in detkit.analysis.errors). Cls: right box, wrong class; "
            f"Loc: right class, IoU {tide.bg_threshold:g}..{iou_threshold:g}; Both: wrong class and poor box; Dupe: a second box "
            f"on a found object; Bkg: a box on no object (IoU <= {tide.bg_threshold:g}); Miss: an object no detection "
            "comes near. FP / FN: all false positives scored last / all missed objects found.",
            note=True,
        )
        numbers["tide"] = {
            "ap": tide.ap,
            "delta_ap": tide.delta_ap,
            "counts": tide.counts,
            "pos_threshold": tide.pos_threshold,
            "bg_threshold": tide.bg_threshold,
        }

        report.heading("COCO error-analysis curves (Hoiem et al.; the COCO API's analyze)")
        plots.plot_analyze_curves(curves, out_dir / "pr_overall.png")
        report.image("pr_overall.png", "PR curves, all classes")
        report.table([{"area": AREA_NAMES[a], **curves.areas_under(None, a)} for a in range(len(AREA_NAMES))], digits=1)
        report.paragraph(
            "Each curve forgives one more error type: C75 / C50 are PR at IoU .75 / .50; Loc at IoU .10; Sim also "
            "ignores confusions within the supercategory; Oth all class confusions; BG removes every other false "
            "positive; FN finds every object. Legend: the area under each curve (AP, 0..1). Classes without objects "
            "of a size are left out of that size's average.",
            note=True,
        )
        class_links, class_rows = [], []
        for k, name in enumerate(analysis.class_names):
            file_name = f"pr_{_file_stem(name)}.png"
            plots.plot_analyze_curves(curves, out_dir / file_name, class_index=k, title=name)
            class_links.append((name, file_name))
            class_rows.append({"class": name, **curves.areas_under(k, 0)})
        report.paragraph("Per class (all sizes):")
        report.table(class_rows, digits=1)
        report.links(class_links)
        numbers["analyze_curves"] = {
            "types": list(ANALYZE_TYPES),
            "overall": {AREA_NAMES[a]: curves.areas_under(None, a) for a in range(len(AREA_NAMES))},
            "per_class": {name: curves.areas_under(k, 0) for k, name in enumerate(analysis.class_names)},
        }

        report.heading("Confusion matrix")
        plots.plot_confusion(
            analysis.confusion,
            analysis.class_names,
            out_dir / "confusion.png",
            iou_threshold=iou_threshold,
            score_threshold=score_threshold,
        )
        report.image("confusion.png", "confusion matrix")
        numbers["confusion"] = {
            "labels": analysis.class_names + ["background"],
            "counts": analysis.confusion,
            "iou_threshold": iou_threshold,
            "score_threshold": score_threshold,
        }

        report.heading("Per-class AP, worst first")
        plots.plot_per_class_ap(analysis.per_class, out_dir / "per_class_ap.png")
        report.image("per_class_ap.png", "per-class AP")
        report.table(analysis.per_class, columns=[c for c in analysis.per_class[0] if c != "category_id"], digits=1)
        numbers["per_class"] = analysis.per_class

        if image_root:
            report.heading("Worst false positives and missed objects")
            _draw_examples(gt, analysis, Path(image_root), out_dir)
            report.image("false_positives.png", "highest-scoring false positives")
            report.image("missed.png", "largest missed objects")

    report.heading("Dataset: boxes" + (" of the ground truth above" if predictions_path else ""))
    stats = box_statistics(gt)
    plots.plot_box_statistics(stats, out_dir / "dataset.png")
    report.image("dataset.png", "dataset statistics")
    summary = stats.summary()
    report.table([{k: v for k, v in summary.items() if not isinstance(v, dict)}], digits=2)
    report.table([{"class": name, "boxes": n} for name, n in summary["class_counts"].items()])
    numbers["dataset"] = summary

    rpn = cfg.model.rpn
    coverage = anchor_coverage(
        gt,
        sizes=rpn.anchor_sizes,
        aspect_ratios=rpn.aspect_ratios,
        stride=rpn.anchor_stride,
        min_size=cfg.data.min_size_test,
        max_size=cfg.data.max_size_test,
    )
    report.heading("Anchor coverage")
    plots.plot_anchor_coverage(coverage, out_dir / "anchor_coverage.png")
    report.image("anchor_coverage.png", "anchor coverage")
    rows = coverage.table()
    report.table(rows, digits=1)
    report.paragraph(
        f"Share (%) of boxes whose best anchor reaches each IoU; {coverage.scale_note} (model.rpn.anchor_sizes, "
        "model.rpn.aspect_ratios, model.rpn.anchor_stride, data.min_size_test / max_size_test). The RPN calls an "
        "anchor positive at IoU >= 0.7 (plus each box's best anchor); boxes below 0.3 rely on that rule alone.",
        note=True,
    )
    numbers["anchor_coverage"] = {"note": coverage.scale_note, "table": rows}

    write_json_atomic(out_dir / "analysis.json", numbers)
    path = report.write(out_dir / "report.html")
    logger.info("wrote %s, analysis.json and the figures in %s", path.name, out_dir)
    return path


def _draw_examples(gt: dict, analysis, image_root: Path, out_dir: Path) -> None:
    """false_positives.png: the highest-scoring false positives; missed.png: the largest Miss objects.
    Each tile: the image with its ground truth (thin, "gt ...") and the error box (thick)."""
    import cv2
    import numpy as np

    from detkit.analysis import plots
    from detkit.data.image_io import read_image
    from detkit.utils.visualization import draw_detections

    tide = analysis.tide
    index = {c: i for i, c in enumerate(analysis.category_ids)}
    images = {img["id"]: img for img in gt["images"]}
    objects_by_image: dict[int, list[dict]] = {}
    for ann in gt["annotations"]:
        objects_by_image.setdefault(ann["image_id"], []).append(ann)

    def tile(image_id: int, box_xywh, label: int, score, text: str):
        image = read_image(image_root / images[image_id]["file_name"])
        scale = min(1.0, 400 / max(image.shape[:2]))
        if scale < 1.0:
            image = cv2.resize(
                image,
                (int(image.shape[1] * scale + 0.5), int(image.shape[0] * scale + 0.5)),
                interpolation=cv2.INTER_AREA,
            )
        anns = objects_by_image.get(image_id, [])
        gt_boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4) * scale
        names = [f"gt {n}" for n in analysis.class_names]
        image = draw_detections(image, gt_boxes, [index[a["category_id"]] for a in anns], None, names, line_width=1)
        x, y, w, h = box_xywh
        names = list(analysis.class_names)
        names[label] = text
        return draw_detections(
            image,
            np.array([[x, y, x + w, y + h]]) * scale,
            [label],
            None if score is None else [score],
            names,
            line_width=3,
        )

    fp_errors = sorted((e for e in tide.errors if e.pred >= 0), key=lambda e: -tide.detections[e.pred]["score"])[
        :NUM_EXAMPLES
    ]
    tiles = []
    for err in fp_errors:
        det = tide.detections[err.pred]
        name = analysis.class_names[index[det["category_id"]]]
        tiles.append(
            (
                tile(det["image_id"], det["bbox"], index[det["category_id"]], det["score"], f"{err.kind}: {name}"),
                f"{err.kind}: {name} {det['score']:.2f} (image {det['image_id']})",
            )
        )
    plots.plot_image_grid(tiles, out_dir / "false_positives.png", title="highest-scoring false positives (TIDE type)")
    missed = sorted((e for e in tide.errors if e.kind == "Miss"), key=lambda e: -tide.objects[e.gt]["area"])[
        :NUM_EXAMPLES
    ]
    tiles = []
    for err in missed:
        obj = tide.objects[err.gt]
        name = analysis.class_names[index[obj["category_id"]]]
        tiles.append(
            (
                tile(obj["image_id"], obj["bbox"], index[obj["category_id"]], None, f"missed {name}"),
                f"missed {name} {obj['bbox'][2]:.0f}x{obj['bbox'][3]:.0f} px (image {obj['image_id']})",
            )
        )
    plots.plot_image_grid(tiles, out_dir / "missed.png", title="largest missed objects")


def entry_point() -> None:
    sys.exit(run_cli(main))
