"""FrozenBatchNorm2d's cost: Detectron2's formulas (detkit now) vs the earlier one-pass addcmul.

Times an R50 trunk at H x W plus res5 on R RoI crops (14 x 14), all norms frozen, in one process,
A and B interleaved round by round so that a drift of the machine's speed hits both:
  A "detectron2": F.batch_norm(training=False) without grad, x * scale + bias with grad (detkit);
  B "addcmul":    torch.addcmul(shift, x, scale) in both cases (detkit before 2026-12-01).
Prints min / median seconds of each and the median of the per-round ratios A/B, for inference
(no grad) and for a training step (forward + backward of res3..res5 and the crops).

    python -m benchmarks.frozen_bn --threads 1 --rounds 5
"""

import argparse
import statistics
import sys
from collections.abc import Sequence

import torch

from detkit.benchmark.timing import time_interleaved
from detkit.cli.common import run_cli
from detkit.modeling.backbone import FrozenBatchNorm2d, ResNetTrunk, build_res5


def addcmul_forward(self, x):
    scale = self.weight * (self.running_var + self.eps).rsqrt()
    shift = self.bias - self.running_mean * scale
    return torch.addcmul(shift.reshape(1, -1, 1, 1).to(x.dtype), x, scale.reshape(1, -1, 1, 1).to(x.dtype))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.frozen_bn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640])
    parser.add_argument("--rois", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trunk = ResNetTrunk(depth=args.depth, norm="FrozenBN", freeze_at=2)
    res5, _ = build_res5(depth=args.depth, norm="FrozenBN")
    for m in list(trunk.modules()) + list(res5.modules()):
        if isinstance(m, FrozenBatchNorm2d):  # realistic statistics: activations neither vanish nor explode
            m.running_var.fill_(4.0)
            m.weight.fill_(0.5)
    image = torch.randn(1, 3, *args.image_size)
    crops = torch.randn(args.rois, trunk.out_channels, 14, 14)

    def infer():
        with torch.no_grad():
            trunk(image)
            res5(crops)

    def train():
        out = trunk(image).float().mean() + res5(crops.requires_grad_()).mean()
        out.backward()

    original = FrozenBatchNorm2d.forward
    variants = {"detectron2": original, "addcmul": addcmul_forward}

    def with_forward(forward, step):
        def run():
            FrozenBatchNorm2d.forward = forward
            step()

        return run

    for step_name, step in (("inference", infer), ("training", train)):
        try:  # one warm-up round, then the variants alternate round by round
            timed = time_interleaved(
                {name: with_forward(forward, step) for name, forward in variants.items()},
                torch.device("cpu"),
                warmup=1,
                repeats=args.rounds,
            )
        finally:
            FrozenBatchNorm2d.forward = original
        times = {name: timed[name]["times_s"] for name in variants}
        ratios = [a / b for a, b in zip(times["detectron2"], times["addcmul"])]
        for name, values in times.items():
            print(f"{step_name:9s} {name:10s} min {min(values):.3f} s  median {statistics.median(values):.3f} s")
        print(
            f"{step_name:9s} detectron2/addcmul per-round ratio: median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {args.rounds} rounds)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
