"""The training loop: SGD + warmup schedule, AMP, DDP, checkpoints, exact resume, logging, evaluation.

    trainer = Trainer(cfg)            # builds model, optimizer, schedule, loader on this rank
    trainer.resume_or_load(resume=True)
    summary = trainer.train()

One iteration (k = 1..max_iter, as logged; `self.iteration` counts completed iterations):
    batch = next(loader)                        # its own RNG use is isolated, see `_next_batch`
    losses = model(images, targets)             # under autocast when solver.amp is bf16/fp16
    scaler.scale(sum(losses)).backward()        # DDP all-reduces gradients here
    loss values -> host (one sync; averaged over ranks) -> stop if any is non-finite
    clip (optional) -> optimizer.step() -> scheduler.step()
    every log_period: progress line + metrics.jsonl row; every checkpoint_period: checkpoint;
    every test.eval_period (and at the end): evaluation, before that iteration's checkpoint; it keeps
    model_best.pth and may stop the run early (detkit.engine.best); rows also go to MLflow / W&B
    (detkit.engine.tracking, logging.trackers)

Exact resume: a checkpoint holds model, optimizer, scaler, iteration, every rank's python/numpy/
torch/CUDA RNG states and the data position; the loader restarts at that position
(`build_train_loader(start_iter=...)` is deterministic) and the RNG states are restored right before
the first resumed step, so on CPU a resumed run repeats the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detkit.config import Config, config_to_dict, dump_config
from detkit.engine import distributed as dist
from detkit.engine.best import BEST_NAME, BestModelTracker, check_metric_name, evaluation_metric_names
from detkit.engine.checkpoint import (
    FINAL_NAME,
    Checkpointer,
    capture_rng_state,
    checkpoint_name,
    describe_write_error,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from detkit.engine.distributed import unwrap
from detkit.engine.lr_schedule import build_lr_scheduler, build_optimizer
from detkit.engine.preemption import PreemptionWatcher, TrainingPreempted, parse_signals
from detkit.engine.tracking import Tracking
from detkit.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from detkit.utils.env import AmpChoice, configure_backends, resolve_device, seed_all, select_amp
from detkit.utils.files import atomic_write
from detkit.utils.logging import WindowedValue, format_progress, peak_memory_mb
from detkit.utils.metrics import MetricsWriter

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
CLASSES_FILE = "classes.json"  # label -> category id -> name of the run


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def total_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm of all gradients together, as a 0-d tensor (no host sync); 0 when there are none."""
    if not grads:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def move_targets(targets: Sequence[dict], device: torch.device, non_blocking: bool) -> list[dict]:
    return [
        {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets
    ]


@contextlib.contextmanager
def isolated_rng(cuda: bool = False):
    """Run a block without disturbing the global python/numpy/torch(/CUDA) random streams.

    Training losses depend on those streams (the RPN and RoI samplers draw from torch's), so work
    that happens in one run but not in another (an evaluation, a loader's first `next()` creating
    its iterator) must leave them as it found them for a resumed run to match an uninterrupted one.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# Keys a resumed run may change without changing what it trains: where it writes, how often it logs,
# saves and evaluates, how it evaluates, how the loader is run, and the initial weights (a resumed
# run takes every tensor from its checkpoint). Prefixes end with ".". Any other change needs
# --accept-config-changes.
RESUME_HARMLESS = (
    "output_dir",
    "device",
    "cudnn_benchmark",
    "model.compile",
    "model.weights",
    "model.weights_format",
    "model.backbone.weights",
    "model.backbone.weights_format",
    "solver.log_period",
    "solver.checkpoint_period",
    "solver.max_to_keep",
    "solver.preempt_signals",
    "test.",
    "logging.",
    "data.test",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"solver.base_lr": 0.02, ...}: nested dicts become dotted keys; lists stay whole values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def config_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of every key that differs, sorted by key.
    Both are `config_to_dict` trees; tuples and lists compare equal (a checkpoint stores lists)."""
    old, new = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
    missing = "(not set)"  # a key one of the two configs does not have (another detkit version)
    return [
        (k, old.get(k, missing), new.get(k, missing))
        for k in sorted(set(old) | set(new))
        if old.get(k, missing) != new.get(k, missing)
    ]


def is_harmless_on_resume(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in RESUME_HARMLESS)


def _dataset_info(cfg: Config, split: str):
    """(class_names, category_ids, ann_file or None) from the data package; empty when unknown."""
    from detkit.data import get_dataset_info

    info = get_dataset_info(cfg, split)
    return list(info.class_names), [int(c) for c in info.category_ids], getattr(info, "ann_file", None)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Trains one detector per process group; every rank builds one and calls `train()`.

    cfg: the resolved config. model / train_loader_fn: optional replacements (tests, custom
    models): `train_loader_fn(start_iter)` must return an iterable of (images, targets, metas)
    batches like `detkit.data.build_train_loader`. hooks: callables run as hook(trainer) after
    every iteration (after logging, checkpointing and evaluation).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        model: nn.Module | None = None,
        train_loader_fn: Callable[[int], Iterable] | None = None,
        hooks: Sequence[Callable[[Trainer], None]] = (),
        load_weights: bool = True,
    ):
        self.cfg = cfg
        solver = cfg.solver
        env = dist.dist_info_from_env()
        if solver.ims_per_batch % env.world_size != 0:
            raise ConfigError(
                f"solver.ims_per_batch={solver.ims_per_batch} is not divisible by the {env.world_size} "
                "processes; use a multiple of the number of GPUs"
            )
        self.device = resolve_device(cfg.device, env.local_rank)
        self.dist = dist.init_distributed(self.device.type)
        configure_backends(self.device, cfg.cudnn_benchmark, cfg.allow_tf32)
        seed_all(cfg.seed + self.dist.rank)
        self.amp: AmpChoice = select_amp(solver.amp, self.device)
        self.output_dir = Path(cfg.output_dir)
        self.is_main = self.dist.is_main
        # MLflow / W&B: a missing package stops every rank here, before the model is built.
        self.tracking = Tracking(cfg, self.output_dir, enabled=self.is_main)
        self._tracking_resume_state: dict | None = None

        if model is None:
            from detkit.modeling import build_model, check_initialisation

            if load_weights:  # (a resumed run takes every tensor from its checkpoint)
                check_initialisation(cfg)
            model = build_model(cfg, load_weights=load_weights)
        model.to(self.device)
        self.optimizer = build_optimizer(model, solver)
        self.scheduler = build_lr_scheduler(self.optimizer, solver)
        # Disabled unless fp16: then scale()/step()/update() pass straight through.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp.use_scaler)
        if self.dist.distributed:
            model = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # Frozen BN needs no buffer sync; SyncBN syncs its own statistics.
                broadcast_buffers=False,
                gradient_as_bucket_view=True,
            )
        self.model = model
        self._train_loader_fn = train_loader_fn
        self.hooks = list(hooks)

        self.checkpointer = Checkpointer(self.output_dir, max_to_keep=solver.max_to_keep, enabled=self.is_main)
        self.metrics = MetricsWriter(
            self.output_dir,
            enabled=self.is_main,
            tensorboard="tensorboard" in cfg.logging.trackers,
            sinks=[self.tracking],
        )
        self.iteration = 0  # completed iterations
        self.start_iter = 0
        self._rng_to_restore: dict | None = None
        self.class_names, self.category_ids = self._class_info()
        self._check_test_data()
        # model_best.pth and early stopping, from the periodic evaluations (test.eval_period > 0).
        self.best = BestModelTracker.from_config(cfg.test)
        if self.best.enabled and cfg.test.eval_period > 0 and cfg.data.test:
            names = evaluation_metric_names(_dataset_info(cfg, "test")[0], cfg.test.metric)
            check_metric_name(cfg.test.best_metric, names)
        self.last_losses: dict[str, float] = {}
        self.eval_results: dict[str, Any] = {}
        parse_signals(solver.preempt_signals)  # a bad name stops the run now, not at train()
        # Preemption: `preemption` is the signal watcher while train() runs (None: no check);
        # `preempt_agreed` is set by run_step when any rank has seen a signal. On several
        # processes the flag rides in the step's loss all-reduce as one more element, taken from
        # this preallocated device tensor (filled once when a signal comes: no host->device copy
        # and no extra sync per iteration).
        self.preemption: PreemptionWatcher | None = None
        self.preempt_agreed = False
        self._preempt_flag = torch.zeros(1, device=self.device) if self.dist.distributed else None
        self._preempt_flag_filled = False

    # ---------------------------------------------------------------- set-up ------------------

    def _class_info(self) -> tuple[list[str], list[int]]:
        if not self.cfg.data.train:
            return [], []
        names, ids, _ = _dataset_info(self.cfg, "train")
        return names, ids

    def _write_classes(self) -> None:
        """output_dir/classes.json: the label -> category id -> class name table of this run (also in
        every checkpoint), so predictions and detections can be read with the user's names."""
        if not self.class_names:
            return
        table = [
            {"label": label, "category_id": cid, "name": name}
            for label, (cid, name) in enumerate(zip(self.category_ids, self.class_names))
        ]
        text = json.dumps(table, indent=2) + "\n"
        atomic_write(self.output_dir / CLASSES_FILE, lambda f: f.write(text), mode="w")

    def _check_test_data(self) -> None:
        """Read the test annotations now, as the evaluation will (the test loader's and the
        evaluator's checks, which follow the same rules), so that a bad file stops the run before
        its first iteration rather than after its last one."""
        if not self.cfg.data.test:
            return
        from detkit.engine.eval_common import load_ground_truth
        from detkit.engine.evaluator import build_evaluator

        names, ids, ann_file = _dataset_info(self.cfg, "test")
        if ann_file and self.cfg.test.metric == "coco":
            load_ground_truth(ann_file)
        elif ann_file:  # the VOC evaluator also checks the "difficult" values
            build_evaluator(ann_file, self.cfg.test.metric)
        # The model predicts the training categories: a test set with other ids or names would be
        # scored against the wrong classes (AP near 0 and no error), so it stops here, as in check-data.
        from detkit.data.check import SAME_CATEGORIES, category_table_difference

        diff = category_table_difference(list(zip(self.category_ids, self.class_names)), list(zip(ids, names)))
        if self.category_ids and diff:
            raise DataError(f"the test data ({ann_file}): {diff} from those of the training data; {SAME_CATEGORIES}")

    def resume_or_load(self, resume: bool, accept_config_changes: bool = False) -> int:
        """With resume=True and a `last_checkpoint` in output_dir, restore everything from it.

        The checkpoint's config is compared with this one first (`check_resumed_config`).
        Returns the iteration training starts from (0 for a fresh run).
        """
        path = self.checkpointer.last_checkpoint() if resume and self.is_main else None
        path = dist.broadcast_object(str(path) if path else None)
        if path is None:
            if resume:
                logger.info("--resume: no checkpoint in %s, starting from iteration 0", self.output_dir)
                self.metrics.truncate_after(0)  # rows of an attempt that died before its first checkpoint
            return 0
        self.load_training_state(path, accept_config_changes=accept_config_changes)
        return self.start_iter

    def load_training_state(self, path: str | Path, accept_config_changes: bool = False) -> None:
        """Restore model, optimizer, scaler, iteration and (at the first step) RNG from a checkpoint.

        The lr schedule has no state of its own to restore: it is a function of the iteration and of
        the current config's solver keys (which `check_resumed_config` guards).
        """
        if not Path(path).is_file():
            raise CheckpointError(f"{path} is not visible on rank {self.dist.rank}: resuming needs a shared output_dir")
        state = load_checkpoint(path, map_location="cpu")
        missing = [k for k in ("model", "optimizer", "iteration") if k not in state]
        if missing:
            raise CheckpointError(
                f"{path} is not a training checkpoint (no {', '.join(missing)}); use model.weights=... to start from it"
            )
        self.check_resumed_config(state, path, accept=accept_config_changes)
        try:
            unwrap(self.model).load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not fit the model of this config: {exc}") from None
        self._load_optimizer(state["optimizer"], path)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = self.start_iter = int(state["iteration"])
        # The schedule is a function of the iteration: the current config's schedule applies from here.
        self.scheduler.last_epoch = self.start_iter
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
            group["lr"] = lr
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

        rng = state.get("rng") or []
        if len(rng) == self.dist.world_size:
            self._rng_to_restore = rng[self.dist.rank]
        else:
            logger.warning(
                "%s holds RNG states of %d processes, this run has %d: sampling will differ from an uninterrupted run",
                path,
                len(rng),
                self.dist.world_size,
            )
        self.metrics.truncate_after(self.start_iter)
        self.best.load_state_dict(state.get("best"))
        self._tracking_resume_state = state.get("tracking")
        logger.info("resumed from %s at iteration %d", path, self.start_iter)

    def check_resumed_config(self, state: dict, path: str | Path, accept: bool = False) -> None:
        """Compare the checkpoint's config and process count with this run's.

        Changes of RESUME_HARMLESS keys are logged. Any other change (the model, the data, the
        solver, the seed, the number of processes, which sets the images per process) would make the
        resumed run differ from the one that was started: ConfigError naming each key with both
        values, unless `accept` (--accept-config-changes), which logs them as a warning instead.
        """
        saved = state.get("config")
        if not isinstance(saved, dict):
            logger.warning("%s holds no config: the resumed run's config cannot be compared with it", path)
            return
        changes = config_changes(saved, config_to_dict(self.cfg))
        saved_world = int((state.get("data") or {}).get("world_size", self.dist.world_size))
        if saved_world != self.dist.world_size:
            per_rank = f"images per process {self.cfg.solver.ims_per_batch // saved_world} -> {self.cfg.solver.ims_per_batch // self.dist.world_size}"
            changes.append((f"processes (world size; {per_rank})", saved_world, self.dist.world_size))

        def shown(items):
            return ", ".join(f"{k} {v!r} -> {w!r}" for k, v, w in items)

        harmless = [c for c in changes if is_harmless_on_resume(c[0])]
        altering = [c for c in changes if not is_harmless_on_resume(c[0])]
        if harmless:
            logger.info("--resume: changed keys that do not alter the training: %s", shown(harmless))
        if not altering:
            return
        if not accept:
            raise ConfigError(
                f"--resume: {path} was trained with other settings, and these change the run: {shown(altering)}. "
                "Resume with the checkpoint's values (its config.yaml), or add --accept-config-changes to continue "
                "with the new ones (the result then differs from an uninterrupted run)"
            )
        logger.warning("--resume --accept-config-changes: continuing with %s", shown(altering))

    def _load_optimizer(self, saved: dict, path: str | Path) -> None:
        # Keep the config's hyper-parameters (a resumed run may change weight decay, momentum or
        # base_lr); take only the per-parameter state (momentum buffers) from the checkpoint.
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(saved)
        except ValueError as exc:
            raise CheckpointError(
                f"{path}: the optimizer state does not fit this model's parameter groups ({exc}); were "
                "solver.bias_lr_factor / weight_decay_* or model.backbone.freeze_at changed?"
            ) from None
        for group, hparams in zip(self.optimizer.param_groups, current):
            group.update(hparams)

    # ---------------------------------------------------------------- checkpoints -------------

    def checkpoint_state(self) -> dict:
        """Everything needed to continue exactly; collective (every rank must call it)."""
        rng = dist.all_gather_object(capture_rng_state())
        return {
            "model": unwrap(self.model).state_dict(),
            "config": config_to_dict(self.cfg),
            "class_names": list(self.class_names),
            "category_ids": list(self.category_ids),
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng,
            "data": {
                "start_iter": self.iteration,
                "world_size": self.dist.world_size,
                "ims_per_batch": self.cfg.solver.ims_per_batch,
                "seed": self.cfg.seed,
            },
            # The best value so far and the early-stopping count, and the tracker run ids: --resume continues them.
            "best": self.best.state_dict(),
            "tracking": self.tracking.state_dict(),
        }

    def save_checkpoint(self, name: str) -> Path | None:
        state = self.checkpoint_state()
        return self.checkpointer.save(name, state) if self.is_main else None

    # ---------------------------------------------------------------- the loop ----------------

    def build_train_loader(self, start_iter: int) -> Iterable:
        if self._train_loader_fn is not None:
            return self._train_loader_fn(start_iter)
        from detkit.data import build_train_loader

        return build_train_loader(self.cfg, rank=self.dist.rank, world_size=self.dist.world_size, start_iter=start_iter)

    def _next_batch(self, batches: Iterator):
        with isolated_rng():
            return next(batches)

    def train(self) -> dict:
        """Run iterations start_iter+1 .. max_iter; returns (and writes) the final summary."""
        cfg, solver = self.cfg, self.cfg.solver
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.output_dir / "config.yaml")
            self._write_classes()
        logger.info(
            "training on %s x%d, amp %s, %d images/iteration (%d per process), iterations %d..%d",
            self.device,
            self.dist.world_size,
            self.amp.name,
            solver.ims_per_batch,
            solver.ims_per_batch // self.dist.world_size,
            self.start_iter + 1,
            solver.max_iter,
        )
        self.model.train()
        # The handlers go in before the loader's workers start, so that workers inherit them: a
        # signal sent to the whole process group (SLURM, a terminal) leaves them alive until the
        # main process has saved and shuts them down.
        with PreemptionWatcher(solver.preempt_signals) as self.preemption:
            try:
                self.tracking.start(self._tracking_resume_state, self.start_iter)
                summary = self._train_loop()
            except TrainingPreempted:
                self.tracking.finish("KILLED")  # --resume continues the MLflow run
                raise
            except Exception as exc:
                self.tracking.finish("FAILED")
                # One rank's exception stops every rank: published here for the others, which stop
                # with PeerFailedError (detkit.engine.distributed); a no-op with one process.
                failure = dist.report_failure(exc)
                if failure is exc:
                    raise
                raise failure from None
            except BaseException:
                self.tracking.finish("FAILED")
                raise
            finally:
                self.preemption = None
        self.tracking.finish("FINISHED")
        return summary

    def _train_loop(self) -> dict:
        solver = self.cfg.solver
        batches = iter(self.build_train_loader(self.start_iter))
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

        window = max(solver.log_period, 20)
        iter_times, data_times = WindowedValue(window), WindowedValue(window)
        loss_sums: dict[str, float] = {}
        loss_count = 0
        train_start = time.perf_counter()
        if self.best.stopped_at is not None:
            logger.info("this run stopped early at iteration %d: nothing to continue", self.best.stopped_at)
        while self.iteration < solver.max_iter and self.best.stopped_at is None:
            t0 = time.perf_counter()
            batch = self._next_batch(batches)
            data_time = time.perf_counter() - t0
            lr = self.current_lr()
            losses = self.run_step(batch)
            self.iteration += 1
            iter_times.add(time.perf_counter() - t0)
            data_times.add(data_time)
            for k, v in losses.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + v
            loss_count += 1

            it, last = self.iteration, self.iteration == solver.max_iter
            if it % solver.log_period == 0 or last:
                self.last_losses = {k: v / loss_count for k, v in loss_sums.items()}
                self._log(self.last_losses, lr, iter_times, data_times)
                loss_sums, loss_count = {}, 0
            # The evaluation comes before this iteration's checkpoint, so that the checkpoint holds
            # its best value and early-stopping count (a resumed run does not evaluate it again).
            stop_early = False
            if self.cfg.test.eval_period > 0 and it % self.cfg.test.eval_period == 0 and not last:
                self.evaluate()
                stop_early = self.best.stopped_at is not None  # agreed: rank 0's decision, broadcast
                # A signal during the evaluation (minutes on a large test set) is honoured now
                # rather than after one more step: one small collective per evaluation.
                self.preempt_agreed = self.preempt_agreed or self._any_rank_preempted()
            saved: str | None = None  # the name of this iteration's checkpoint, if one was written
            if last or stop_early:
                saved = FINAL_NAME
            elif solver.checkpoint_period > 0 and it % solver.checkpoint_period == 0:
                saved = checkpoint_name(it)
            if saved is not None:
                self.save_checkpoint(saved)
            if stop_early and self.is_main:
                logger.info("%s; final checkpoint %s", self.best.stop_reason(), self.output_dir / FINAL_NAME)
            for hook in self.hooks:
                hook(self)
            if self.preempt_agreed:  # every rank gets here at the same iteration
                self._stop_preempted(saved)

        wall = time.perf_counter() - train_start
        if self.cfg.data.test and self.best.stopped_at is None:  # (an early stop has just evaluated)
            self.evaluate(final=True)
        summary = self._summary(wall)
        self.metrics.close()
        return summary

    def run_step(self, batch) -> dict[str, float]:
        """One optimizer step on `batch`; returns total_loss and each term (averaged over ranks)."""
        images, targets, _ = batch
        non_blocking = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=non_blocking)
        targets = move_targets(targets, self.device, non_blocking)
        with torch.autocast(self.device.type, dtype=self.amp.dtype, enabled=self.amp.dtype is not None):
            loss_dict = self.model(images, targets)
        names = sorted(loss_dict)
        total = sum(loss_dict[k].float() for k in names)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()

        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.scaler.unscale_(self.optimizer)  # no-op without fp16's scaler
        if self.cfg.solver.clip_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.solver.clip_grad_norm)
        else:
            grad_norm = total_norm([p.grad for p in params], total.device)

        # The one host-device sync of the step: every rank must agree on whether to step, and the
        # log needs the values. After backward, so the GPU queue is full while we wait.
        stacked = torch.stack([total.detach()] + [loss_dict[k].detach().float() for k in names] + [grad_norm.float()])
        values: list[float]  # total_loss, each term, grad norm (averaged over ranks)
        if self._preempt_flag is not None and self.preemption is not None:
            # Several processes: the preemption flag is one more element of this all-reduce.
            if self.preemption.requested and not self._preempt_flag_filled:
                self._preempt_flag.fill_(1.0)  # once per run, queued like any kernel
                self._preempt_flag_filled = True
            values = dist.all_reduce_mean(torch.cat([stacked, self._preempt_flag])).tolist()
            self.preempt_agreed = values.pop() > 0
        else:
            values = dist.all_reduce_mean(stacked).tolist()
            # One process (or a group without the check): the local flag, no collective.
            self.preempt_agreed = (
                self.preemption is not None and self.preemption.requested and not self.dist.distributed
            )
        losses = dict(zip(["total_loss"] + names, values[:-1]))
        if not all(math.isfinite(v) for v in values[:-1]):
            self._stop_non_finite(losses)
        # A finite loss can still give NaN/inf gradients (e.g. 0 * inf in a masked loss); a step on
        # them would write NaN into every weight. With fp16's scaler an inf norm is expected now
        # and then: the scaler skips that step and lowers its scale.
        if not self.amp.use_scaler and not math.isfinite(values[-1]):
            self._stop_non_finite(losses, grad_norm=values[-1])

        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return losses

    def _any_rank_preempted(self) -> bool:
        """Whether any rank has seen a preemption signal (a collective on several processes)."""
        local = self.preemption is not None and self.preemption.requested
        if self._preempt_flag is None:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        return dist.all_reduce_mean(flag).item() > 0

    def _stop_preempted(self, saved: str | None) -> None:
        """Save this iteration (unless `saved`, the checkpoint name written at this iteration), log one
        line and raise TrainingPreempted.

        Every rank calls this at the same iteration (the flag was agreed in a collective). The
        barrier keeps every rank alive until rank 0's atomic write is on disk: a launcher that
        tears the group down when the first process exits cannot cut it short.
        """
        if saved is None:
            saved = checkpoint_name(self.iteration)
            self.save_checkpoint(saved)
        dist.barrier()
        saved = str(self.output_dir / saved)
        name = (
            self.preemption.signal_name
            if self.preemption is not None and self.preemption.requested
            else "another rank's signal"
        )
        if self.is_main:
            logger.info(
                "preempted at iteration %d, checkpoint %s (%s); continue with --resume", self.iteration, saved, name
            )
        self.metrics.close()
        raise TrainingPreempted(self.iteration, saved, name)

    def current_lr(self) -> float:
        """The lr of the next step (base_lr times the schedule; bias groups may scale it)."""
        return self.cfg.solver.base_lr * self.scheduler.factor(self.iteration)

    def _stop_non_finite(self, losses: dict[str, float], grad_norm: float | None = None) -> None:
        """Save the last good state (parameters were not updated by this step) and raise.

        The state is saved only if every weight is finite; otherwise the message names the newest
        checkpoint on disk, so that a NaN model is never offered as the one to resume from.
        """
        bad_iter = self.iteration + 1
        saved = ""
        if self.iteration > 0:
            model = unwrap(self.model)
            weights_finite = all(
                bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()
            )
            if weights_finite:
                path = self.save_checkpoint(checkpoint_name(self.iteration))
                saved = f" The last good state (iteration {self.iteration}) is saved as {path or self.output_dir / checkpoint_name(self.iteration)}."
            else:
                previous = self.checkpointer.last_checkpoint()
                saved = (
                    f" The weights were already non-finite at iteration {self.iteration}, so they are not saved; "
                    + (f"the newest checkpoint is {previous}." if previous else "there is no earlier checkpoint.")
                )
            dist.barrier()
        terms = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        what = f"non-finite loss at iteration {bad_iter}: {terms}"
        if grad_norm is not None:
            what = f"non-finite gradient norm ({grad_norm}) at iteration {bad_iter} with finite losses: {terms}"
        raise NonFiniteLossError(
            f"{what}.{saved} Lower solver.base_lr or set "
            "solver.clip_grad_norm (e.g. 1.0), check the data for degenerate boxes, then continue with --resume."
        )

    def _log(self, losses: dict[str, float], lr: float, iter_times: WindowedValue, data_times: WindowedValue) -> None:
        solver = self.cfg.solver
        seconds = iter_times.median()
        eta = seconds * (solver.max_iter - self.iteration)
        mem = peak_memory_mb(self.device)
        if self.is_main:
            logger.info(
                format_progress(
                    self.iteration,
                    solver.max_iter,
                    losses,
                    lr=lr,
                    time=seconds,
                    data_time=data_times.median(),
                    eta_seconds=eta,
                    max_mem_mb=mem,
                )
            )
        self.metrics.write(
            self.iteration,
            {
                **losses,
                "lr": lr,
                "time": seconds,
                "data_time": data_times.median(),
                "eta_seconds": eta,
                "max_mem_mb": mem,
            },
        )

    # ---------------------------------------------------------------- evaluation --------------

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        """Evaluation of the test set, `test.metric` (rank 0 gets the numbers; every rank must call).

        With test.eval_period > 0 the result also updates model_best.pth and the early-stopping
        count (`final`: the evaluation after the last iteration, which counts for the best model
        but cannot stop anything)."""
        if not self.cfg.data.test:
            return {}
        model = unwrap(self.model)
        with isolated_rng(cuda=self.device.type == "cuda"):
            results = evaluate_model(self.cfg, model, self.device, rank=self.dist.rank, world_size=self.dist.world_size)
        model.train()
        if self.is_main and results:
            flat = {k: v for k, v in results.items() if isinstance(v, (int, float))}
            self.metrics.write(self.iteration, flat)
        self.eval_results = results
        if self.cfg.test.eval_period > 0 and self.best.enabled:
            self._update_best(results, final)
        return results

    def _update_best(self, results: dict[str, Any], final: bool) -> None:
        """Rank 0 has the numbers and decides; every rank takes the decision (an early stop ends all
        ranks at the same iteration: one broadcast per evaluation). Rank 0 writes model_best.pth."""
        update = self.best.update(self.iteration, results, allow_stop=not final) if self.is_main else None
        state, update = dist.broadcast_object((self.best.state_dict(), update) if self.is_main else None)
        if not self.is_main:
            self.best.load_state_dict(state)
        if not (update.improved and self.is_main):
            return
        path = self.output_dir / BEST_NAME
        model = unwrap(self.model)
        record = self.best.record()
        best_state = {
            "model": model.state_dict(),
            "config": config_to_dict(self.cfg),
            "class_names": list(self.class_names),
            "category_ids": list(self.category_ids),
            "iteration": self.iteration,
            "best": record,
        }
        try:
            save_checkpoint(best_state, path)
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(
                f"cannot write {path}: {describe_write_error(exc)}; the previous {BEST_NAME}, if any, is intact. "
                f"Free space in {self.output_dir}, then continue with --resume"
            ) from exc
        logger.info("saved %s: %s %.4g at iteration %d", path, record["metric"], record["value"], self.iteration)

    def _summary(self, wall_seconds: float) -> dict:
        done = self.iteration - self.start_iter
        summary: dict[str, Any] = {
            "iterations": self.iteration,
            "max_iter": self.cfg.solver.max_iter,
            "resumed_from": self.start_iter,
            "wall_time_s": round(wall_seconds, 2),
            "s_per_iter": round(wall_seconds / done, 4) if done else None,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "amp": self.amp.name,
            "final_losses": self.last_losses,
            "eval": {k: v for k, v in self.eval_results.items() if k != "per_class"},
            "checkpoint": str(self.output_dir / FINAL_NAME),
            "metrics": str(self.output_dir / "metrics.jsonl"),
        }
        best_path = self.output_dir / BEST_NAME
        if self.best.iteration is not None and self.cfg.test.eval_period > 0:
            summary["best"] = {**self.best.record(), "checkpoint": str(best_path)}
        if self.best.stopped_at is not None:
            summary["early_stopped"] = self.best.stop_reason()
        final: dict[str, Any] = {"final_checkpoint": summary["checkpoint"]}
        if "best" in summary:
            final.update(
                {
                    "best_checkpoint": str(best_path),
                    f"best/{self.best.metric}": self.best.value,
                    "best_iteration": self.best.iteration,
                }
            )
        self.tracking.log_summary(final)
        if self.is_main:
            (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            logger.info(
                "done: %d iterations in %.1f s (%s s/iter); final model %s",
                done,
                wall_seconds,
                summary["s_per_iter"],
                summary["checkpoint"],
            )
            if summary["eval"]:
                logger.info(
                    "evaluation: %s",
                    ", ".join(f"{k} {v:.2f}" for k, v in summary["eval"].items() if isinstance(v, (int, float))),
                )
        return summary


# --------------------------------------------------------------------------------------------
# Evaluation (shared by the periodic hook and --eval-only)
# --------------------------------------------------------------------------------------------


def evaluate_model(
    cfg: Config, model: nn.Module, device: torch.device, rank: int = 0, world_size: int = 1
) -> dict[str, Any]:
    """Evaluation of `model` on the first test dataset (`test.metric`), in `test.amp` precision.

    Returns on rank 0 (0..100; {} elsewhere):
      coco:          {"bbox/AP": ..., "bbox/AP50": ..., "bbox/AP-<class>": ..., "per_class": {...}}
      voc07 / voc12: {"bbox/AP": ..., "bbox/AP50": ..., "bbox/AP75": ..., "bbox/AP50-<class>": ..., "per_class": {...}}
    (a VOC per-class number is the AP at IoU 0.5, hence its name).
    """
    from detkit.data import build_test_loader
    from detkit.engine.evaluator import build_evaluator, inference_on_dataset

    _, category_ids, ann_file = _dataset_info(cfg, "test")
    loader = build_test_loader(cfg, rank=rank, world_size=world_size)
    model.eval()
    start = time.perf_counter()
    amp = select_amp(cfg.test.amp, device, key="test.amp")
    predictions = inference_on_dataset(model, loader, category_ids, device, amp_dtype=amp.dtype)
    if rank != 0:
        return {}
    metrics = build_evaluator(ann_file, cfg.test.metric, backend=cfg.test.eval_backend).evaluate(predictions)
    results: dict[str, Any] = {f"bbox/{k}": float(v) for k, v in metrics.items() if k != "per_class"}
    per_class_key = "AP" if cfg.test.metric == "coco" else "AP50"
    for name, ap in (metrics.get("per_class") or {}).items():
        results[f"bbox/{per_class_key}-{name}"] = float(ap)
    results["per_class"] = dict(metrics.get("per_class") or {})
    logger.info(
        "evaluation of %d detections in %.1f s: %s",
        len(predictions),
        time.perf_counter() - start,
        "  ".join(f"{k} {metrics[k]:.2f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in metrics),
    )
    return results
