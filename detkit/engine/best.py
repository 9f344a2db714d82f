"""The best model of a run (`model_best.pth`) and early stopping, from the periodic evaluations.

    best = BestModelTracker.from_config(cfg.test)
    update = best.update(iteration=2000, results={"bbox/AP": 31.2, ...})   # rank 0, after an evaluation
    if update.improved: save model_best.pth                                  # (the trainer does)
    if update.stop: save model_final.pth and end the run early
    checkpoint["best"] = best.state_dict()   # and best.load_state_dict(...) on --resume

Two reference values are kept, as Keras and Lightning do:
- the best value (`value`, `iteration`): any strict improvement of `metric` replaces model_best.pth;
- the early-stopping reference (`stop_reference`): only an improvement by more than `min_delta`
  resets the count of evaluations without improvement; after `patience` of them in a row the run
  stops (patience 0: never).
A value that is not a finite number (NaN: COCO cannot define an AP with no ground truth of that
class) never counts as an improvement.

model_best.pth is an inference checkpoint: {"model", "config", "class_names", "category_ids",
"iteration", "best": {"metric", "mode", "value", "iteration"}}, no optimizer (resume from
last_checkpoint; start a new run from the best weights with model.weights=.../model_best.pth).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from detkit.errors import ConfigError

logger = logging.getLogger(__name__)

BEST_NAME = "model_best.pth"


@dataclass(frozen=True)
class BestUpdate:
    """What one evaluation changed. value: the metric's value at this evaluation (None: not reported
    or not finite); improved: model_best.pth must be written; stop: training ends now."""

    iteration: int
    value: float | None
    improved: bool
    stop: bool


def check_metric_name(metric: str, available: Sequence[str], where: str = "test.best_metric") -> None:
    """ConfigError unless `metric` is one of the evaluation's keys `available` (listed in the message)."""
    if metric and metric not in available:
        raise ConfigError(
            f"{where}={metric!r} is not a metric the evaluation reports; use one of: {', '.join(available)}"
        )


def evaluation_metric_names(class_names: Sequence[str], metric: str = "coco") -> list[str]:
    """The numeric keys `detkit.engine.trainer.evaluate_model` writes for `test.metric`: coco:
    bbox/<COCO stat> and bbox/AP-<class> for each test class; voc07 / voc12: bbox/AP, AP50, AP75
    and bbox/AP50-<class> (names as the test set's categories give them)."""
    if metric == "coco":
        from detkit.engine.evaluator import METRIC_KEYS

        return [f"bbox/{k}" for k in METRIC_KEYS] + [f"bbox/AP-{name}" for name in class_names]
    return ["bbox/AP", "bbox/AP50", "bbox/AP75"] + [f"bbox/AP50-{name}" for name in class_names]


class BestModelTracker:
    """The best value of one metric over a run's evaluations, and the early-stopping count.

    metric: a key of the evaluation results ("" = track nothing); mode: "max" or "min";
    patience: evaluations without an improvement > min_delta before `stop` (0 = never).
    """

    def __init__(self, metric: str = "bbox/AP", mode: str = "max", patience: int = 0, min_delta: float = 0.0):
        if mode not in ("max", "min"):
            raise ConfigError(f"test.best_mode={mode!r}: must be max or min")
        self.metric = metric
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.value: float | None = None  # the best value so far and the iteration it was reached at
        self.iteration: int | None = None
        self.stop_reference: float | None = None
        self.evals_without_improvement = 0
        self.stopped_at: int | None = None  # the iteration early stopping ended the run at

    @classmethod
    def from_config(cls, test_cfg: Any) -> BestModelTracker:
        """From the `test` section: best_metric, best_mode, early_stop_patience, early_stop_min_delta."""
        return cls(
            test_cfg.best_metric, test_cfg.best_mode, test_cfg.early_stop_patience, test_cfg.early_stop_min_delta
        )

    @property
    def enabled(self) -> bool:
        return bool(self.metric)

    def _better(self, value: float, than: float | None, margin: float) -> bool:
        if than is None:
            return True
        return value > than + margin if self.mode == "max" else value < than - margin

    def update(self, iteration: int, results: Mapping[str, Any], allow_stop: bool = True) -> BestUpdate:
        """Take one evaluation's results (rank 0's dict, keys as in metrics.jsonl) at `iteration`.
        allow_stop=False: the evaluation after the last iteration (counts for the best, stops nothing)."""
        if not self.enabled:
            return BestUpdate(iteration, None, improved=False, stop=False)
        raw = results.get(self.metric)
        value = float(raw) if isinstance(raw, (int, float)) and math.isfinite(raw) else None
        improved = value is not None and self._better(value, self.value, 0.0)
        if improved:
            previous = (
                "none before" if self.value is None else f"previous {self.value:.4g} at iteration {self.iteration}"
            )
            logger.info("best %s %.4g at iteration %d (%s)", self.metric, value, iteration, previous)
            self.value, self.iteration = value, iteration
        if value is not None and self._better(value, self.stop_reference, self.min_delta):
            self.stop_reference = value
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
            if not improved:
                logger.info(
                    "%s %s at iteration %d; the best stays %s at iteration %s%s",
                    self.metric,
                    "not reported" if value is None else f"{value:.4g}",
                    iteration,
                    "none" if self.value is None else f"{self.value:.4g}",
                    self.iteration,
                    f" ({self.evals_without_improvement} of {self.patience} evaluations without improvement)"
                    if self.patience
                    else "",
                )
        stop = allow_stop and self.patience > 0 and self.evals_without_improvement >= self.patience
        if stop:
            self.stopped_at = iteration
        return BestUpdate(iteration, value, improved=improved, stop=stop)

    def stop_reason(self) -> str:
        """The one line that says why the run stopped early."""
        return (
            f"early stopping at iteration {self.stopped_at}: {self.metric} has not improved by more than "
            f"{self.min_delta:g} on {self.stop_reference:.4g} for {self.evals_without_improvement} evaluations "
            f"(test.early_stop_patience={self.patience}); best {self.value:.4g} at iteration {self.iteration}"
            if self.stop_reference is not None and self.value is not None
            else f"early stopping at iteration {self.stopped_at}: {self.metric} was never reported as a finite number "
            f"in {self.evals_without_improvement} evaluations (test.early_stop_patience={self.patience})"
        )

    def record(self) -> dict[str, Any]:
        """{"metric", "mode", "value", "iteration"}: what model_best.pth and summary.json hold."""
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "iteration": self.iteration}

    def state_dict(self) -> dict[str, Any]:
        """Plain values for a training checkpoint (weights_only-safe)."""
        return {
            **self.record(),
            "stop_reference": self.stop_reference,
            "evals_without_improvement": self.evals_without_improvement,
            "stopped_at": self.stopped_at,
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Continue from a checkpoint's state. A state of another metric or mode (the config
        changed on --resume) does not apply: the best value starts afresh, with a log line."""
        if not state:
            return
        if state.get("metric") != self.metric or state.get("mode") != self.mode:
            logger.info(
                "the checkpoint kept the best %s (%s); this run tracks %s (%s): its best value starts afresh",
                state.get("metric"),
                state.get("mode"),
                self.metric,
                self.mode,
            )
            return
        self.value = state.get("value")
        self.iteration = state.get("iteration")
        self.stop_reference = state.get("stop_reference")
        self.evals_without_improvement = int(state.get("evals_without_improvement") or 0)
        self.stopped_at = state.get("stopped_at")
        if self.stopped_at is not None and not (0 < self.patience <= self.evals_without_improvement):
            # The run stopped early, and this config's patience (raised, or 0) lets it go on.
            logger.info(
                "the run stopped early at iteration %d; test.early_stop_patience=%d lets it continue",
                self.stopped_at,
                self.patience,
            )
            self.stopped_at = None
