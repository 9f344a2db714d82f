#!/usr/bin/env python
"""`make demo`: the shapes demo (`detkit demo`), see `detkit/cli/demo.py` or --help.

Uses configs/shapes_r18.yaml of the current directory, else of this checkout.
"""

import functools
import sys
from pathlib import Path

try:
    import detkit  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli.common import run_cli
from detkit.cli.demo import main

ROOT = Path(__file__).resolve().parents[1]  # the checkout, whose configs/ the demo falls back to

if __name__ == "__main__":
    sys.exit(run_cli(functools.partial(main, checkout=ROOT)))
