"""The settings of a detection service (the options of `detkit serve`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from detkit.errors import ConfigError

DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # 20 MiB: a 24 MP JPEG at high quality is ~12 MiB
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: above any phone camera; a 40 MP RGB image decodes to 120 MB


@dataclass
class ServeOptions:
    """What to serve and how.

    weights (+ config, overrides): a detkit checkpoint (backend "pytorch"); model: an exported file
    for backend "onnxruntime" / "openvino" / "pt2" / "aoti". score_thresh: the default of a request's score_thresh;
    the model itself runs at its own floor (the config's model.roi_heads.score_thresh, or the
    exported file's) so that a request may ask for any threshold in [floor, 1].
    max_batch: images per forward pass; max_wait_ms: how long the first image of a batch waits for
    more; max_queue: images admitted and not yet in a forward pass, beyond which requests get 503;
    workers: model worker threads, each with its own copy of the model; threads: intra-op threads
    of each worker (None: the CPU count divided by `workers`). max_bytes: largest request body;
    max_pixels: largest width x height, checked from the image header before decoding.
    """

    weights: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    model: str | None = None
    backend: str = "pytorch"
    device: str = "auto"
    score_thresh: float = 0.5
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 32
    workers: int = 1
    threads: int | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    name: str | None = None  # the model's name in the answers (default: the file's stem)
    # One forward pass per padded size within a collected batch (detkit.serve.batcher.Batcher):
    # keeps each image's detections those of `detkit infer --batch-size 1` where padding a batch
    # would change them. None: only for a model served with test.batch_invariant=false.
    split_by_padded_size: bool | None = None

    def check(self) -> ServeOptions:
        """Raise ConfigError naming the option and the fix when a value cannot work; return self."""
        if self.backend == "pytorch":
            if not self.weights or self.model:
                raise ConfigError(
                    "--backend pytorch serves a checkpoint: give --weights CKPT (--model is for exported files)"
                )
        elif not self.model or self.weights or self.config or self.overrides:
            raise ConfigError(
                f"--backend {self.backend} serves an exported model: give --model FILE (written by detkit export) "
                "and no --weights, --config or overrides (the file carries its config)"
            )
        if not 0.0 <= self.score_thresh <= 1.0:
            raise ConfigError(f"--score-thresh {self.score_thresh}: must be in [0, 1]")
        for name, value, low in (
            ("--max-batch", self.max_batch, 1),
            ("--max-queue", self.max_queue, 1),
            ("--workers", self.workers, 1),
            ("--max-bytes", self.max_bytes, 1),
            ("--max-pixels", self.max_pixels, 1),
        ):
            if value < low:
                raise ConfigError(f"{name} {value}: must be at least {low}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms {self.max_wait_ms}: must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads}: must be at least 1")
        return self

    @property
    def threads_per_worker(self) -> int:
        """Intra-op threads of each model worker: --threads, else the CPUs shared out among the workers."""
        if self.threads is not None:
            return self.threads
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cpus // self.workers)

    @property
    def model_name(self) -> str:
        from pathlib import Path

        if self.name:
            return self.name
        path = Path(self.weights or self.model or "model")
        # model_final.pth says nothing: its folder (the run's name, shapes_r18) does.
        return path.parent.name if path.stem.startswith("model_") and path.parent.name else path.stem
