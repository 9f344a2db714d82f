"""Training metrics on disk: `metrics.jsonl` and TensorBoard events (PNG curves: detkit.analysis.plots).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from detkit.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _plain(value):
    """A JSON-safe float/int (numpy and torch scalars included; nan/inf become null)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsSink(Protocol):
    """Something that takes every row too (detkit.engine.tracking.Tracking: MLflow, W&B)."""

    def log_metrics(self, step: int, values: Mapping[str, Any]) -> None: ...


class MetricsWriter:
    """Appends rows to output_dir/metrics.jsonl and, when `tensorboard` is installed, to event files.

    sinks: more receivers of every row (called with the iteration and the row's values).
    With `enabled=False` (ranks other than 0) every method does nothing.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        sinks: Sequence[MetricsSink] = (),
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._tb = None
        self.sinks = list(sinks)
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
            except ImportError:
                logger.debug(
                    "tensorboard is not installed: writing metrics.jsonl only (pip install 'detkit[tensorboard]')"
                )
            else:
                self._tb = SummaryWriter(log_dir=str(self.path.parent))

    def truncate_after(self, iteration: int) -> None:
        """Drop rows with an iteration > `iteration` (before a resumed run redoes those iterations)."""
        if not self.enabled or not self.path.is_file():
            return
        rows = self.path.read_text().splitlines()
        kept = []
        for number, line in enumerate(rows, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A row cut short by a crash, power loss or a full disk (usually the last one).
                logger.warning(
                    "%s: dropping line %d, which is not complete JSON (a write cut short): %.80s",
                    self.path,
                    number,
                    line,
                )
                continue
            if row.get("iteration", 0) <= iteration:
                kept.append(line)
        if len(kept) != len(rows):
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))  # never a half-rewritten metrics file
            logger.info(
                "metrics.jsonl: dropped %d rows after iteration %d (redone by this run)",
                len(rows) - len(kept),
                iteration,
            )

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
        values_only = {key: value for key, value in row.items() if key != "iteration"}
        for sink in self.sinks:
            sink.log_metrics(int(iteration), values_only)

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
