"""The per-iteration cost of the cross-rank checks: 2 gloo processes on CPU train the tiny detector
(ResNet-18 C4, 64 px shapes, the trunk frozen) and time `Trainer.run_step` on one fixed batch,
A and B interleaved round by round in one run so that a drift of the machine's speed hits both:
  A "flag":  the preemption flag rides in the loss all-reduce as one more element (what training does);
  B "plain": the same all-reduce without the flag (no preemption check at all).
Also the failure watch: the time of one read of the group's store (`FailureWatch.peer_failure`),
which the watcher thread makes every FAILURE_POLL_S seconds, off the training thread.
Prints rank 0's min / median seconds of A and B and the median of the per-round ratios A/B.

    python -m benchmarks.preemption_check --rounds 30 --threads 1
"""

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.multiprocessing as mp

CONFIG = [
    "device=cpu",
    "seed=3",
    "model.depth=18",
    "model.num_classes=3",
    "model.backbone.freeze_at=4",
    "model.backbone.weights=",
    "model.rpn.pre_nms_topk_train=200",
    "model.rpn.post_nms_topk_train=32",
    "model.rpn.batch_size_per_image=32",
    "model.roi_heads.batch_size_per_image=8",
    "model.roi_heads.pooler_resolution=4",
    "data.min_size_train=[64]",
    "data.max_size_train=64",
    "data.num_workers=0",
    "data.test=[]",
    "solver.ims_per_batch=2",
    "solver.base_lr=0.002",
    "solver.max_iter=100000",
    "solver.warmup_iters=0",
    "solver.steps=[]",
]


def _worker(rank: int, folder: str, port: int, rounds: int, threads: int) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(threads)
    from detkit.benchmark.timing import time_interleaved
    from detkit.config import load_config
    from detkit.engine import distributed as dist
    from detkit.engine.preemption import PreemptionWatcher
    from detkit.engine.trainer import Trainer

    data = f"data.train=[{{type: shapes, root: {folder}/shapes, split: train, num_images: 8, image_size: [64, 64], num_classes: 3}}]"
    cfg = load_config(None, [*CONFIG, data, f"output_dir={folder}/out"])
    trainer = Trainer(cfg, load_weights=False)  # random weights: the step's time is what matters
    batch = next(iter(trainer.build_train_loader(0)))
    watcher = PreemptionWatcher(["SIGTERM"])  # not entered: no handler, requested stays False

    def with_flag():
        trainer.preemption = watcher
        trainer.run_step(batch)

    def plain():
        trainer.preemption = None
        trainer.run_step(batch)

    timed = time_interleaved({"flag": with_flag, "plain": plain}, torch.device("cpu"), warmup=3, repeats=rounds)
    watch = dist._watch
    polls = []
    if watch is not None:
        for _ in range(200):
            start = time.perf_counter()
            watch.peer_failure()
            polls.append(time.perf_counter() - start)
    dist.barrier()
    if rank == 0:
        a, b = timed["flag"]["times_s"], timed["plain"]["times_s"]
        ratios = [x / y for x, y in zip(a, b)]
        print(f"2 gloo processes, {threads} thread(s) each, {rounds} interleaved rounds (rank 0's times)")
        for name, times in (("A flag ", a), ("B plain", b)):
            print(f"  {name}: min {min(times) * 1e3:.1f} ms  median {statistics.median(times) * 1e3:.1f} ms per step")
        print(
            f"  A/B: min-ratio {min(a) / min(b):.3f}  median-ratio {statistics.median(a) / statistics.median(b):.3f}  "
            f"median of per-round ratios {statistics.median(ratios):.3f}"
        )
        if polls:
            poll = statistics.median(polls)
            print(
                f"  failure watch: one store read {poll * 1e6:.0f} us (median of 200), every "
                f"{dist.FAILURE_POLL_S} s on its own thread = {poll / dist.FAILURE_POLL_S:.2e} of the wall time"
            )
    dist.destroy()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.preemption_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(folder, port, args.rounds, args.threads), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
