"""Training-loader throughput: images/s delivered by `build_train_loader` for several worker counts.

    rows = benchmark_loader(cfg, workers=(0, 2, 4), num_batches=40, warmup_batches=5)

Each row times `num_batches` batches after `warmup_batches` (which absorb worker start-up and the
first page-cache reads): decode, augmentation, resize, padding and the transfer out of the workers
- everything the training loop waits for, nothing of the model. `python -m benchmarks.loader` runs it on
the shapes data at COCO-like sizes (also the `--loader` mode of the benchmark tool).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from detkit.config import Config, replace

logger = logging.getLogger(__name__)


def benchmark_loader(
    cfg: Config, workers: Sequence[int] = (0, 2, 4), num_batches: int = 40, warmup_batches: int = 5
) -> list[dict]:
    """[{workers, batch_size, batches, images, seconds, images_per_s, mean_hw}] per worker count."""
    from detkit.data.loader import build_train_loader

    rows = []
    for num_workers in workers:
        run_cfg = replace(cfg, **{"data.num_workers": int(num_workers), "data.persistent_workers": False})
        loader = build_train_loader(run_cfg)
        batches = iter(loader)
        for _ in range(warmup_batches):
            next(batches)
        images = 0
        pixels_h = pixels_w = 0
        start = time.perf_counter()
        for _ in range(num_batches):
            batch, _, _ = next(batches)
            images += len(batch)
            pixels_h += int(batch.image_sizes[:, 0].sum())
            pixels_w += int(batch.image_sizes[:, 1].sum())
        seconds = time.perf_counter() - start
        del batches  # shuts the workers down before the next setting starts its own
        row = {
            "workers": int(num_workers),
            "batch_size": loader.batch_size,
            "batches": num_batches,
            "images": images,
            "seconds": seconds,
            "images_per_s": images / seconds,
            "mean_hw": (pixels_h / images, pixels_w / images),
        }
        logger.info(
            "loader with %d workers: %.1f images/s (%d images in %.2f s)",
            num_workers,
            row["images_per_s"],
            images,
            seconds,
        )
        rows.append(row)
    return rows
