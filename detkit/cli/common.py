"""What every command line shares: the error boundary and logging set-up."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from detkit.errors import DetkitError


def setup_logging(level: int = logging.INFO, log_file: str | None = None) -> None:
    """Console (and optionally file) logging for the `detkit` loggers, once per process."""
    root = logging.getLogger("detkit")
    root.setLevel(level)
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", datefmt="%m/%d %H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        root.addHandler(console)
    if log_file and not any(isinstance(h, logging.FileHandler) and h.baseFilename == log_file for h in root.handlers):
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False


def command_line(argv: Sequence[str] | None = None) -> str:
    """This process's command line as the user typed it, for logs and result files:
    `python -m detkit train ...`, `detkit train ...`, `python tools/train.py ...`."""
    argv = list(sys.argv if argv is None else argv)
    program = argv[0] if argv else "detkit"
    if program.replace("\\", "/").endswith("detkit/__main__.py"):
        program = "python -m detkit"
    elif program.endswith(".py"):
        program = f"python {program}"
    else:
        program = program.replace("\\", "/").rsplit("/", 1)[-1]  # a console script: detkit, detkit-train
    return " ".join([program, *argv[1:]])


def run_cli(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run a tool's main; a DetkitError becomes one line on stderr and exit code 2.

    `--debug` anywhere on the command line shows the full traceback instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        return int(main(args) or 0)
    except DetkitError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
