"""Figures as PNG files, drawn with matplotlib's Agg renderer (no display, no pyplot state).

    plot_metrics("output/run/metrics.jsonl")          # losses.png, lr.png, eval.png beside it
    plot_analyze_curves(analysis.curves, "report/pr_overall.png")

Every function writes one PNG atomically (detkit.utils.files.atomic_output) and returns its path.
Figures are built on `matplotlib.figure.Figure` directly, so nothing here touches the global pyplot
backend of a program that imports detkit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from detkit.utils.files import atomic_output
from detkit.utils.metrics import read_metrics

# matplotlib's default cycle, named so the same loss keeps its colour in every figure.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
ANALYZE_COLORS = ("#08306b", "#2171b5", "#6baed6", "#74c476", "#fdae6b", "#e6550d", "#a50f15")
DPI = 100


def save_figure(fig: Figure, path: str | Path, *, tight_bbox: bool = False) -> Path:
    """Write `fig` as a PNG at `path` (atomically) and return the path.

    tight_bbox: crop to the drawn content (needed when a legend sits outside the axes); it costs
    a second rendering, so figures laid out with tight_layout() leave it off.
    """
    path = Path(path)
    with atomic_output(path) as tmp_path:
        fig.savefig(tmp_path, format="png", dpi=DPI, bbox_inches="tight" if tight_bbox else None)
    return path


def _readable_log_axis(axis) -> None:
    """Log ticks at 1, 2 and 5 times powers of ten, printed as plain numbers (0.02, 0.5, 1, 2)."""
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_locator(ticker.LogLocator(base=10, subs=tuple(range(1, 10))))
    axis.set_minor_formatter(ticker.NullFormatter())


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def metric_series(rows: Iterable[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations (P,), values (P,)) of the rows holding a number under `key`."""
    points = [
        (r["iteration"], r[key])
        for r in rows
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
    ]
    if not points:
        return np.zeros(0), np.zeros(0)
    xs, ys = zip(*points)
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def smooth(values: np.ndarray, window: int | None = None) -> np.ndarray:
    """Trailing moving average (P,) -> (P,); window defaults to 1/10 of the points (1..50).
    The first points average over what exists so far, so the curve starts at the first value."""
    if values.size == 0:
        return values
    window = window or int(np.clip(values.size // 10, 1, 50))
    sums = np.cumsum(np.concatenate([[0.0], values]))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    return (sums[1:] - sums[np.arange(1, values.size + 1) - counts]) / counts


def _empty(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_losses(rows: Sequence[dict], path: str | Path) -> Path:
    """Each loss term raw (thin) and smoothed (thick) on a log axis, legend outside the plot."""
    return save_figure(losses_figure(rows), path, tight_bbox=True)


def losses_figure(rows: Sequence[dict]) -> Figure:
    """The figure `plot_losses` writes (metrics.jsonl rows in, one log-scale axis out)."""
    keys = {k for r in rows for k in r}
    loss_keys = [k for k in ["total_loss"] + sorted(k for k in keys if k.startswith("loss_")) if k in keys]
    fig = Figure(figsize=(9, 4.8))
    ax = fig.add_subplot()
    drawn = False
    for i, key in enumerate(loss_keys):
        xs, ys = metric_series(rows, key)
        keep = ys > 0
        if not keep.any():
            continue
        xs, ys = xs[keep], ys[keep]
        color = COLORS[i % len(COLORS)]
        ax.plot(xs, ys, color=color, linewidth=0.8, alpha=0.3)
        ax.plot(xs, smooth(ys), color=color, linewidth=2.0, label=key, marker="o" if xs.size == 1 else None)
        drawn = True
    if drawn:
        ax.set_yscale("log")
        _readable_log_axis(ax.yaxis)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="smoothed (raw faint)")
    else:
        _empty(ax)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (log scale)")
    ax.set_title("training losses")
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    return fig


def plot_learning_rate(rows: Sequence[dict], path: str | Path) -> Path:
    xs, ys = metric_series(rows, "lr")
    fig = Figure(figsize=(9, 3.2))
    ax = fig.add_subplot()
    if xs.size:
        ax.plot(xs, ys, color=COLORS[0], linewidth=2.0, marker="o" if xs.size == 1 else None)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_ylim(bottom=0)
    else:
        _empty(ax)
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate")
    ax.grid(True, alpha=0.4)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_evaluation(rows: Sequence[dict], path: str | Path) -> Path | None:
    """COCO AP / AP50 / AP75 over iterations (or held-out losses, "val/..."); None when neither."""
    keys = {k for r in rows for k in r}
    eval_keys = [k for k in ("bbox/AP", "bbox/AP50", "bbox/AP75") if k in keys]
    held_out = sorted(k for k in keys if k.startswith("val/"))
    if not (eval_keys or held_out):
        return None
    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot()
    for i, key in enumerate(eval_keys or held_out):
        xs, ys = metric_series(rows, key)
        if xs.size:
            ax.plot(xs, ys, color=COLORS[i % len(COLORS)], linewidth=2.0, marker="o", label=key)
            ax.annotate(
                f"{ys[-1]:.1f}" if eval_keys else f"{ys[-1]:.3g}",
                (xs[-1], ys[-1]),
                textcoords="offset points",
                xytext=(6, 0),
                va="center",
                fontsize=9,
            )
    last_iteration = max((r.get("iteration", 0) for r in rows), default=0)
    ax.set_xlim(0, max(last_iteration, 1) * 1.05)  # the whole run, so one evaluation sits where it happened
    ax.set_xlabel("iteration")
    ax.set_ylabel("AP (%)" if eval_keys else "held-out loss")
    if eval_keys:
        ax.set_ylim(0, 100)
    ax.set_title("evaluation")
    ax.grid(True, alpha=0.4)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, path, tight_bbox=True)


def plot_metrics(metrics_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """metrics.jsonl -> losses.png, lr.png and, when evaluated, eval.png in `out_dir`
    (default: the metrics file's folder). Returns the written paths."""
    metrics_path = Path(metrics_path)
    out = Path(out_dir) if out_dir is not None else metrics_path.parent
    rows = read_metrics(metrics_path)
    written = [plot_losses(rows, out / "losses.png"), plot_learning_rate(rows, out / "lr.png")]
    evaluation = plot_evaluation(rows, out / "eval.png")
    if evaluation is not None:
        written.append(evaluation)
    return written


# --------------------------------------------------------------------------------------------
# Error analysis
# --------------------------------------------------------------------------------------------


def draw_analyze_curves(ax, curves, class_index: int | None, area: int, title: str) -> None:
    """One panel of COCO analyze PR curves (errors.AnalyzeCurves): the band between two curves is
    the AP the next error type costs; the legend gives each curve's AP."""
    from detkit.analysis.errors import ANALYZE_TYPES, AREA_NAMES

    recall = curves.recall_thresholds
    values = curves.curves(class_index, area)  # (7, R)
    ax.set_title(f"{title}, {AREA_NAMES[area]} objects")
    if np.isnan(values).all():
        _empty(ax, f"no {AREA_NAMES[area]} objects")
    else:
        below = np.zeros_like(recall)
        for i, name in enumerate(ANALYZE_TYPES):
            ax.fill_between(
                recall, below, values[i], color=ANALYZE_COLORS[i], linewidth=0, label=f"[{values[i].mean():.3f}] {name}"
            )
            ax.plot(recall, values[i], color="black", linewidth=0.5)
            below = values[i]
        ax.legend(loc="lower left", fontsize=8, framealpha=0.85)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")


def plot_analyze_curves(curves, path: str | Path, class_index: int | None = None, title: str = "all classes") -> Path:
    """COCO analyze PR curves of one class or all (class_index None), one panel per area range."""
    fig = Figure(figsize=(11, 8.5))
    for area, ax in enumerate(fig.subplots(2, 2).flat):
        draw_analyze_curves(ax, curves, class_index, area, title)
    fig.tight_layout()
    return save_figure(fig, path)


def _bar_labels(ax, bars, labels: Sequence[str]) -> None:
    for bar, label in zip(bars, labels):
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            va="bottom",
            fontsize=9,
        )


def draw_tide(ax, tide, special_ax=None) -> None:
    """TIDE's dAP per error type (errors.TideResult) as bars labelled with dAP and count; the two
    special errors (FP, FN) on `special_ax` when given."""
    from detkit.analysis.errors import TIDE_SPECIAL, TIDE_TYPES

    values = [tide.delta_ap[k] for k in TIDE_TYPES]
    bars = ax.bar(TIDE_TYPES, values, color=COLORS[: len(TIDE_TYPES)])
    _bar_labels(ax, bars, [f"{v:.2f}\n({tide.counts[k]})" for k, v in zip(TIDE_TYPES, values)])
    ax.set_ylabel("dAP (AP points gained by fixing)")
    ax.set_title(f"TIDE errors at IoU {tide.pos_threshold:g} (AP {tide.ap:.1f}); (count)")
    ax.set_ylim(0, max(values + [1.0]) * 1.25)
    if special_ax is not None:
        svalues = [tide.delta_ap[k] for k in TIDE_SPECIAL]
        bars = special_ax.bar(["FP", "FN"], svalues, color=["#7f7f7f", "#bcbd22"])
        _bar_labels(special_ax, bars, [f"{v:.2f}" for v in svalues])
        special_ax.set_title("all false positives / negatives")
        special_ax.set_ylim(0, max(svalues + [1.0]) * 1.25)


def plot_tide(tide, path: str | Path) -> Path:
    fig = Figure(figsize=(10, 3.8))
    main, special = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    draw_tide(main, tide, special)
    fig.tight_layout()
    return save_figure(fig, path)


def draw_confusion(ax, matrix: np.ndarray, class_names: Sequence[str], *, iou_threshold: float, score_threshold: float):
    """(K+1, K+1) counts (errors.confusion_matrix) shown normalised per true class; cells print
    the share and the count. Returns the image (for a colorbar)."""
    from detkit.analysis.errors import normalize_rows

    names = list(class_names) + ["background"]
    shares = normalize_rows(matrix)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 30:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(
                    j,
                    i,
                    f"{shares[i, j]:.2f}\n{count}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if shares[i, j] > 0.6 else "black",
                )
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted class (background: object missed)")
    ax.set_ylabel("true class (background: box on no object)")
    ax.set_title(f"confusion at IoU {iou_threshold:g}, score >= {score_threshold:g}")
    return image


def plot_confusion(
    matrix: np.ndarray, class_names: Sequence[str], path: str | Path, *, iou_threshold: float, score_threshold: float
) -> Path:
    size = max(5.0, 0.55 * (len(class_names) + 1) + 2.5)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    image = draw_confusion(ax, matrix, class_names, iou_threshold=iou_threshold, score_threshold=score_threshold)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class (row)")
    fig.tight_layout()
    return save_figure(fig, path, tight_bbox=True)


def plot_summary(analysis, path: str | Path) -> Path:
    """One picture of an errors.ErrorAnalysis: TIDE bars, the overall PR curves, the confusion matrix."""
    fig = Figure(figsize=(18, 5.2))
    tide_ax, pr_ax, confusion_ax = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.15, 1, 0.9]})
    draw_tide(tide_ax, analysis.tide)
    draw_analyze_curves(pr_ax, analysis.curves, None, 0, "COCO analyze")
    draw_confusion(
        confusion_ax,
        analysis.confusion,
        analysis.class_names,
        iou_threshold=analysis.iou_threshold,
        score_threshold=analysis.score_threshold,
    )
    fig.tight_layout()
    return save_figure(fig, path, tight_bbox=True)  # the rotated class names can overhang the layout


def plot_per_class_ap(rows: Sequence[dict], path: str | Path) -> Path:
    """AP and AP50 per class as horizontal bars, worst AP at the top."""
    rows = [r for r in rows if not math.isnan(r["AP"])]
    fig = Figure(figsize=(8, max(2.5, 0.3 * len(rows) + 1.2)))
    ax = fig.add_subplot()
    ys = np.arange(len(rows))
    ax.barh(ys + 0.2, [r["AP50"] for r in rows], height=0.4, color=COLORS[1], label="AP50")
    ax.barh(ys - 0.2, [r["AP"] for r in rows], height=0.4, color=COLORS[0], label="AP")
    ax.set_yticks(ys, [r["name"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("AP (%)")
    ax.set_title("per-class AP, worst first")
    ax.legend(loc="lower right")
    ax.grid(True, axis="x", alpha=0.4)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_image_grid(tiles: Sequence[tuple[np.ndarray, str]], path: str | Path, *, title: str, columns: int = 4) -> Path:
    """(H, W, 3) RGB uint8 images with a caption each, in a grid."""
    rows = max(1, math.ceil(len(tiles) / columns))
    fig = Figure(figsize=(2.6 * columns, 2.8 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).reshape(-1)
    for ax in axes:
        ax.axis("off")
    for ax, (image, caption) in zip(axes, tiles):
        ax.imshow(image)
        ax.set_title(caption, fontsize=8)
    if not tiles:
        _empty(axes[0], "none")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Dataset report
# --------------------------------------------------------------------------------------------


def plot_box_statistics(stats, path: str | Path) -> Path:
    """Boxes per image, class balance, box size (sqrt of area) and aspect ratio (h / w) histograms
    of a dataset.BoxStatistics."""
    fig = Figure(figsize=(12, 8))
    (per_image, classes), (sizes, ratios) = fig.subplots(2, 2)
    counts = stats.boxes_per_image
    per_image.hist(counts, bins=np.arange(counts.max() + 2) - 0.5 if counts.size else 1, color=COLORS[0])
    per_image.set_title(f"boxes per image ({counts.size} images, mean {counts.mean() if counts.size else 0:.2f})")
    per_image.set_xlabel("boxes")
    per_image.set_ylabel("images")
    per_image.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    order = np.argsort(stats.class_counts)
    classes.barh(np.arange(len(order)), stats.class_counts[order], color=COLORS[2])
    classes.set_yticks(np.arange(len(order)), [stats.class_names[i] for i in order], fontsize=8)
    classes.set_title("boxes per class")
    classes.set_xlabel("boxes")
    side = np.sqrt(np.maximum(stats.widths * stats.heights, 1e-6))
    if side.size:
        sizes.hist(side, bins=np.geomspace(max(side.min(), 1.0), max(side.max(), 2.0), 40), color=COLORS[1])
        sizes.set_xscale("log")
        _readable_log_axis(sizes.xaxis)
        for edge, label in ((32, "small | medium"), (96, "medium | large")):
            sizes.axvline(edge, color="black", linestyle="--", linewidth=1)
            sizes.text(edge, 0.98, f" {label}", transform=sizes.get_xaxis_transform(), va="top", fontsize=8)
    sizes.set_title("box size sqrt(w * h), original pixels")
    sizes.set_xlabel("pixels")
    ratio = stats.heights / np.maximum(stats.widths, 1e-6)
    if ratio.size:
        ratios.hist(
            ratio,
            bins=np.geomspace(max(ratio.min(), 1e-2), max(ratio.max(), 1.01 * max(ratio.min(), 1e-2)), 40),
            color=COLORS[4],
        )
        ratios.set_xscale("log")
        ratios.xaxis.set_major_locator(ticker.FixedLocator([0.1, 0.2, 0.25, 1 / 3, 0.5, 2 / 3, 1, 1.5, 2, 3, 4, 5, 10]))
        ratios.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:.2g}"))
        ratios.xaxis.set_minor_formatter(ticker.NullFormatter())
    ratios.set_title("aspect ratio h / w")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_anchor_coverage(coverage, path: str | Path, thresholds: Sequence[float] = (0.7, 0.5, 0.3)) -> Path:
    """Left: every box's width and height at the input scale, coloured by its best anchor IoU, the
    anchor shapes as crosses and the boxes below the lowest threshold circled in red. Right: the
    distribution of best IoU with the thresholds marked."""
    fig = Figure(figsize=(13, 5.5))
    scatter_ax, hist_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    wh = coverage.boxes_xyxy[:, 2:] - coverage.boxes_xyxy[:, :2]
    if wh.size:
        points = scatter_ax.scatter(wh[:, 0], wh[:, 1], c=coverage.best_iou, cmap="RdYlGn", vmin=0, vmax=1, s=8)
        fig.colorbar(points, ax=scatter_ax, label="best anchor IoU")
        low = coverage.best_iou < min(thresholds)
        scatter_ax.scatter(
            wh[low, 0],
            wh[low, 1],
            facecolors="none",
            edgecolors="red",
            s=40,
            linewidths=1,
            label=f"IoU < {min(thresholds):g}: {int(low.sum())} boxes",
        )
    scatter_ax.scatter(
        coverage.anchor_wh[:, 0], coverage.anchor_wh[:, 1], marker="x", color="black", s=60, label="anchor shapes"
    )
    scatter_ax.set_xscale("log")
    scatter_ax.set_yscale("log")
    _readable_log_axis(scatter_ax.xaxis)
    _readable_log_axis(scatter_ax.yaxis)
    scatter_ax.set_xlabel("box width at input scale (px)")
    scatter_ax.set_ylabel("box height at input scale (px)")
    scatter_ax.set_title("boxes vs anchors")
    scatter_ax.legend(loc="upper left", fontsize=8)
    hist_ax.hist(coverage.best_iou, bins=np.linspace(0, 1, 41), color=COLORS[0])
    for t in thresholds:
        hist_ax.axvline(t, color="black", linestyle="--", linewidth=1)
        hist_ax.text(
            t,
            0.98,
            f" {coverage.share_at(t) * 100:.1f}% >= {t:g}",
            transform=hist_ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
            rotation=90,
        )
    hist_ax.set_xlabel("best anchor IoU")
    hist_ax.set_ylabel("boxes")
    hist_ax.set_title("best anchor IoU per box")
    fig.suptitle(coverage.scale_note, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
