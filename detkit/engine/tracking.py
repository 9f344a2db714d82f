"""Experiment tracking besides metrics.jsonl: MLflow and Weights & Biases (TensorBoard: detkit.utils.metrics).

    tracking = Tracking(cfg, output_dir, enabled=is_main)   # every rank: a missing package fails here
    tracking.start(resume_state=checkpoint.get("tracking"), start_iter=...)   # rank 0 opens the runs
    tracking.log_metrics(iteration, {"total_loss": 1.83, ...})            # every metrics.jsonl row
    tracking.log_summary({"best_checkpoint": ".../model_best.pth", "best/bbox/AP": 31.2})
    tracking.finish("FINISHED")                                            # or FAILED / KILLED
    checkpoint["tracking"] = tracking.state_dict()                         # {"mlflow_run_id": ...}

Selected by `logging.trackers` (tensorboard | mlflow | wandb). Only the process with enabled=True
(rank 0) talks to a tracker; every process checks that the packages import, so that a missing extra
stops all ranks alike, before the first iteration.

What each run gets: params = the resolved config, flattened to dotted keys ("solver.base_lr"; a
list is one value); metrics = every metrics.jsonl row at its iteration as the step (training rows
every solver.log_period, evaluation rows every test.eval_period and at the end); at the end the
best checkpoint's path, the best value and the final checkpoint's path.

MLflow: logging.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else the file store ./mlruns (in the
working directory, as MLflow's own default; `mlflow ui` there shows it). The `mlflow-skinny` package
is enough for a file store or a tracking server (http/https); a database URI (sqlite:///...) needs
the full `mlflow` package. MLflow 3 refuses file stores unless MLFLOW_ALLOW_FILE_STORE is true: for a
file: URI this module sets it when the environment has not set it. A --resume continues the same
MLflow run (its id is in the checkpoint); iterations redone after the checkpoint appear twice in its
history, at the same step.

W&B: project logging.experiment, mode logging.wandb_mode (offline: no network, files under
<dir>/wandb/offline-run-*, uploaded later by `wandb sync`), dir $WANDB_DIR else output_dir. A
--resume starts a new W&B run (steps from the resumed iteration on).

A tracker that fails while training (a tracking server gone) logs a warning and is dropped: the run
goes on, and metrics.jsonl keeps every number.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detkit.config import Config, config_to_dict
from detkit.errors import ConfigError

logger = logging.getLogger(__name__)

# tracker name -> (module that must import, the pip extra that installs it)
EXTRAS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}

# MLflow's limits: a param value of at most 6000 characters, at most 100 params and 1000 metrics per batch.
_MLFLOW_PARAM_CHARS = 6000
_MLFLOW_PARAMS_PER_BATCH = 100
_MLFLOW_METRICS_PER_BATCH = 1000


def flatten_config(cfg: Config) -> dict[str, Any]:
    """{"model.depth": 101, "solver.steps": [210000, 250000], ...}: the config as dotted keys."""

    def walk(tree: Mapping, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            name = f"{prefix}{key}"
            out.update(walk(value, name + ".") if isinstance(value, Mapping) else {name: value})
        return out

    return walk(config_to_dict(cfg), "")


def check_tracker_packages(trackers: tuple[str, ...] | list[str]) -> None:
    """ConfigError naming the extra of the first tracker in `trackers` whose package does not import."""
    for name in trackers:
        if name not in EXTRAS:
            continue
        module, extra = EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(
                f"logging.trackers lists {name}, but {exc}; install it with pip install 'detkit[{extra}]' "
                f"or remove {name} from logging.trackers"
            ) from None


def _numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-not numbers of a metrics row (None, strings and booleans dropped)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MLflowRun:
    """One MLflow run through MlflowClient (no global active run: several trainers in one process
    stay apart)."""

    name = "mlflow"

    def __init__(self, cfg: Config, output_dir: Path, resume_state: Mapping[str, Any] | None, start_iter: int):
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient

        log_cfg = cfg.logging
        uri = log_cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "mlruns"
        if "://" not in uri and not uri.startswith("file:"):  # a plain path: a local file store
            uri = Path(uri).resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps file stores in maintenance mode and refuses them unless asked; they are
            # the store mlflow-skinny can write without a server or a database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        where = f"logging.mlflow_tracking_uri={uri!r}"
        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(log_cfg.experiment)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(log_cfg.experiment)
            )
        except Exception as exc:  # noqa: BLE001 - any store error (bad URI, no server, missing sqlalchemy) is the user's to fix
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            hint = (
                " (a database URI needs the full mlflow package: pip install mlflow)"
                if uri.split(":", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql")
                else ""
            )
            raise ConfigError(f"{where}: MLflow cannot open this tracking store: {first}{hint}") from None

        params = {k: str(v)[:_MLFLOW_PARAM_CHARS] for k, v in flatten_config(cfg).items()}
        run_id = (resume_state or {}).get("mlflow_run_id")
        run = None
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except Exception:  # noqa: BLE001 - a run id from another store: start a new run instead
                logger.warning("MLflow run %s of the checkpoint is not in %s: starting a new run", run_id, uri)
        self.run_id: str
        if run is not None:
            self.run_id = str(run_id)
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            known = run.data.params
            new = {k: v for k, v in params.items() if k not in known}
            # MLflow params cannot change: keys changed on --resume are recorded as tags.
            changed = {
                f"changed_on_resume.{k}": f"{known[k]} -> {v} (from iteration {start_iter})"
                for k, v in params.items()
                if k in known and known[k] != v
            }
            for key, text in changed.items():
                self.client.set_tag(self.run_id, key, text[:_MLFLOW_PARAM_CHARS])
            logger.info("MLflow: continuing run %s in %s", run_id, uri)
        else:
            run_name = log_cfg.run_name or Path(cfg.output_dir).resolve().name
            created = self.client.create_run(
                experiment_id, run_name=run_name, tags={"detkit.output_dir": str(Path(cfg.output_dir).resolve())}
            )
            self.run_id = str(created.info.run_id)
            new = params
            logger.info("MLflow: run %s (%s) in %s, experiment %s", self.run_id, run_name, uri, log_cfg.experiment)
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), _MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _MLFLOW_PARAMS_PER_BATCH])

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), _MLFLOW_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _MLFLOW_METRICS_PER_BATCH])

    def log_summary(self, values: Mapping[str, Any], step: int) -> None:
        numbers = _numeric(values)
        if numbers:
            self.log_metrics(step, numbers)
        for key, value in values.items():
            if key not in numbers and value is not None:
                self.client.set_tag(self.run_id, key, str(value)[:_MLFLOW_PARAM_CHARS])

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def state(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": self.uri}


class WandbRun:
    """One Weights & Biases run (wandb.init with this run's settings; finish() ends it)."""

    name = "wandb"

    def __init__(self, cfg: Config, output_dir: Path, resume_state: Mapping[str, Any] | None, start_iter: int):
        import wandb

        log_cfg = cfg.logging
        directory = os.environ.get("WANDB_DIR") or str(output_dir)
        Path(directory).mkdir(parents=True, exist_ok=True)
        config = flatten_config(cfg)
        if start_iter:
            config["resumed_from_iteration"] = start_iter
            previous = (resume_state or {}).get("wandb_run_id")
            if previous:
                config["resumed_from_wandb_run"] = previous
        try:
            self.run = wandb.init(
                project=log_cfg.experiment,
                entity=log_cfg.wandb_entity or None,
                name=log_cfg.run_name or Path(cfg.output_dir).resolve().name,
                config=config,
                dir=directory,
                mode=log_cfg.wandb_mode or None,
                # detkit writes its own log.txt: W&B must not wrap the console.
                settings=wandb.Settings(console="off", quiet=True),
            )
        except Exception as exc:  # noqa: BLE001 - no login, no network, bad entity: the user's to fix
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"logging.trackers lists wandb, and W&B cannot start a run: {first}. Log in (wandb login) or set "
                "logging.wandb_mode=offline (no network; wandb sync uploads later)"
            ) from None
        logger.info("W&B: run %s (%s), files in %s", self.run.id, self.run.name, self.run.dir)

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_summary(self, values: Mapping[str, Any], step: int) -> None:
        self.run.summary.update({k: v for k, v in values.items() if v is not None})

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def state(self) -> dict[str, Any]:
        return {"wandb_run_id": self.run.id}


_RUNS = {"mlflow": MLflowRun, "wandb": WandbRun}


class Tracking:
    """The MLflow / W&B runs `cfg.logging.trackers` selects, behind one interface (see the module
    docstring). With enabled=False (ranks other than 0) every method does nothing."""

    def __init__(self, cfg: Config, output_dir: str | Path, *, enabled: bool = True):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.names = [name for name in cfg.logging.trackers if name in _RUNS]
        check_tracker_packages(self.names)  # on every rank: all of them stop alike
        self.runs: list[Any] = []
        self._step = 0

    def start(self, resume_state: Mapping[str, Any] | None = None, start_iter: int = 0) -> None:
        """Open (or, MLflow on --resume, continue) a run in each tracker; logs the params."""
        if not self.enabled or self.runs:
            return
        for name in self.names:
            self.runs.append(_RUNS[name](self.cfg, self.output_dir, resume_state, start_iter))
        self._step = start_iter

    def _each(self, what: str, call) -> None:
        for run in list(self.runs):
            try:
                call(run)
            except Exception as exc:  # noqa: BLE001 - a tracker's failure must not end a days-long run
                logger.warning(
                    "%s failed to %s (%s: %s); it is dropped for the rest of this run, metrics.jsonl keeps every row",
                    run.name,
                    what,
                    type(exc).__name__,
                    exc,
                )
                self.runs.remove(run)

    def log_metrics(self, step: int, values: Mapping[str, Any]) -> None:
        """One metrics.jsonl row (its numbers) at `step` = the iteration."""
        numbers = _numeric(values)
        if self.runs and numbers:
            self._step = max(self._step, step)
            self._each("log metrics", lambda run: run.log_metrics(step, numbers))

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """End-of-run values: numbers as metrics at the last step (MLflow) / summary (W&B), text as tags."""
        self._each("log the summary", lambda run: run.log_summary(values, self._step))

    def finish(self, status: str = "FINISHED") -> None:
        """End every run: FINISHED, FAILED or KILLED (preempted; --resume continues it)."""
        runs, self.runs = self.runs, []
        for run in runs:
            try:
                run.finish(status)
            except Exception as exc:  # noqa: BLE001 - the run has ended either way
                logger.warning("%s failed to close its run: %s", run.name, exc)

    def state_dict(self) -> dict[str, Any]:
        """The run ids, for the checkpoint (an MLflow --resume continues that run)."""
        state: dict[str, Any] = {}
        for run in self.runs:
            state.update(run.state())
        return state
