"""`detkit <task> [args]`: the one command in front of every tool.

    detkit --help                      # the tasks, one line each
    detkit <task> --help               # a task's options and examples
    detkit --version
    detkit train configs/shapes_r18.yaml
    python -m detkit infer --weights output/model_final.pth --input photos/ --output out/

Each task is the `main(argv)` of a module of detkit/cli/, run through `run_cli` (a DetkitError
becomes one line on stderr and exit status 2; `--debug` anywhere shows the traceback). The
`detkit-train`, `detkit-eval`, ... console scripts and tools/*.py run the same functions.
A task's module is imported only when that task runs, so `detkit --help` stays fast.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence

from detkit.cli.common import run_cli

# task -> (module with main(argv), one line for `detkit --help`). Order: the order of the help.
TASKS: dict[str, tuple[str, str]] = {
    "train": ("detkit.cli.train", "train a detector from a YAML config (or --eval-only a checkpoint)"),
    "eval": ("detkit.cli.eval", "COCO box AP of a checkpoint or exported model, or of a predictions file"),
    "infer": ("detkit.cli.infer", "detect objects in images, videos, a camera or a stream; draw them"),
    "serve": ("detkit.cli.serve", "an HTTP service with dynamic batching: POST /v1/detect, /metrics, /readyz"),
    "export": (
        "detkit.cli.export",
        "write a checkpoint as one ONNX, torch.export or AOTInductor file (optionally int8 res5)",
    ),
    "check-data": ("detkit.cli.check_data", "check a dataset before training: counts, anchor fit, every problem"),
    "analyze": ("detkit.cli.analyze", "error analysis of predictions (TIDE, confusion, PR curves), dataset report"),
    "benchmark": ("detkit.cli.benchmark", "speed of detkit vs torchvision, of evaluation, the loader, exported files"),
    "convert-weights": ("detkit.cli.convert_weights", "Detectron2 / MSRA / torchvision weights -> a detkit checkpoint"),
    "convert-data": ("detkit.cli.convert_data", "VOC / YOLO / LabelMe / CVAT annotations -> one COCO json"),
    "plot": ("detkit.cli.plot", "draw a run's metrics.jsonl as PNG curves (losses, lr, eval)"),
    "demo": ("detkit.cli.demo", "train and evaluate ResNet-18 C4 on generated shapes, draw detections"),
}

EXAMPLES = """\
examples:
  detkit demo                                                     # shapes: train, evaluate, draw (CPU ok)
  detkit train configs/frcnn_r101.yaml solver.ims_per_batch=8 solver.base_lr=0.01
  detkit eval configs/shapes_r18.yaml --weights output/shapes_r18/model_final.pth
  detkit infer --weights output/shapes_r18/model_final.pth --input photos/ --output out/
  detkit serve --weights output/shapes_r18/model_final.pth --port 8000
  detkit convert-weights --from detectron2 model_final_298dad.pkl weights/frcnn_r101_c4_3x.pth \\
      --config configs/frcnn_r101_detectron2.yaml
"""


def usage() -> str:
    """The text of `detkit --help`: usage, one line per task, global options, examples."""
    width = max(len(name) for name in TASKS)
    lines = [
        "usage: detkit <task> [args ...]      (also: python -m detkit <task> ...)",
        "",
        "Faster R-CNN (ResNet C4) object detection: train, evaluate and run detectors on COCO-format data.",
        "",
        "tasks:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in TASKS.items()),
        "",
        "options:",
        "  -h, --help     show this help; `detkit <task> --help` shows a task's options and examples",
        "  -V, --version  print detkit's version",
        "  --debug        (after the task) show the full traceback of an error instead of one line",
        "",
        EXAMPLES.rstrip(),
    ]
    return "\n".join(lines)


def _unknown(task: str) -> str:
    close = difflib.get_close_matches(task, list(TASKS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"error: unknown task {task!r}: {hint}choose one of {', '.join(TASKS)} (detkit --help)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run `detkit <task> [args]`; returns the exit status (0 done, 2 a user error, 130 Ctrl-C)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--debug"]:  # `detkit --debug train ...`: run_cli takes --debug anywhere after the task
        args = args[1:] + ["--debug"] if len(args) > 1 else []
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    first = args[0]
    if first in ("-h", "--help"):
        print(usage())
        return 0
    if first in ("-V", "--version"):
        from detkit import __version__

        print(f"detkit {__version__}")
        return 0
    if first == "help":  # `detkit help infer` = `detkit infer --help`
        if len(args) == 1:
            print(usage())
            return 0
        first, args = args[1], [args[1], "--help"]
    task = first.replace("_", "-")  # convert_weights, as the tools/ file is named, works too
    if task not in TASKS:
        print(_unknown(first), file=sys.stderr)
        return 2
    module = importlib.import_module(TASKS[task][0])
    return run_cli(module.main, args[1:])


if __name__ == "__main__":
    sys.exit(main())
