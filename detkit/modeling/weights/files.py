"""Reading weights files without running code from them.

`.pth` / zip files load with `torch.load(weights_only=True)`; pickles (`.pkl`) with
`detkit.modeling.safe_pickle.load_pickle`, which builds numpy arrays and plain containers only.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detkit.errors import CheckpointError
from detkit.modeling.safe_pickle import load_pickle

# torch.save's legacy (non-zip) format starts with a pickle of this number.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def read_torch_file(path: str | os.PathLike) -> object:
    """torch.load with weights_only=True, and errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path} (give a local path; nothing is downloaded here)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several kinds for corrupt or unsafe files
        raise CheckpointError(
            f"cannot load {path} with torch.load(weights_only=True): {type(exc).__name__}: {str(exc).splitlines()[0]}. "
            "Only files of tensors and plain containers are loaded (no pickled objects can run)."
        ) from None


def read_weights_file(path: str | os.PathLike) -> object:
    """The object in a weights file, read without running code from it.

    torch.save files (zip, or the legacy format) go through `torch.load(weights_only=True)`;
    anything else is read as a pickle by `safe_pickle.load_pickle` (numpy arrays only).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path} (give a local path; nothing is downloaded here)")
    if zipfile.is_zipfile(path):
        return read_torch_file(path)
    obj = load_pickle(path)
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
        return read_torch_file(path)
    return obj


def state_dict_from_checkpoint(obj: object, source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a loaded file into its tensors and everything else.

    Takes `obj["model"]` (Detectron2 and detkit checkpoints), `obj["blobs"]` (Caffe2 detection
    files), `obj["state_dict"]`, or `obj` itself. numpy arrays become tensors (sharing memory);
    non-array entries of the weights dict are dropped. Returns (state dict, the other top-level
    entries of the file, e.g. "__author__", "iteration").
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} does not hold a dict of weights (got {type(obj).__name__})")
    extras: dict[str, Any] = {}
    weights: Any = obj
    for key in ("model", "blobs", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            weights = obj[key]
            extras = {k: v for k, v in obj.items() if k != key}
            break
    state_dict: dict[str, Tensor] = {}
    for name, value in weights.items():
        if isinstance(value, np.ndarray):
            if value.dtype == object or not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
                raise CheckpointError(f"{source}: {name} is a numpy array of {value.dtype}, not numbers")
            # torch.from_numpy wants a writable array in native byte order (protocol-5 pickles give
            # read-only arrays over the file's bytes; big-endian files exist).
            native = value.dtype.newbyteorder("=")
            value = np.ascontiguousarray(value)
            if value.dtype != native or not value.flags.writeable:
                value = value.astype(native)
            value = torch.from_numpy(value)
        if isinstance(value, Tensor):
            state_dict[str(name)] = value
    if not state_dict:
        keys = ", ".join(list(map(str, weights.keys()))[:6])
        raise CheckpointError(f"{source} holds no tensors or numpy arrays (top-level keys: {keys})")
    return state_dict, extras
