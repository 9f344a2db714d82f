"""`detkit demo` (also `make demo`, tools/demo.py): generate the shapes dataset, train ResNet-18 C4 on
it, evaluate, draw detections and the training curves.

    detkit demo                                 # configs/shapes_r18.yaml -> output/demo
    detkit demo --output output/demo2 solver.max_iter=300
    detkit demo --fresh                         # start over in an empty output/demo

Runs on the CPU (about 7 minutes on 2 cores after the 2-3 minute install) or on a GPU when one is
visible. Re-running continues an interrupted training (--resume) or, when it finished, only
evaluates and draws again; --fresh starts over in a new output folder.

The config is configs/shapes_r18.yaml of the current directory (a detkit checkout); from another
directory, that of the checkout detkit runs from (tools/demo.py, an editable install); else give
--config.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from detkit.cli.common import run_cli
from detkit.errors import ConfigError

DEMO_CONFIG = Path("configs") / "shapes_r18.yaml"  # relative to the current directory, else to the checkout


AP50_TARGET = 70.0  # percent: the demo model must really detect the shapes
NUM_DRAWN = 6
DRAW_SCORE = 0.3  # the drawings show detections scoring at least this


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def default_config(checkout: Path | None = None) -> Path:
    """configs/shapes_r18.yaml in the current directory; else in `checkout` (tools/demo.py passes
    its repository) or in the source checkout this detkit package was imported from."""
    candidates = [DEMO_CONFIG]
    if checkout is not None:
        candidates.append(Path(checkout) / DEMO_CONFIG)
    candidates.append(Path(__file__).resolve().parents[2] / DEMO_CONFIG)  # detkit/cli/demo.py -> checkout
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(
        f"{DEMO_CONFIG} not found in {Path.cwd()} (nor in a detkit checkout): run the demo from a "
        "detkit checkout, or give --config PATH/TO/shapes_r18.yaml"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkit demo",
        description="Train and evaluate the shapes demo (ResNet-18 C4): data, training, drawings, curves.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Warns when AP50 ends below the demo's target of {AP50_TARGET:.0f}.\n\n"
        "examples:\n"
        "  detkit demo                                        # configs/shapes_r18.yaml -> output/demo\n"
        "  detkit demo --fresh --output output/demo_seed1 seed=1",
    )
    parser.add_argument(
        "--config", default=None, help=f"demo config (default: {DEMO_CONFIG} here, else in the detkit checkout)"
    )
    parser.add_argument("--output", default="output/demo", help="output folder (default output/demo)")
    parser.add_argument("--fresh", action="store_true", help="delete --output first instead of continuing in it")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser


def main(argv: Sequence[str], checkout: Path | None = None) -> int:
    """The demo; `checkout`: a detkit repository whose configs/ to use when the current directory has none."""
    args = build_parser().parse_args(list(argv))
    config = Path(args.config) if args.config else default_config(checkout)

    from detkit.cli.infer import main as infer_main
    from detkit.cli.train import train
    from detkit.config import load_config
    from detkit.data import get_dataset_info

    start = time.perf_counter()
    out = Path(args.output)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    cfg = load_config(config, [f"output_dir={out}", *args.overrides])

    _say("1/4 dataset: the synthetic shapes (generated on first use, then cached)")
    t = time.perf_counter()
    train_info = get_dataset_info(cfg, "train")
    test_info = get_dataset_info(cfg, "test")
    print(f"train: {train_info.num_images} images in {Path(train_info.ann_file).parent}")
    print(f"val:   {test_info.num_images} images in {Path(test_info.ann_file).parent}")
    print(f"classes: {', '.join(train_info.class_names)}  ({time.perf_counter() - t:.0f} s)")

    _say(
        f"2/4 training {config.name}: {cfg.solver.max_iter} iterations of {cfg.solver.ims_per_batch} images, then evaluation on val"
    )
    t = time.perf_counter()
    code = train(cfg, resume=True)
    if code:
        return code
    train_seconds = time.perf_counter() - t

    _say(f"3/4 drawing detections on {NUM_DRAWN} validation images")
    samples = out / "val_samples"
    samples.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(test_info.image_root).iterdir())[:NUM_DRAWN]:
        shutil.copy2(path, samples / path.name)
    drawings = out / "drawings"
    code = infer_main(
        [
            "--weights",
            str(out / "model_final.pth"),
            "--input",
            str(samples),
            "--output",
            str(drawings),
            "--overwrite",
            "--workers",
            "0",
            "--score-thresh",
            str(DRAW_SCORE),
        ]
    )
    if code:
        return code

    _say("4/4 results")
    import json

    from detkit.analysis.plots import plot_metrics

    curves = plot_metrics(out / "metrics.jsonl")

    summary = json.loads((out / "summary.json").read_text())
    ev = summary.get("eval", {})
    ap, ap50 = ev.get("bbox/AP", float("nan")), ev.get("bbox/AP50", float("nan"))
    total = time.perf_counter() - start
    print(f"box AP {ap:.1f}, AP50 {ap50:.1f} on {test_info.num_images} val images (COCO metrics, percent)")
    print(
        f"training + evaluation: {train_seconds:.0f} s; whole demo: {total:.0f} s ({summary['device']}, {os.cpu_count()} CPUs)"
    )
    print(f"drawings:   {drawings}/")
    print(f"metrics:    {out / 'metrics.jsonl'}, {out / 'summary.json'}")
    print(f"curves:     {', '.join(str(p) for p in curves)}")
    print(f"checkpoint: {out / 'model_final.pth'}  log: {out / 'log.txt'}")
    if not ap50 >= AP50_TARGET:
        print(f"warning: AP50 {ap50:.1f} is below the demo's target of {AP50_TARGET:.0f}", file=sys.stderr)
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
