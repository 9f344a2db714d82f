"""Training checkpoints: atomic writes, a `last_checkpoint` pointer, safe loading, RNG states.

A checkpoint is one `torch.save`d dict of plain containers, numbers, strings and tensors, so that
`torch.load(weights_only=True)` can read it without running any pickled code:

    {"model": state_dict, "config": config_to_dict(cfg), "class_names": [...], "category_ids": [...],
     "iteration": completed iterations,
     # training checkpoints add:
     "optimizer": ..., "scheduler": ..., "scaler": ... or None,
     "rng": [one `capture_rng_state()` per rank], "data": {"start_iter": ..., "world_size": ...}}

Files in the output dir: model_{iteration:07d}.pth (periodic, the newest `max_to_keep` kept),
model_final.pth (always kept) and `last_checkpoint`, a one-line text file naming the newest file;
the trainer adds model_best.pth (detkit.engine.best), which pruning never matches.
Every file is written to a temporary file in the same directory, flushed, fsynced and renamed over
its final name (detkit.utils.files.atomic_write), so a crash (or SIGKILL) at any moment leaves either
the old or the new complete file.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detkit.errors import CheckpointError
from detkit.utils.files import TEMP_PREFIX, atomic_write

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
FINAL_NAME = "model_final.pth"
_PERIODIC = re.compile(r"^model_(\d{7,})\.pth$")


def checkpoint_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pth"


def describe_write_error(exc: BaseException) -> str:
    """Why a write failed, in words, from the OSError in `exc`'s chain (torch.save wraps the
    OSError of a failed write in a RuntimeError): "the disk is full" for ENOSPC / EDQUOT."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    code = getattr(seen, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"the disk is full ({os.strerror(code)})"
    if code == errno.EFBIG:
        return f"the file size limit was reached ({os.strerror(code)}; see `ulimit -f`)"
    if code is not None:
        return f"{os.strerror(code)} (errno {code})"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """`torch.save(state)` to `path` atomically."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict with `torch.load(weights_only=True)` (no pickled code runs).

    Raises CheckpointError naming the file when it is missing, truncated or holds other objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds objects that weights_only loading refuses ({exc}); only checkpoints of plain "
            "containers and tensors are loaded. Re-save it as a state_dict, or use tools/convert_weights.py"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - bytes that are no checkpoint at all reach torch's legacy reader,
        # which fails with IndexError, ValueError, KeyError, ... depending on the bytes
        raise CheckpointError(
            f"{path} is not a checkpoint (neither a torch zip file nor a legacy pickle): {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (got {type(state).__name__})")
    return state


# --------------------------------------------------------------------------------------------
# RNG states as tensors and lists (weights_only-safe)
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """The python, numpy, torch and CUDA generator states of this process."""
    py_version, py_internal, py_gauss = random.getstate()
    # legacy=True is the default; named so that the type checker picks the overload that returns
    # the tuple. The global RandomState always holds an MT19937, whose legacy state is that
    # 5-tuple (a dict comes back only for other bit generators).
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(
        (nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"])
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "the checkpoint has CUDA RNG states of %d devices, this machine has %d: CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )


# --------------------------------------------------------------------------------------------
# The output dir's checkpoints
# --------------------------------------------------------------------------------------------

# Files that say a training run happened in an output dir (a fresh run refuses to go over them),
# and the other files a run writes there (removed with them by --overwrite).
_RUN_MARKERS = (LAST_CHECKPOINT, FINAL_NAME, "metrics.jsonl")
_RUN_FILES = (
    "config.yaml",
    "classes.json",
    "log.txt",
    "summary.json",
    "model_best.pth",
    "events.out.tfevents.*",
    TEMP_PREFIX + "*",
)


def existing_run_files(output_dir: str | Path) -> list[Path]:
    """The checkpoints and metrics of an earlier run in `output_dir` (sorted; empty when none)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [output_dir / name for name in _RUN_MARKERS if (output_dir / name).is_file()]
    found += [p for p in output_dir.iterdir() if _PERIODIC.match(p.name)]
    return sorted(found)


def remove_run_files(output_dir: str | Path) -> list[Path]:
    """Delete the files a training run writes in `output_dir` (nothing else); returns them."""
    output_dir = Path(output_dir)
    removed = existing_run_files(output_dir)
    for pattern in _RUN_FILES:
        removed += [p for p in output_dir.glob(pattern) if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


class Checkpointer:
    """Writes and finds the checkpoints of one output dir.

    Only the process with `enabled=True` (rank 0) touches files; on other ranks `save` is a no-op
    so the caller needs no rank checks. `max_to_keep` applies to the periodic model_*.pth files;
    model_final.pth and whatever `last_checkpoint` names are never deleted.
    """

    def __init__(self, output_dir: str | Path, *, max_to_keep: int = 3, enabled: bool = True):
        self.output_dir = Path(output_dir)
        self.max_to_keep = max_to_keep
        self.enabled = enabled
        if enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temporaries()

    def save(self, name: str, state: dict) -> Path | None:
        """Write `state` as output_dir/name, point `last_checkpoint` at it, prune old periodic files."""
        if not self.enabled:
            return None
        target = self.output_dir / name
        try:
            path = save_checkpoint(state, target)
            # The pointer is renamed into place only after the checkpoint itself is complete.
            atomic_write(self.output_dir / LAST_CHECKPOINT, lambda f: f.write(name + "\n"), mode="w")
        except (OSError, RuntimeError) as exc:
            # atomic_write removed its temporary file: `target` and the pointer are as they were.
            pointer = self.output_dir / LAST_CHECKPOINT
            previous = pointer.read_text().strip() if pointer.is_file() else ""
            kept = (
                f"the previous checkpoint {self.output_dir / previous} is intact and last_checkpoint still names it"
                if previous
                else "no earlier checkpoint exists"
            )
            raise CheckpointError(
                f"cannot write checkpoint {target}: {describe_write_error(exc)}; {kept}. Free space in "
                f"{self.output_dir}, then continue with --resume"
            ) from exc
        self._prune()
        logger.info("saved checkpoint %s", path)
        return path

    def last_checkpoint(self) -> Path | None:
        """The file `last_checkpoint` names, or None when there is no pointer (a fresh dir)."""
        pointer = self.output_dir / LAST_CHECKPOINT
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.output_dir / name
        if not name or not path.is_file():
            raise CheckpointError(
                f"{pointer} names {name!r}, which does not exist in {self.output_dir}; delete {pointer} to "
                "start over, or write the name of an existing model_*.pth into it"
            )
        return path

    def periodic_checkpoints(self) -> list[Path]:
        """model_{iteration}.pth files in the output dir, oldest first."""
        found = []
        for path in self.output_dir.iterdir():
            match = _PERIODIC.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def _prune(self) -> None:
        if self.max_to_keep <= 0:
            return
        pointer = self.output_dir / LAST_CHECKPOINT
        current = pointer.read_text().strip() if pointer.is_file() else ""
        periodic = [p for p in self.periodic_checkpoints() if p.name != current]
        # The current one counts towards max_to_keep when it is periodic.
        keep = self.max_to_keep - (1 if _PERIODIC.match(current) else 0)
        for path in periodic[: max(len(periodic) - keep, 0)]:
            path.unlink(missing_ok=True)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of a process killed mid-save (never the real checkpoints)."""
        for path in self.output_dir.glob(TEMP_PREFIX + "*"):
            logger.info("removing %s, left by an interrupted save", path)
            path.unlink(missing_ok=True)
