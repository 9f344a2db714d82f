"""The training progress line and the small statistics behind it.

    iter 120/2000  total_loss 0.8123  loss_cls 0.301  loss_box_reg 0.288  loss_rpn_cls 0.101
    loss_rpn_loc 0.122  lr 0.0200  time 0.412 s/it  data 0.004 s  eta 0:12:54  max_mem 1543M

(one line in the log). Timing values are medians over the last log window so one slow iteration
(a checkpoint, an evaluation) does not swing the ETA.
"""

from __future__ import annotations

import datetime
import resource
import sys
from collections import deque
from collections.abc import Mapping

import torch


class WindowedValue:
    """The last `window` values of one quantity, with their median and mean."""

    def __init__(self, window: int = 20):
        self.values: deque[float] = deque(maxlen=max(window, 1))

    def add(self, value: float) -> None:
        self.values.append(float(value))

    def median(self) -> float:
        if not self.values:
            return float("nan")
        ordered = sorted(self.values)
        return ordered[len(ordered) // 2]

    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")


def format_eta(seconds: float) -> str:
    """Seconds -> "H:MM:SS" (with days when long), e.g. 93784 -> "1 day, 2:03:04"."""
    if seconds != seconds or seconds < 0:  # nan before the first timing
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA allocator peak on a GPU, max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return usage / 2**20 if sys.platform == "darwin" else usage / 2**10


def format_progress(
    iteration: int,
    max_iter: int,
    losses: Mapping[str, float],
    *,
    lr: float,
    time: float | None,
    data_time: float | None,
    eta_seconds: float | None,
    max_mem_mb: float | None,
) -> str:
    """One progress line: iteration, total and per-term losses, lr, s/iter, data time, ETA, memory."""
    parts = [f"iter {iteration}/{max_iter}"]
    if "total_loss" in losses:
        parts.append(f"total_loss {losses['total_loss']:.4f}")
    parts += [f"{k} {v:.4f}" for k, v in losses.items() if k != "total_loss"]
    parts.append(f"lr {lr:.5g}")
    if time is not None:
        parts.append(f"time {time:.3f} s/it")
    if data_time is not None:
        parts.append(f"data {data_time:.3f} s")
    if eta_seconds is not None:
        parts.append(f"eta {format_eta(eta_seconds)}")
    if max_mem_mb is not None:
        parts.append(f"max_mem {max_mem_mb:.0f}M")
    return "  ".join(parts)
