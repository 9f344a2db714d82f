"""`detkit plot` (also tools/plot.py): draw a run's metrics.jsonl as PNG curves.

    detkit plot output/shapes_r18                 # a run's output dir (or its metrics.jsonl)
    detkit plot output/run --out figures/

Writes losses.png (every loss, smoothed, log scale), lr.png (the learning rate) and, when the run
evaluated, eval.png (COCO AP / AP50 / AP75 over iterations, or the held-out losses) beside metrics.jsonl or into --out, and prints their
paths (detkit.analysis.plots.plot_metrics; matplotlib's Agg renderer, no display needed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from detkit.cli.common import run_cli
from detkit.errors import DetkitError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit plot",
        description="Draw a training run's metrics.jsonl as PNG curves: losses.png, lr.png, eval.png.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  detkit plot output/shapes_r18                      # PNGs beside output/shapes_r18/metrics.jsonl\n"
        "  detkit plot output/shapes_r18/metrics.jsonl --out figures/",
    )
    parser.add_argument("run", help="a training output dir, or a metrics.jsonl file")
    parser.add_argument("--out", help="folder for the PNGs (default: beside metrics.jsonl)")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
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


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
