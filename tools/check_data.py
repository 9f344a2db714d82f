#!/usr/bin/env python
"""Check a dataset before training (exit 0: it can proceed, 2: it cannot): see `detkit/cli/check_data.py` or --help."""

import os
import sys

try:
    import detkit  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detkit.cli.check_data import main
from detkit.cli.common import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
