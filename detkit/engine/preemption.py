"""Preemption: a signal (SIGTERM, SLURM's SIGUSR1 warning) turns into a checkpoint and a clean exit.

    with PreemptionWatcher(cfg.solver.preempt_signals) as watcher:
        ...                       # the training loop reads watcher.requested once per iteration

The handler only sets a flag: the loop decides where to stop (after the step, the evaluation or the
checkpoint write in progress, never inside one), makes every rank agree on the iteration, writes a
checkpoint of it and raises `TrainingPreempted`; the training command exits with
PREEMPTED_EXIT_STATUS. A second signal while that is under way ends the process at once with the
signal's default action (SIGTERM: killed, exit status 143 in a shell); the atomic checkpoint writes
leave no half-written file under a checkpoint's name.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from detkit.errors import ConfigError

logger = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": the run stopped on a
# signal after saving a checkpoint of its last iteration; `--resume` continues it.
PREEMPTED_EXIT_STATUS = 75


class TrainingPreempted(Exception):
    """Training stopped on a preemption signal after saving `checkpoint` at `iteration`."""

    def __init__(self, iteration: int, checkpoint: str | None, signal_name: str):
        self.iteration, self.checkpoint, self.signal_name = iteration, checkpoint, signal_name
        super().__init__(f"preempted at iteration {iteration} ({signal_name}), checkpoint {checkpoint}")


def parse_signals(names: Sequence[str], key: str = "solver.preempt_signals") -> list[signal.Signals]:
    """["SIGTERM", "USR1"] -> [Signals.SIGTERM, Signals.SIGUSR1]; ConfigError for unknown names."""
    out = []
    for name in names:
        full = str(name).upper() if str(name).upper().startswith("SIG") else f"SIG{str(name).upper()}"
        sig = getattr(signal.Signals, full, None)
        if sig is None or sig in (signal.SIGKILL, getattr(signal, "SIGSTOP", None)):
            raise ConfigError(
                f"{key}: {name!r} is not a signal that can be caught; use names such as SIGTERM, SIGUSR1, SIGUSR2, SIGINT "
                "or [] to turn preemption handling off"
            )
        out.append(sig)
    return out


class PreemptionWatcher:
    """Context manager that installs flag-setting handlers for `signals` and restores the old ones.

    requested: a handled signal arrived (this process only; the trainer shares it with the other
    ranks). Handlers can only be installed from the main thread; elsewhere (a notebook's worker
    thread) the watcher stays inactive and says so in the log.
    """

    def __init__(self, signals: Sequence[str]):
        self.signals = parse_signals(signals)
        self.requested = False
        self.signal_name = ""
        # What signal.signal returned: a callable, SIG_DFL / SIG_IGN (ints), or None (set from C).
        self._previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}

    def _handle(self, signum: int, frame) -> None:
        # No logging here: a handler may run in the middle of a log call of the same thread.
        if self.requested:  # the second signal: do what it would have done without us, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> PreemptionWatcher:
        if self.signals and threading.current_thread() is not threading.main_thread():
            logger.warning(
                "not in the main thread: %s will not checkpoint before stopping", "/".join(s.name for s in self.signals)
            )
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
