"""Running detkit and the torchvision reference the same way: a runner per model (inputs in the
form it takes, RoI counters), one closure per inference or training step, interleaved timing,
memory, profiles and FLOPs.

    runners = {"detkit": DetkitRunner(model), "torchvision": TorchvisionRunner(reference)}
    steps = {name: make_step(r, r.prepare(inputs, device), "train", "fp32", device) for name, r in runners.items()}
    timed = time_interleaved(steps, device, warmup=1, repeats=5)        # {name: {"times_s", ...}}
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import Tensor, nn

from detkit.benchmark.calibration import BenchmarkInputs

if TYPE_CHECKING:
    from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN

    from detkit.modeling.detector import FasterRCNN

logger = logging.getLogger(__name__)


AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Counter:
    """Per-image counts (proposals, RoIs through res5) recorded by hooks while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.values: dict[str, list[int]] = {}

    def record(self, key: str, per_image: Sequence[int]) -> None:
        if self.active:
            self.values.setdefault(key, []).extend(int(v) for v in per_image)

    def reset(self) -> None:
        self.values = {}

    def mean(self, key: str) -> float | None:
        values = self.values.get(key)
        return float(np.mean(values)) if values else None


class DetkitRunner:
    """detkit's model as the benchmark drives it: an ImageBatch (uint8) and padded-free targets."""

    name = "detkit"

    def __init__(self, model: FasterRCNN):
        self.model = model
        # torchvision runs a test batch as one padded tensor; so does detkit here (like with like:
        # its batch-invariant default would run the images one by one).
        model.batch_invariant = False
        self.counter = _Counter()
        model.rpn.register_forward_hook(self._on_rpn)
        heads = model.roi_heads
        sample = heads.label_and_sample_proposals

        def counted_sample(*args, **kwargs):
            out = sample(*args, **kwargs)
            if self.counter.active:  # out[1]: roi_image_idx (R,)
                self.counter.record("rois_train", torch.bincount(out[1], minlength=args[0].shape[0]).tolist())
            return out

        # An instance attribute shadows the method on purpose: the count wraps this model's calls only.
        heads.label_and_sample_proposals = counted_sample  # type: ignore[method-assign]

    def _on_rpn(self, module: nn.Module, args: tuple, output: tuple) -> None:
        if self.counter.active and not module.training:
            self.counter.record("rois_infer", output[1].sum(dim=1).tolist())  # valid (N, P)

    def prepare(self, inputs: BenchmarkInputs, device: torch.device) -> tuple:
        from detkit.structures.image_batch import ImageBatch

        batch = ImageBatch.from_tensors(list(inputs.images), self.model.size_divisibility).to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in inputs.targets]
        return batch, targets

    def infer(self, prepared: tuple) -> list[dict]:
        return self.model(prepared[0])

    def losses(self, prepared: tuple) -> dict[str, Tensor]:
        return self.model(prepared[0], prepared[1])

    def compile(self) -> None:
        self.model.backbone.compile()
        self.model.roi_heads.res5.compile()

    def res5(self) -> nn.Module:
        return self.model.roi_heads.res5


class TorchvisionRunner:
    """torchvision's FasterRCNN: a list of 0..1 float images, labels shifted to 1..K."""

    name = "torchvision"

    def __init__(self, model: TorchvisionFasterRCNN):
        self.model = model
        self.counter = _Counter()
        model.rpn.register_forward_hook(self._on_rpn)
        heads = model.roi_heads
        select = heads.select_training_samples

        def counted_select(proposals, targets):
            out = select(proposals, targets)
            self.counter.record("rois_train", [len(p) for p in out[0]])
            return out

        heads.select_training_samples = counted_select

    def _on_rpn(self, module: nn.Module, args: tuple, output: tuple) -> None:
        if not module.training:
            self.counter.record("rois_infer", [len(b) for b in output[0]])

    def prepare(self, inputs: BenchmarkInputs, device: torch.device) -> tuple:
        from detkit.benchmark.tv_reference import to_torchvision_images, to_torchvision_targets

        images = to_torchvision_images(inputs.images.to(device))
        targets = to_torchvision_targets([{k: v.to(device) for k, v in t.items()} for t in inputs.targets])
        return images, targets

    def infer(self, prepared: tuple) -> list[dict]:
        from detkit.benchmark.tv_reference import from_torchvision_detections

        return from_torchvision_detections(self.model(prepared[0]))

    def losses(self, prepared: tuple) -> dict[str, Tensor]:
        return self.model(prepared[0], prepared[1])

    def compile(self) -> None:
        self.model.backbone.compile()
        self.model.roi_heads.box_head.compile()

    def res5(self) -> nn.Module:
        return self.model.roi_heads.box_head.layer4


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(
    runner: DetkitRunner | TorchvisionRunner, prepared: tuple, mode: str, precision: str, device: torch.device
) -> Callable[[], object]:
    """A closure running one inference ("infer") or one training step ("train": forward, backward,
    SGD step) of `runner` on `prepared` under autocast `precision`.

    Training uses SGD (momentum 0.9, weight decay 1e-4) with lr 0: the optimizer does all its
    arithmetic but the weights stay those both models share, so every repeat runs the same RoIs.
    fp16 adds a GradScaler (as a real fp16 run would).
    """
    amp_dtype = AMP_DTYPES[precision]
    model = runner.model

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    if mode == "infer":
        model.eval()

        def infer_step():
            with torch.no_grad(), autocast():
                return runner.infer(prepared)

        return infer_step

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def train_step():
        with autocast():
            losses = runner.losses(prepared)
        loss = cast(Tensor, sum(losses.values()))  # a sum of loss tensors (typeshed allows the 0 of an empty sum)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    train_step.optimizer = optimizer  # type: ignore[attr-defined]
    return train_step


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the model's parameters and buffers, plus gradients and optimizer state if any."""
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    total += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
    return total


def cpu_step_peak_bytes(step: Callable[[], object]) -> int:
    """Peak of the bytes allocated on the CPU during one call of `step`, above what was allocated
    before it, from torch.profiler's memory records (op granularity, so a lower bound)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def profile_step(step: Callable[[], object], device: torch.device, out_dir: str, tag: str, row_limit: int = 40) -> str:
    """Run `step` once under torch.profiler; write `tag`.txt (ops by self time, then by total time
    with their input shapes) and `tag`.json (a Chrome trace) to out_dir. Returns the .txt path."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        synchronize(device)
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    averages = prof.key_averages()
    text = "\n\n".join(
        [
            f"{tag}: ops by {sort_key}",
            averages.table(sort_by=sort_key, row_limit=row_limit),
            f"{tag}: ops by total time, grouped by input shape",
            prof.key_averages(group_by_input_shape=True).table(
                sort_by=sort_key.replace("self_", ""), row_limit=row_limit
            ),
        ]
    )
    path = out / f"{tag}.txt"
    path.write_text(text + "\n")
    prof.export_chrome_trace(str(out / f"{tag}.json"))
    logger.info("profile of %s written to %s", tag, path)
    return str(path)


def time_interleaved(
    steps: Mapping[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, dict]:
    """Run the steps A, B, A, B, ... (`warmup` untimed rounds, then `repeats` timed rounds) so that
    a noisy machine slows both alike. Returns per name {"times_s": [...], "step_peak_bytes": int or
    None} (CUDA: max_memory_allocated during a step above the allocation before it)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
            synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, int | None] = dict.fromkeys(steps)
    gc.collect()
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - before
                peaks[name] = max(peaks[name] or 0, peak)
    return {name: {"times_s": times[name], "step_peak_bytes": peaks[name]} for name in steps}


def summarize_times(times_s: Sequence[float], batch_size: int) -> dict:
    best, median = min(times_s), statistics.median(times_s)
    return {
        "time_ms_min": 1000 * best,
        "time_ms_median": 1000 * median,
        "ims_per_s_best": batch_size / best,
        "ims_per_s_median": batch_size / median,
        "repeats": len(times_s),
    }


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------

# Dense tensor-core peaks in TFLOP/s (vendor data sheets). The benchmark's fp32 rows run with TF32
# allowed (configure_backends(..., allow_tf32=True) below, training's `allow_tf32: true`), so the
# fp32 peak is the TF32 one.
GPU_PEAK_TFLOPS = {
    "H200": {"fp32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100 PCIe": {"fp32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 494.7, "bf16": 989.4, "fp16": 989.4},  # SXM
    "A100": {"fp32": 156.0, "bf16": 312.0, "fp16": 312.0},
}


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in device_name:
            return peaks[precision]
    return None


def count_flops(step: Callable[[], object], module_prefix: str) -> dict:
    """FLOPs of one call of `step` (torch.utils.flop_counter: matmuls and convolutions, forward and
    backward), in total and in the modules named `module_prefix` + "roi_heads.res5" etc.

    Returns {"total": int, "by_module": {short name: int}} for the top-level stages.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    stages = {
        name[len(module_prefix) :]: value
        for name, value in counts.items()
        if name.startswith(module_prefix) and name[len(module_prefix) :].count(".") <= 1
    }
    return {"total": counts.get("Global", 0), "by_module": stages}
