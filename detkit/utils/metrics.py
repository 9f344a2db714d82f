"""Training metrics on disk: `metrics.jsonl`, TensorBoard events, and PNG curves.

metrics.jsonl has one JSON object per line; training rows look like

    {"iteration": 20, "total_loss": 1.83, "loss_rpn_cls": 0.41, ..., "lr": 0.0004, "time": 0.61,
     "data_time": 0.01, "eta_seconds": 512.0, "max_mem_mb": 2113.0}

and evaluation rows {"iteration": 2000, "bbox/AP": 31.2, "bbox/AP50": 52.0, ...}. Rows only ever
get appended, except that a resumed run first drops the rows written after its checkpoint (they
belong to iterations it is about to redo).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _plain(value):
    """A JSON-safe float/int (numpy and torch scalars included; nan/inf become null)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends rows to output_dir/metrics.jsonl and, when `tensorboard` is installed, to event files.

    With `enabled=False` (ranks other than 0) every method does nothing.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
            except ImportError:
                logger.debug("tensorboard is not installed: writing metrics.jsonl only (pip install 'detkit[tensorboard]')")
            else:
                self._tb = SummaryWriter(log_dir=str(self.path.parent))

    def truncate_after(self, iteration: int) -> None:
        """Drop rows with an iteration > `iteration` (before a resumed run redoes those iterations)."""
        if not self.enabled or not self.path.is_file():
            return
        rows = self.path.read_text().splitlines()
        kept = [line for line in rows if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
        if len(kept) != len(rows):
            tmp = self.path.with_name("." + self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)  # never a half-rewritten metrics file
            logger.info("metrics.jsonl: dropped %d rows after iteration %d (redone by this run)", len(rows) - len(kept), iteration)

    def write(self, iteration: int, values: Mapping[str, float]) -> None:
        """Append one row {"iteration": iteration, **values}."""
        if not self.enabled:
            return
        row = {"iteration": int(iteration)}
        row.update({key: _plain(value) for key, value in values.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, iteration)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl (blank and half-written last lines are skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: skipping an unreadable line: %.80s", path, line)
    return rows


# --------------------------------------------------------------------------------------------
# PNG curves (drawn with OpenCV, a core dependency, so no plotting library is needed)
# --------------------------------------------------------------------------------------------

_COLORS_BGR = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140)]


def _series(rows: Iterable[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["iteration"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    if not points:
        return np.zeros(0), np.zeros(0)
    xs, ys = zip(*points)
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def draw_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    *,
    title: str = "",
    log_y: bool = False,
    size: tuple[int, int] = (480, 800),
) -> Path:
    """Draw named (x, y) series on one set of axes and write a PNG.

    curves: {label: (xs (P,), ys (P,))}; size: (height, width) in pixels.
    """
    import cv2

    height, width = size
    left, right, top, bottom = 80, 20, 40, 50
    canvas = np.full((height, width, 3), 255, np.uint8)
    all_x = np.concatenate([xs for xs, _ in curves.values()]) if curves else np.zeros(0)
    all_y = np.concatenate([ys for _, ys in curves.values()]) if curves else np.zeros(0)
    if log_y:
        all_y = all_y[all_y > 0]
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(canvas, title, (left, 25), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    if all_x.size == 0 or all_y.size == 0:
        cv2.putText(canvas, "no data", (width // 2 - 40, height // 2), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.imwrite(str(path), canvas)
        return Path(path)

    def ty(y: np.ndarray) -> np.ndarray:
        return np.log10(np.maximum(y, 1e-12)) if log_y else y

    x0, x1 = float(all_x.min()), float(all_x.max())
    y0, y1 = float(ty(all_y).min()), float(ty(all_y).max())
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_px(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        px = left + (xs - x0) / (x1 - x0) * plot_w
        py = top + (1.0 - (ty(ys) - y0) / (y1 - y0)) * plot_h
        return np.stack([px, py], axis=1).round().astype(np.int32)

    cv2.rectangle(canvas, (left, top), (left + plot_w, top + plot_h), (0, 0, 0), 1)
    for i in range(5):  # axis ticks
        fx = x0 + (x1 - x0) * i / 4
        px = int(left + plot_w * i / 4)
        cv2.putText(canvas, f"{fx:.6g}", (px - 15, top + plot_h + 20), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        fy = y0 + (y1 - y0) * i / 4
        py = int(top + plot_h * (1 - i / 4))
        label = f"{10 ** fy:.3g}" if log_y else f"{fy:.3g}"
        cv2.putText(canvas, label, (5, py + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.line(canvas, (left, py), (left + plot_w, py), (225, 225, 225), 1)
    cv2.putText(canvas, "iteration", (left + plot_w // 2 - 30, height - 10), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (label, (xs, ys)) in enumerate(curves.items()):
        keep = ys > 0 if log_y else np.ones_like(ys, dtype=bool)
        if not keep.any():
            continue
        color = _COLORS_BGR[i % len(_COLORS_BGR)]
        pts = to_px(xs[keep], ys[keep])
        if len(pts) == 1:
            cv2.circle(canvas, tuple(int(v) for v in pts[0]), 3, color, -1)
        else:
            cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], False, color, 2, cv2.LINE_AA)
        ly = top + 18 + 18 * i
        cv2.line(canvas, (left + plot_w - 170, ly - 4), (left + plot_w - 150, ly - 4), color, 2)
        cv2.putText(canvas, label, (left + plot_w - 145, ly), font, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f"could not write {path}")
    return Path(path)


def plot_metrics(metrics_path: str | Path, out_dir: Optional[str | Path] = None) -> list[Path]:
    """metrics.jsonl -> losses.png (log scale), lr.png and, when evaluated, eval.png in `out_dir`.

    out_dir defaults to the metrics file's folder. Returns the written paths.
    """
    metrics_path = Path(metrics_path)
    out = Path(out_dir) if out_dir is not None else metrics_path.parent
    out.mkdir(parents=True, exist_ok=True)
    rows = read_metrics(metrics_path)
    keys = {k for r in rows for k in r}
    loss_keys = ["total_loss"] + sorted(k for k in keys if k.startswith("loss_"))
    written = [
        draw_curves({k: _series(rows, k) for k in loss_keys if k in keys}, out / "losses.png", title="training losses", log_y=True),
        draw_curves({"lr": _series(rows, "lr")}, out / "lr.png", title="learning rate"),
    ]
    eval_keys = [k for k in ("bbox/AP", "bbox/AP50", "bbox/AP75") if k in keys]
    held_out = sorted(k for k in keys if k.startswith("val/"))
    if eval_keys or held_out:
        written.append(
            draw_curves({k: _series(rows, k) for k in (eval_keys or held_out)}, out / "eval.png", title="evaluation")
        )
    return written
