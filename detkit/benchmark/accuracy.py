"""Accuracy and wall time of a real training run: detkit vs torchvision's FasterRCNN.

summaries = run_accuracy_comparison(cfg, output_dir)   # {"detkit": summary, "torchvision": summary}
"""

from __future__ import annotations

import gc
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def run_accuracy_comparison(cfg, output_dir: str) -> dict:
    """Train `cfg` twice from the same initial weights, through the same loader, optimizer,
    schedule, AMP setting and evaluator: once detkit's model, once torchvision's FasterRCNN
    (`TorchvisionDetector`); each evaluates on cfg.data.test at the end.

    The runs go one after the other (detkit first) into output_dir/detkit and
    output_dir/torchvision. Returns {"detkit": summary, "torchvision": summary} with the Trainer's
    summary (wall_time_s = training only, s_per_iter, eval {"bbox/AP", ...}).
    """
    from pathlib import Path

    from detkit.benchmark.tv_reference import TorchvisionDetector, build_torchvision_reference
    from detkit.config import replace
    from detkit.engine.trainer import Trainer
    from detkit.modeling import build_model
    from detkit.utils.env import seed_all

    seed_all(cfg.seed)
    detkit_model = build_model(cfg)  # loads model.weights / backbone weights if the config names them
    # Copies every tensor before detkit's run changes them: both start from the same weights.
    reference = build_torchvision_reference(detkit_model)
    if cfg.model.channels_last:
        reference.to(memory_format=torch.channels_last)
    if cfg.model.compile:
        reference.backbone.compile()
        reference.roi_heads.box_head.compile()
    models: dict[str, nn.Module | None] = {"detkit": detkit_model, "torchvision": TorchvisionDetector(reference)}
    summaries = {}
    for name, model in models.items():
        run_cfg = replace(cfg, output_dir=str(Path(output_dir) / name))
        logger.info("training %s for %d iterations into %s", name, cfg.solver.max_iter, run_cfg.output_dir)
        summaries[name] = Trainer(run_cfg, model=model).train()
        models[name] = None  # free the first model's memory before the second run
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return summaries
