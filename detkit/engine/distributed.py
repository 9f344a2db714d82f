"""Multi-process helpers for `torchrun` (single or multi node).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process;
`init_distributed` reads them and joins the process group (NCCL on GPUs, gloo on CPU). Without them
(a plain `python tools/train.py`) everything runs as rank 0 of 1 and the helpers below are no-ops.
Only rank 0 writes files and logs at INFO level.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from detkit.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer (it is set by torchrun)") from None


def dist_info_from_env() -> DistInfo:
    """Rank, world size and local rank from the torchrun environment (defaults: 0, 1, 0)."""
    return DistInfo(
        rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1), local_rank=_env_int("LOCAL_RANK", 0)
    )


def init_distributed(device_type: str, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group described by the torchrun env vars (if WORLD_SIZE > 1).

    device_type "cuda": NCCL, and this process uses GPU `LOCAL_RANK`; "cpu": gloo.
    Calling it again in an initialised process returns the same info.
    """
    info = dist_info_from_env()
    if not info.distributed:
        return info
    if device_type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={info.local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(info.local_rank)
    if dist.is_initialized():
        return info
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ConfigError(
                f"WORLD_SIZE={info.world_size} but {name} is not set: start multi-process runs with torchrun"
            )
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device_type == "cuda":
        kwargs["device_id"] = torch.device("cuda", info.local_rank)
    dist.init_process_group(
        backend=backend,
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        **kwargs,
    )
    logger.info(
        "process group: backend %s, rank %d of %d (local rank %d)", backend, info.rank, info.world_size, info.local_rank
    )
    return info


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist() and get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """One `obj` per rank, on every rank ([obj] without a process group)."""
    if not is_dist() or get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_dist() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks (returns a new tensor; the input is untouched)."""
    if not is_dist() or get_world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def destroy() -> None:
    if is_dist():
        dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself): for its state dict,
    and at test time, where DDP's forward would broadcast buffers for nothing."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
