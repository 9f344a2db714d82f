#!/usr/bin/env python
"""detkit vs torchvision speed, COCO evaluation speed, loader speed: see `detkit/cli/benchmark.py` or --help."""

import os
import sys

try:
    import detkit  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detkit.cli.benchmark import main
from detkit.cli.common import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
