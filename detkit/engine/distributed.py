"""Multi-process helpers for `torchrun` (single or multi node).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process;
`init_distributed` reads them and joins the process group (NCCL on GPUs, gloo on CPU). Without them
(a plain `python tools/train.py`) everything runs as rank 0 of 1 and the helpers below are no-ops.
Only rank 0 writes files and logs at INFO level.

One rank fails, every rank stops: `report_failure(exc)` (called where a rank's training raises)
publishes the exception's type and message in the process group's key-value store, and a watcher
thread on every rank polls that store. A collective cannot carry the news: when one rank raises, the
others may be in a different collective (DDP's gradient all-reduce, an evaluation's gather) or in
none. The other ranks stop with `PeerFailedError` naming the failed rank; on gloo their collective
breaks as soon as the failed process exits, and where it does not (NCCL waits for its timeout, 30
minutes by default) the watcher ends the process PEER_FAILED_GRACE_S after it saw the record.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from detkit.errors import ConfigError, PeerFailedError

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


def elastic_restart_count() -> int:
    """How many times torchrun (--max-restarts) has restarted this worker group (0 elsewhere)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


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
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # torchrun's store outlives a restart (--max-restarts), and with it the addresses the previous
    # attempt's ranks published: a rank of the new attempt could read a dead peer's address and fail
    # to connect ("Gloo connectFullMesh failed ... Connection refused"; seen with 2 CPU workers
    # whose restarts came up a few seconds apart). Each attempt works under its own prefix.
    store, _, _ = next(rendezvous("env://", rank=info.rank, world_size=info.world_size, timeout=timeout))
    store = dist.PrefixStore(f"detkit/attempt{elastic_restart_count()}/", store)  # type: ignore[attr-defined]
    dist.init_process_group(
        backend=backend, store=store, rank=info.rank, world_size=info.world_size, timeout=timeout, **kwargs
    )
    logger.info(
        "process group: backend %s, rank %d of %d (local rank %d)", backend, info.rank, info.world_size, info.local_rank
    )
    _start_failure_watch(info)
    return info


# --------------------------------------------------------------------------------------------
# One rank fails, all ranks stop (see the module docstring)
# --------------------------------------------------------------------------------------------

FAILURE_POLL_S = 0.5  # how often each rank's watcher reads the store: one small TCP request
# How long a rank that saw another rank's failure lets its main thread stop on its own (a collective
# that breaks, then a clean PeerFailedError) before the watcher ends the process. On gloo a rank that
# waits in DDP's gradient all-reduce is not released by the failed rank's exit: the failed process
# itself cannot finish exiting while a peer still waits on its connections, so this grace is what
# ends both (measured: ~5 s without the watcher, on 2 CPU processes).
PEER_FAILED_GRACE_S = 3.0
PEER_FAILED_EXIT_STATUS = 2  # the status of any other detkit error

_watch: FailureWatch | None = None


def _failure_key() -> str:
    # The group's store is already one per torchrun attempt (init_distributed); the attempt in the
    # key as well keeps a restarted group from reading the failure that ended the previous one
    # whatever store it is given.
    return f"detkit/failure/attempt{elastic_restart_count()}"


class FailureWatch:
    """Publishes this rank's failure in `store` and watches it for another rank's.

    A record is JSON [rank, exception type name, message]; the first failure of an attempt wins
    (compare_set), and every rank that reads it adds 1 to `<key>/seen`. The thread (a daemon) polls
    every `poll_s` seconds and, `grace_s` after it saw another rank's record, logs one line and ends
    the process with PEER_FAILED_EXIT_STATUS unless `stop()` came first.
    """

    def __init__(
        self,
        store: dist.Store,  # type: ignore[name-defined]  # (not in torch.distributed's __all__)
        rank: int,
        world_size: int,
        *,
        poll_s: float = FAILURE_POLL_S,
        grace_s: float = PEER_FAILED_GRACE_S,
    ):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.poll_s, self.grace_s = poll_s, grace_s
        self.key = _failure_key()
        self._peer: tuple[int, str, str] | None = None  # (rank, type name, message) once read
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the main thread and the watcher both read the record
        self._thread = threading.Thread(target=self._run, name="detkit-failure-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def peer_failure(self) -> tuple[int, str, str] | None:
        """(rank, exception type, message) of another rank's recorded failure, or None."""
        with self._lock:
            if self._peer is None and self.store.check([self.key]):
                rank, kind, message = json.loads(self.store.get(self.key))
                if rank != self.rank:
                    self._peer = (int(rank), str(kind), str(message))
                    self.store.add(self.key + "/seen", 1)
            return self._peer

    def report(self, exc: BaseException) -> PeerFailedError | None:
        """Publish `exc` as this rank's failure; PeerFailedError instead when another rank failed first
        (this rank's `exc` is then most likely its collective breaking on that rank's exit)."""
        self.stop()
        try:
            peer = self.peer_failure()
            if peer is None:
                record = json.dumps([self.rank, type(exc).__name__, str(exc)])
                stored = self.store.compare_set(self.key, "", record)
                if stored.decode() != record:  # another rank's record came in between
                    peer = self.peer_failure()
            if peer is not None:
                return PeerFailedError(*peer)
            self._wait_until_seen()
        except (RuntimeError, OSError, ValueError) as store_exc:  # the store is gone (DistStoreError)
            logger.debug("could not publish this rank's failure: %s", store_exc)
        return None

    def _wait_until_seen(self) -> None:
        # Rank 0 serves the store when the group was not started by torchrun (whose agent serves
        # it and outlives the workers): keep it up until the other ranks have read the record.
        if self.rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return
        deadline = time.monotonic() + self.grace_s
        while self.store.add(self.key + "/seen", 0) < self.world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                peer = self.peer_failure()
            except (RuntimeError, OSError, ValueError):  # the store went away: the group is ending
                return
            if peer is None:
                continue
            if self._stop.wait(self.grace_s):
                return  # the main thread stopped on its own
            log_peer_failure_to_files(*peer)
            logger.error(
                "rank %d failed with %s and this rank (%d) is still waiting for it, probably in a collective: "
                "ending this process; rank %d's error line says why",
                peer[0],
                peer[1],
                self.rank,
                peer[0],
            )
            for handler in logging.getLogger("detkit").handlers:
                handler.flush()
            os._exit(PEER_FAILED_EXIT_STATUS)


def log_peer_failure_to_files(rank: int, kind: str, message: str) -> None:
    """Write another rank's error message into this process's log files (rank 0's log.txt) only:
    on the console the failed rank has printed it already, and the user should read it once."""
    record = logging.makeLogRecord(
        {
            "name": logger.name,
            "levelno": logging.ERROR,
            "levelname": "ERROR",
            "msg": "stopped: rank %d failed with %s: %s",
            "args": (rank, kind, message),
        }
    )
    for handler in logging.getLogger("detkit").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(record)


def _start_failure_watch(info: DistInfo) -> None:
    global _watch
    try:
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, ValueError) as exc:  # another torch's internals: run without the watch
        logger.warning("no failure watch across ranks (%s): a failing rank may leave the others waiting", exc)
        return
    _watch = FailureWatch(store, info.rank, info.world_size)
    _watch.start()


def report_failure(exc: BaseException) -> BaseException:
    """What a rank whose training raised `exc` should raise: `exc` itself, published for the other
    ranks, or PeerFailedError when another rank failed first. `exc` alone without a process group."""
    if _watch is None or isinstance(exc, PeerFailedError):
        return exc
    peer = _watch.report(exc)
    return exc if peer is None else peer


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
    global _watch
    if _watch is not None:
        _watch.stop()
        _watch = None
    if is_dist():
        dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself): for its state dict,
    and at test time, where DDP's forward would broadcast buffers for nothing."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
