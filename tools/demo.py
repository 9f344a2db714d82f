#!/usr/bin/env python
"""`make demo`: generate the shapes dataset, train ResNet-18 C4 on it, evaluate, draw detections and curves.

    python tools/demo.py                        # configs/shapes_r18.yaml -> output/demo
    python tools/demo.py --output output/demo2 solver.max_iter=300

Runs on the CPU (about 7 minutes on 2 cores after the 2-3 minute install) or on a GPU when one is visible. Re-running continues
an interrupted training (--resume) or, when it finished, only evaluates and draws again; --fresh
starts over in a new output folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import detkit  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from detkit.cli.common import run_cli

AP50_TARGET = 50.0  # percent: the demo model must really detect the shapes
NUM_DRAWN = 6
DRAW_SCORE = 0.3  # the drawings show detections scoring at least this


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="demo", description="Train and evaluate the shapes demo (ResNet-18 C4).")
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_r18.yaml"), help="demo config")
    parser.add_argument("--output", default="output/demo", help="output folder (default output/demo)")
    parser.add_argument("--fresh", action="store_true", help="delete --output first instead of continuing in it")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)

    from detkit.cli.infer import main as infer_main
    from detkit.cli.train import train
    from detkit.config import load_config
    from detkit.data import get_dataset_info

    start = time.perf_counter()
    out = Path(args.output)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    cfg = load_config(args.config, [f"output_dir={out}", *args.overrides])

    _say("1/4 dataset: the synthetic shapes (generated on first use, then cached)")
    t = time.perf_counter()
    train_info = get_dataset_info(cfg, "train")
    test_info = get_dataset_info(cfg, "test")
    print(f"train: {train_info.num_images} images in {Path(train_info.ann_file).parent}")
    print(f"val:   {test_info.num_images} images in {Path(test_info.ann_file).parent}")
    print(f"classes: {', '.join(train_info.class_names)}  ({time.perf_counter() - t:.0f} s)")

    _say(f"2/4 training {Path(args.config).name}: {cfg.solver.max_iter} iterations of {cfg.solver.ims_per_batch} images, then evaluation on val")
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
        ["--weights", str(out / "model_final.pth"), "--input", str(samples), "--output", str(drawings),
         "--overwrite", "--workers", "0", "--score-thresh", str(DRAW_SCORE)]
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
    print(f"training + evaluation: {train_seconds:.0f} s; whole demo: {total:.0f} s ({summary['device']}, {os.cpu_count()} CPUs)")
    print(f"drawings:   {drawings}/")
    print(f"metrics:    {out / 'metrics.jsonl'}, {out / 'summary.json'}")
    print(f"curves:     {', '.join(str(p) for p in curves)}")
    print(f"checkpoint: {out / 'model_final.pth'}  log: {out / 'log.txt'}")
    if not ap50 >= AP50_TARGET:
        print(f"warning: AP50 {ap50:.1f} is below the demo's target of {AP50_TARGET:.0f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
