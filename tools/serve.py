#!/usr/bin/env python
"""Serve a detector over HTTP with dynamic batching: see `detkit/cli/serve.py` or --help."""

import os
import sys

try:
    import detkit  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detkit.cli.common import run_cli
from detkit.cli.serve import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
