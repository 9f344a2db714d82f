"""Process set-up shared by the tools: seeding, device choice, mixed-precision choice."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from detkit.errors import ConfigError

logger = logging.getLogger(__name__)


def seed_all(seed: int) -> None:
    """Seed python's `random`, numpy's global generator and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Config `device` (auto | cpu | cuda) -> the torch device of this process.

    auto picks cuda when a GPU is visible. With several processes per node, process `local_rank`
    uses GPU `local_rank`.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no GPU is visible to torch; use device=cpu (or auto)")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device={device!r}: must be auto, cpu or cuda")


def configure_backends(device: torch.device, cudnn_benchmark: bool, allow_tf32: bool = False) -> None:
    """cuDNN autotuning and TF32 (GPU only): the config's `cudnn_benchmark` and `allow_tf32`.

    allow_tf32 sets both matmuls and cuDNN convolutions (torch's own default allows TF32 in cuDNN
    convolutions but not in matmuls), so false means true fp32 everywhere.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


@dataclass(frozen=True)
class AmpChoice:
    """What `solver.amp` resolves to on a device.

    dtype: the autocast dtype (None = full fp32); use_scaler: fp16 needs a GradScaler so small
    gradients do not underflow; bf16 has fp32's range and does not.
    """

    dtype: torch.dtype | None
    use_scaler: bool

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[self.dtype]


def cuda_supports_bf16(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8  # Ampere and newer have bf16 tensor cores


def select_amp(
    amp: str, device: torch.device, bf16_supported: bool | None = None, key: str = "solver.amp"
) -> AmpChoice:
    """Resolve `solver.amp` or `test.amp` (auto | bf16 | fp16 | off; `key` names it in errors).

    auto: bf16 on GPUs that support it, fp16 + GradScaler on older GPUs, off on CPU.
    bf16 on CPU runs CPU autocast (slower than fp32 on most CPUs, but allowed); fp16 on CPU is an
    error. `bf16_supported` overrides the GPU capability check (tests).
    """
    if bf16_supported is None:
        bf16_supported = cuda_supports_bf16(device)
    on_gpu = device.type == "cuda"
    if amp == "off":
        return AmpChoice(None, False)
    if amp == "auto":
        if not on_gpu:
            return AmpChoice(None, False)
        return AmpChoice(torch.bfloat16, False) if bf16_supported else AmpChoice(torch.float16, True)
    if amp == "bf16":
        if on_gpu and not bf16_supported:
            raise ConfigError(
                f"{key}=bf16 but this GPU has no bf16 support (needs compute capability 8.0+); use fp16 or auto"
            )
        return AmpChoice(torch.bfloat16, False)
    if amp == "fp16":
        if not on_gpu:
            raise ConfigError(f"{key}=fp16 needs a CUDA device; on CPU use {key}=off (or bf16)")
        return AmpChoice(torch.float16, True)
    raise ConfigError(f"{key}={amp!r}: must be auto, bf16, fp16 or off")


def num_cpu_threads() -> int:
    """CPUs this process may use (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
