#!/usr/bin/env python
"""Draw a run's metrics.jsonl as PNG curves (losses.png, lr.png, eval.png).

    python tools/plot.py output/shapes_r18            # a run's output dir (or its metrics.jsonl)
    python tools/plot.py output/run --out figures/
"""

import argparse
import os
import sys
from pathlib import Path

try:
    import detkit  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detkit.cli.common import run_cli
from detkit.errors import DetkitError


def main(argv):
    parser = argparse.ArgumentParser(prog="plot", description="metrics.jsonl -> losses.png, lr.png, eval.png")
    parser.add_argument("run", help="a training output dir, or a metrics.jsonl file")
    parser.add_argument("--out", help="folder for the PNGs (default: beside metrics.jsonl)")
    args = parser.parse_args(argv)
    from detkit.analysis.plots import plot_metrics
    from detkit.utils.metrics import METRICS_FILE

    path = Path(args.run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise DetkitError(f"{path} not found: give a training output dir or its metrics.jsonl")
    for written in plot_metrics(path, args.out):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
