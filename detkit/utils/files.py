"""Atomic file writes: a file appears under its name complete, or not at all.

    atomic_write("out/metrics.json", lambda f: f.write(text), mode="w")   # through a file object
    write_text_atomic("out/report.html", page)
    with atomic_output("out/model.onnx") as tmp_path:                      # writers that take a name
        onnx.save(model, str(tmp_path))                                      # (cv2, savefig, ...)
    output = AtomicOutput("out/video.mp4"); ...; output.commit()           # files written over time

Every writer goes to a temporary file in the target's own folder (a rename is atomic only within
one file system) and renames it over the target with os.replace once it is complete. If the
writing raises, KeyboardInterrupt included, the temporary file is removed and the target keeps
its previous content (or stays absent). Temporary names start with TEMP_PREFIX and end with the
target's suffix (writers such as cv2.VideoWriter pick the format from the extension), so a
folder's leftovers of a killed process can be found by the prefix (`Checkpointer` removes them).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in `directory` durable (POSIX: the directory entry must be synced too)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform/file system: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicOutput:
    """A temporary file next to `path` that becomes `path` on `commit()`.

    temp_path: where to write. By default a new, unique name `.tmp-<name>.<random><suffix>`,
    created empty here with the permissions of a normal new file (so two writers of one target
    never share a temporary file). temp_name: a fixed name in the same folder instead, for an
    output that users may watch grow (a video being written); it is not created here.

    As a context manager it yields temp_path, commits when the block ends normally and discards
    (removes the temporary file) when it raises, KeyboardInterrupt included.
    """

    def __init__(self, path: str | os.PathLike, *, temp_name: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if temp_name is not None:
            self.temp_path = self.path.with_name(temp_name)
        else:
            while True:
                candidate = self.path.with_name(
                    f"{TEMP_PREFIX}{self.path.name}.{secrets.token_hex(4)}{self.path.suffix}"
                )
                try:
                    # O_EXCL: never an existing file; mode 0o666 is reduced by the umask as for any new file.
                    os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                except FileExistsError:
                    continue
                self.temp_path = candidate
                break
        self.done = False

    def commit(self, fsync: bool = True) -> Path:
        """Rename the finished temporary file over `path` (fsync first: the data is on disk before
        the name points at it). Returns `path`."""
        if self.done:
            raise RuntimeError(f"{self.path}: already committed or discarded")
        try:
            if fsync:
                _fsync_file(self.temp_path)
            os.replace(self.temp_path, self.path)
        except BaseException:
            self.discard()
            raise
        self.done = True
        if fsync:
            fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Remove the temporary file; `path` is left as it was."""
        self.done = True
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Path:
        return self.temp_path

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.done:  # committed or discarded inside the block
            return
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_output(path: str | os.PathLike, *, temp_name: str | None = None) -> AtomicOutput:
    """`with atomic_output(path) as tmp_path:` write the file `tmp_path`; it becomes `path` when
    the block ends normally and is removed when it raises (see AtomicOutput)."""
    return AtomicOutput(path, temp_name=temp_name)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call `write(file)` on a temporary file next to `path` opened with `mode` ("wb" or "w"),
    fsync it and rename it to `path`. Returns `path`.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path` keeps
    its previous content.
    """
    encoding = None if "b" in mode else "utf-8"
    with atomic_output(path) as tmp_path, open(tmp_path, mode, encoding=encoding) as f:
        write(f)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`text` as the UTF-8 file `path`, atomically (atomic_write)."""
    return atomic_write(path, lambda f: f.write(text), mode="w")
