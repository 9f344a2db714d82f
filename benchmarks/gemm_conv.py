"""The small-map GEMM path of detkit's Conv2d on the CPU demo's training step: with it vs without.

Two copies of the demo's model (configs/shapes_r18.yaml: R18-C4, 2x2 RoIAlign, res5 on 1x1 maps),
same initial weights, each with its own optimizer, train on the same fixed batches of the shapes
training set, A and B interleaved step by step in one process so that a drift of the machine's
speed hits both:
  A "gemm":   detkit's Conv2d (1x1 maps as one matmul, up to 16 output positions as unfold + matmul);
  B "onednn": nn.Conv2d's own forward (the library convolution) for every conv.
Prints min / median seconds per step of each and the median of the per-round ratios B/A.

    python -m benchmarks.gemm_conv --threads 2 --rounds 10
"""

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from detkit.cli.common import run_cli
from detkit.config import load_config
from detkit.data.loader import build_train_loader
from detkit.engine.lr_schedule import build_optimizer
from detkit.modeling import build_model
from detkit.modeling.backbone import Conv2d


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gemm_conv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/shapes_r18.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batches", type=int, default=5, help="distinct batches, cycled through the rounds")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config, args.overrides)
    batches = []
    for batch in build_train_loader(cfg):
        batches.append(batch)
        if len(batches) == args.batches:
            break
    model_a = build_model(cfg, device="cpu", load_weights=False).train()
    model_b = copy.deepcopy(model_a)
    runs = {
        "gemm": (model_a, build_optimizer(model_a, cfg.solver), Conv2d._conv_forward),
        "onednn": (model_b, build_optimizer(model_b, cfg.solver), nn.Conv2d._conv_forward),
    }
    gemm_forward = Conv2d._conv_forward
    times = {name: [] for name in runs}
    try:
        for round_index in range(args.rounds + 1):  # round 0 warms up
            images, targets, _ = batches[round_index % len(batches)]
            for name, (model, optimizer, conv_forward) in runs.items():
                Conv2d._conv_forward = conv_forward
                start = time.perf_counter()
                losses = model(images, targets)
                optimizer.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                optimizer.step()
                if round_index:
                    times[name].append(time.perf_counter() - start)
    finally:
        Conv2d._conv_forward = gemm_forward
    ratios = [b / a for a, b in zip(times["gemm"], times["onednn"])]
    for name, values in times.items():
        print(f"{name:7s} s/step min {min(values):.3f}  median {statistics.median(values):.3f}")
    print(
        f"onednn/gemm per-round ratio: median {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {args.rounds} rounds)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
