"""Distributed data parallel on CPU: 2 processes with gloo train the real detector (ResNet-18 C4,
tiny shapes images) for 3 iterations; their weights must stay identical, and only rank 0 writes."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2

# 64 px images, trunk frozen, few anchors and RoIs: a step takes a fraction of a second per process.
TINY_CONFIG = """\
_base_: {base}
device: cpu
model:
  depth: 18
  num_classes: 3
  backbone: {{freeze_at: 4, weights: {weights}}}
  rpn: {{pre_nms_topk_train: 200, post_nms_topk_train: 32, batch_size_per_image: 32}}
  roi_heads: {{batch_size_per_image: 8, pooler_resolution: 4}}
data:
  train: [{{type: shapes, root: {data}, split: train, num_images: 8, image_size: [64, 64], num_classes: 3, max_objects: 3}}]
  min_size_train: [64]
  max_size_train: 64
  num_workers: 0
solver: {{ims_per_batch: 2, base_lr: 0.02, max_iter: 3, steps: [], warmup_iters: 0, checkpoint_period: 2, log_period: 1}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, cfg_path: str, out: str, port: int) -> None:
    # What torchrun sets for each process.
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD_SIZE),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    from detkit.config import load_config
    from detkit.engine import distributed as dist
    from detkit.engine.trainer import Trainer, unwrap

    cfg = load_config(cfg_path, [f"output_dir={out}/run"])
    trainer = Trainer(cfg)
    initial = {k: v.detach().clone() for k, v in unwrap(trainer.model).named_parameters()}
    trainer.train()
    final = {k: v.detach().clone() for k, v in unwrap(trainer.model).named_parameters()}
    torch.save({"initial": initial, "final": final, "world_size": dist.get_world_size()}, f"{out}/rank{rank}.pt")
    dist.destroy()


@pytest.mark.slow
def test_two_gloo_processes_keep_identical_weights(tmp_path, standin_imagenet_r18):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        TINY_CONFIG.format(base=ROOT / "configs" / "base.yaml", data=tmp_path / "shapes", weights=standin_imagenet_r18)
    )
    mp.spawn(_worker, args=(str(cfg), str(tmp_path), _free_port()), nprocs=WORLD_SIZE, join=True)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert all(r["world_size"] == WORLD_SIZE for r in ranks)
    # Ranks start from different seeds (seed + rank); DDP broadcasts rank 0's weights at wrap time.
    for name in ranks[0]["final"]:
        assert torch.equal(ranks[0]["final"][name], ranks[1]["final"][name]), name
    changed = [n for n in ranks[0]["final"] if not torch.equal(ranks[0]["final"][n], ranks[0]["initial"][n])]
    assert "roi_heads.box_predictor.cls_score.weight" in changed and "rpn.head.conv.weight" in changed

    # Only rank 0 wrote: one metrics row per iteration, one set of checkpoints.
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert sorted(p.name for p in run.glob("*.pth")) == ["model_0000002.pth", "model_final.pth"]
    final = torch.load(run / "model_final.pth", weights_only=True)
    assert len(final["rng"]) == WORLD_SIZE and final["data"]["world_size"] == WORLD_SIZE
    assert torch.equal(
        final["model"]["roi_heads.box_predictor.cls_score.weight"],
        ranks[1]["final"]["roi_heads.box_predictor.cls_score.weight"],
    )
