"""Read weight pickles (Detectron2 model zoo, MSRA/Caffe2 ImageNet models) without running their code.

A pickle is a small program: every class or function it names is imported and called while it
loads, so `pickle.load` on a downloaded file can run anything (`os.system`, `exec`, ...). Weight
files only need numpy arrays inside plain containers, so `load_pickle` uses an unpickler whose
`find_class` hands out nothing but the few numpy callables that rebuild arrays, dtypes and numpy
scalars (plus `collections.OrderedDict` and `_codecs.encode`, see `_ALLOWED`). Any other name in
the file stops the load with a `CheckpointError` naming the file and the refused "module.name",
before that name is imported or called: no code from the file runs.

Dicts, lists, tuples, sets, str, bytes, int, float, bool and None are pickle opcodes of their own
and need no `find_class`, so they load as usual.
"""

from __future__ import annotations

import codecs
import collections
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from detkit.errors import CheckpointError

try:  # numpy >= 2 moved the implementation to numpy._core; pickles name either module
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


def _allowed_table() -> dict[tuple[str, str], Callable[..., Any]]:
    table: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        # Python 3 writes bytes as _codecs.encode(str, "latin1") in pickle protocols 0-2 (numpy
        # array buffers included). It only converts text to bytes; torch's weights_only loader
        # allows it for the same reason.
        ("_codecs", "encode"): codecs.encode,
    }
    # Files written with numpy 1.x name numpy.core.*, files written with numpy 2.x numpy._core.*;
    # either resolves to the installed numpy's function, never through an import of the name.
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = _multiarray._reconstruct  # ndarray, protocols 0-4
        table[(f"{package}.multiarray", "scalar")] = _multiarray.scalar  # numpy scalars (np.float32(1.0))
        # ndarray, protocol 5 (a private function: numpy's stubs leave it out)
        table[(f"{package}.numeric", "_frombuffer")] = _numeric._frombuffer  # type: ignore[attr-defined]
    return table


_ALLOWED = _allowed_table()


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that builds only numpy arrays, numpy scalars and plain containers.

    `source` names the file in error messages.
    """

    def __init__(self, file: BinaryIO, source: str):
        # latin1: Python-2 pickles (MSRA/Caffe2 weights) store array bytes as 8-bit str, which
        # numpy turns back into bytes only when it is decoded 1:1 (what Detectron2 does too).
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise CheckpointError(
                f"refused to load {self.source}: its pickle asks for {module}.{name}, which is not a numpy array, "
                "number or plain container. Weight files need nothing else, so the file is not loaded and none "
                "of its code ran. If you trust it, load it in a separate Python and re-save the weights as "
                "{name: numpy array} (pickle) or {name: tensor} (torch.save)."
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(
            f"refused to load {self.source}: it holds persistent references (a torch.save file in the "
            "legacy format?); only plain pickles of numpy arrays are read this way"
        )


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle `path` with `RestrictedUnpickler`.

    Raises CheckpointError when the file is missing, is not a pickle, is truncated, or names anything
    but numpy arrays, numpy scalars and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path} (give a local path; nothing is downloaded here)")
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, str(path)).load()
        except CheckpointError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            MemoryError,
        ) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise CheckpointError(
                f"cannot read {path} as a pickle of numpy arrays ({type(exc).__name__}: {reason}); "
                "is the file truncated or in another format?"
            ) from None
