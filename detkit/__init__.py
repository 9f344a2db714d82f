"""detkit: Faster R-CNN (ResNet C4) object detection in plain PyTorch.

Commands: `detkit <task>` (train, eval, infer, export, analyze, benchmark, convert-weights, plot,
demo; `detkit --help`). Library: detkit.config, detkit.data, detkit.modeling, detkit.engine, ...

`detkit.__version__` is the installed distribution's version (pyproject.toml's `version`, the one
place it is written down), read on first access so that `import detkit` stays free.
"""

from __future__ import annotations

import re
from pathlib import Path


def _version() -> str:
    """pyproject.toml's version: from the installed metadata, else (a source checkout that was not
    installed, e.g. tools/*.py run from a clone) from the pyproject.toml beside this package."""
    from importlib import metadata

    try:
        return metadata.version("detkit")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        text = pyproject.read_text()
    except OSError:
        return "unknown"
    # The [project] table's `version = "X"` line (tomllib is Python 3.11+; this runs on 3.10 too).
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M) if project else None
    return found.group(1) if found else "unknown"


def __getattr__(name: str):
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'detkit' has no attribute {name!r}")
