"""Speed measurement: detkit vs torchvision's FasterRCNN on identical inputs, FLOPs, COCO evaluation.

    model = build_benchmark_model(depth=101, num_classes=80)          # random weights, calibrated
    inputs = make_inputs(batch_size=1, height=480, width=640)
    calibrate_(model, inputs.images)
    reference = build_torchvision_reference(model, (480, 640))         # detkit/utils/tv_reference.py
    rows = time_models({"detkit": ..., "torchvision": ...}, repeats=3, warmup=1)

What `tools/benchmark.py` (detkit/cli/benchmark.py) is made of; see BENCHMARKS.md for figures.

Like with like (shared/DESIGN.md): no trained weights are available offline, and with random
weights an R101 trunk with identity FrozenBN blows activations up and the RPN scores are flat, so
`calibrate_` first makes a random model behave like a trained one where it matters for speed:
- every FrozenBN gets the mean/variance of its input on the benchmark images (unit activations);
- the RPN head is rescaled so objectness logits have std ~1 and box deltas ~0.1 (spread-out scores,
  boxes near their anchors: NMS keeps the full post-NMS top-k);
- the box predictor gives class logits of std ~3 and the background logit a bias chosen so that
  about `candidates_per_roi` (RoI, class) pairs per RoI pass the 0.05 score threshold (a trained
  COCO model gives a few hundred to a few thousand candidates per image before NMS).
The same tensors are then copied into the torchvision model, and the benchmark reports the RoIs
per image each model ran through res5 and how many of their detections agree.

Shapes: N images, H x W input, G ground-truth boxes per image, K classes.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_iou, roi_align

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Inputs and calibration
# --------------------------------------------------------------------------------------------


@dataclass
class BenchmarkInputs:
    """images: (N, 3, H, W) uint8 0..255 (RGB); targets: per image {"boxes": (G, 4) xyxy,
    "labels": (G,) in [0, K)}."""

    images: Tensor
    targets: list[dict]


def make_inputs(
    batch_size: int, height: int, width: int, num_classes: int = 80, boxes_per_image: int = 8, seed: int = 0
) -> BenchmarkInputs:
    """Smooth random images (low-frequency colour noise plus a little pixel noise: real images have
    both) and random ground-truth boxes of 32 px up to half the short side."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, max(height // 32, 1), max(width // 32, 1), generator=g)
    images = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    images = (images * 200 + torch.rand(batch_size, 3, height, width, generator=g) * 55).clamp(0, 255).to(torch.uint8)
    targets = []
    max_side = max(min(height, width) // 2, 33)
    for _ in range(batch_size):
        wh = torch.randint(32, max_side, (boxes_per_image, 2), generator=g).float()
        x1 = (torch.rand(boxes_per_image, generator=g) * (width - wh[:, 0])).floor()
        y1 = (torch.rand(boxes_per_image, generator=g) * (height - wh[:, 1])).floor()
        boxes = torch.stack((x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]), dim=1)  # (G, 4)
        labels = torch.randint(0, num_classes, (boxes_per_image,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return BenchmarkInputs(images, targets)


@contextmanager
def _frozen_bn_calibration(module: nn.Module) -> Iterator[None]:
    """While active, every FrozenBatchNorm2d in `module` first sets its running mean/var to the
    per-channel statistics of its input (so its output has zero mean and unit variance per
    channel): one forward pass calibrates all layers in order."""
    from detkit.modeling.backbone import FrozenBatchNorm2d

    def hook(bn: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(x.var(dim=(0, 2, 3)).clamp(min=1e-4))
        bn.weight.fill_(1.0)
        bn.bias.zero_()

    handles = [m.register_forward_pre_hook(hook) for m in module.modules() if isinstance(m, FrozenBatchNorm2d)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _rescale_(layer: nn.Module, x: Tensor, target_std: float, generator: torch.Generator) -> Tensor:
    """Redraw a conv/linear layer's weights N(0, s^2) with s chosen so its output on `x` has std
    `target_std`, zero its bias; returns the new output."""
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
        layer.bias.zero_()
        out = layer(x)
        layer.weight.mul_(target_std / out.float().std().clamp(min=1e-12))
        return layer(x)


@torch.no_grad()
def calibrate_(
    model: nn.Module,
    images: Tensor,
    rpn_logit_std: float = 1.0,
    rpn_delta_std: float = 0.1,
    cls_logit_std: float = 3.0,
    box_delta_std: float = 0.5,
    candidates_per_roi: float = 1.0,
    rois_per_image: int = 16,
    seed: int = 0,
) -> None:
    """Make a randomly initialised detkit FasterRCNN produce realistic activations (see the module
    docstring). images: (N, 3, H, W) 0..255. Changes the model's FrozenBN statistics and its RPN
    head and box predictor weights in place; the trunk and res5 convolutions are kept."""
    from detkit.structures.image_batch import ImageBatch

    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    device = model.pixel_mean.device
    batch = ImageBatch.from_tensors(list(images), model.size_divisibility).to(device)
    x = model.normalize(batch)
    with _frozen_bn_calibration(model.backbone):
        features = model.backbone(x)  # (N, C4, H/16, W/16)

    head = model.rpn.head
    hidden = F.relu(_rescale_(head.conv, features, 1.0, g))
    _rescale_(head.objectness_logits, hidden, rpn_logit_std, g)
    _rescale_(head.anchor_deltas, hidden, rpn_delta_std, g)

    # res5 on random boxes (between 32 px and the whole image) instead of real proposals.
    n, _, fh, fw = features.shape
    h, w = fh * 16.0, fw * 16.0
    xy = torch.rand(n * rois_per_image, 2, generator=g) * torch.tensor([w, h]) * 0.75
    wh = 32 + torch.rand(n * rois_per_image, 2, generator=g) * (torch.tensor([w, h]) - xy - 32).clamp(min=1)
    rois = torch.cat((torch.arange(n).repeat_interleave(rois_per_image)[:, None].float(), xy, xy + wh), dim=1)
    heads = model.roi_heads
    crops = roi_align(features, rois.to(features), heads.pooler_resolution, heads.spatial_scale, heads.sampling_ratio, heads.aligned)
    with _frozen_bn_calibration(heads.res5):
        pooled = heads.res5(crops).mean(dim=(2, 3))  # (R, C5)

    predictor = heads.box_predictor
    logits = _rescale_(predictor.cls_score, pooled, cls_logit_std, g)
    _rescale_(predictor.bbox_pred, pooled, box_delta_std, g)
    # Background is the last logit: raise it until about `candidates_per_roi` scores pass 0.05.
    low, high = -30.0, 30.0
    for _ in range(40):
        bias = 0.5 * (low + high)
        shifted = logits.clone()
        shifted[:, -1] += bias
        count = (F.softmax(shifted, dim=1)[:, :-1] > heads.score_thresh).sum(dim=1).float().mean()
        low, high = (bias, high) if count > candidates_per_roi else (low, bias)
    predictor.cls_score.bias[-1] = 0.5 * (low + high)
    model.train(was_training)


# --------------------------------------------------------------------------------------------
# Comparing detections
# --------------------------------------------------------------------------------------------


def compare_detections(a: Sequence[dict], b: Sequence[dict], iou_thresh: float = 0.99) -> dict:
    """How far two models' detections on the same images agree.

    a, b: per image {"boxes": (D, 4), "scores": (D,), "labels": (D,)}. A detection of `a` is matched
    to the unmatched detection of `b` with the same label and the highest IoU (>= iou_thresh).
    Returns {"num_a", "num_b", "matched", "match_fraction" (matched / max(num_a, num_b), 1.0 when
    both are empty), "max_box_diff" (px), "max_score_diff"} over matched pairs.
    """
    num_a = num_b = matched = 0
    max_box = max_score = 0.0
    for da, db in zip(a, b):
        ba, bb = da["boxes"].detach().float().cpu(), db["boxes"].detach().float().cpu()
        num_a += ba.shape[0]
        num_b += bb.shape[0]
        if ba.shape[0] == 0 or bb.shape[0] == 0:
            continue
        iou = box_iou(ba, bb)  # (Da, Db)
        iou[da["labels"].cpu()[:, None] != db["labels"].cpu()[None, :]] = -1.0
        taken = torch.zeros(bb.shape[0], dtype=torch.bool)
        for i in range(ba.shape[0]):
            row = iou[i].masked_fill(taken, -1.0)
            j = int(row.argmax())
            if row[j] >= iou_thresh:
                taken[j] = True
                matched += 1
                max_box = max(max_box, float((ba[i] - bb[j]).abs().max()))
                max_score = max(max_score, float((da["scores"][i].float() - db["scores"][j].float()).abs()))
    total = max(num_a, num_b)
    return {
        "num_a": num_a,
        "num_b": num_b,
        "matched": matched,
        "match_fraction": matched / total if total else 1.0,
        "max_box_diff": max_box,
        "max_score_diff": max_score,
    }


# --------------------------------------------------------------------------------------------
# Running both models the same way
# --------------------------------------------------------------------------------------------

AMP_DTYPES: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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

    def mean(self, key: str) -> Optional[float]:
        values = self.values.get(key)
        return float(np.mean(values)) if values else None


class DetkitRunner:
    """detkit's model as the benchmark drives it: an ImageBatch (uint8) and padded-free targets."""

    name = "detkit"

    def __init__(self, model: nn.Module):
        self.model = model
        self.counter = _Counter()
        model.rpn.register_forward_hook(self._on_rpn)
        heads = model.roi_heads
        sample = heads.label_and_sample_proposals

        def counted_sample(*args, **kwargs):
            out = sample(*args, **kwargs)
            if self.counter.active:  # out[1]: roi_image_idx (R,)
                self.counter.record("rois_train", torch.bincount(out[1], minlength=args[0].shape[0]).tolist())
            return out

        heads.label_and_sample_proposals = counted_sample

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

    def __init__(self, model: nn.Module):
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
        from detkit.utils.tv_reference import to_torchvision_images, to_torchvision_targets

        images = to_torchvision_images(inputs.images.to(device))
        targets = to_torchvision_targets([{k: v.to(device) for k, v in t.items()} for t in inputs.targets])
        return images, targets

    def infer(self, prepared: tuple) -> list[dict]:
        from detkit.utils.tv_reference import from_torchvision_detections

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


def make_step(runner, prepared: tuple, mode: str, precision: str, device: torch.device) -> Callable[[], object]:
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
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    train_step.optimizer = optimizer  # type: ignore[attr-defined]
    return train_step


def state_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
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
    text = "\n\n".join([
        f"{tag}: ops by {sort_key}",
        averages.table(sort_by=sort_key, row_limit=row_limit),
        f"{tag}: ops by total time, grouped by input shape",
        prof.key_averages(group_by_input_shape=True).table(sort_by=sort_key.replace("self_", ""), row_limit=row_limit),
    ])
    path = out / f"{tag}.txt"
    path.write_text(text + "\n")
    prof.export_chrome_trace(str(out / f"{tag}.json"))
    logger.info("profile of %s written to %s", tag, path)
    return str(path)


def time_interleaved(
    steps: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, dict]:
    """Run the steps A, B, A, B, ... (`warmup` untimed rounds, then `repeats` timed rounds) so that
    a noisy machine slows both alike. Returns per name {"times_s": [...], "step_peak_bytes": int or
    None} (CUDA: max_memory_allocated during a step above the allocation before it)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
            synchronize(device)
    times = {name: [] for name in steps}
    peaks: dict[str, Optional[int]] = {name: None for name in steps}
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


def gpu_peak_tflops(device_name: str, precision: str) -> Optional[float]:
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
        name[len(module_prefix):]: value
        for name, value in counts.items()
        if name.startswith(module_prefix) and name[len(module_prefix):].count(".") <= 1
    }
    return {"total": counts.get("Global", 0), "by_module": stages}


# --------------------------------------------------------------------------------------------
# The speed benchmark
# --------------------------------------------------------------------------------------------


@dataclass
class SpeedOptions:
    """What `run_speed_benchmark` measures (the flags of tools/benchmark.py).

    overrides: dotted detkit config overrides (e.g. "model.rpn.post_nms_topk_test=1000"); they
    reach the torchvision model too, since it copies detkit's hyper-parameters.
    """

    device: str = "auto"
    depth: int = 101
    image_size: tuple[int, int] = (800, 1333)  # (h, w)
    batch_sizes: tuple[int, ...] = (1,)
    modes: tuple[str, ...] = ("infer", "train")
    precisions: tuple[str, ...] = ("fp32",)
    channels_last: bool = False
    compile: bool = False
    warmup: int = 3
    repeats: int = 10
    num_classes: int = 80
    overrides: tuple[str, ...] = ()
    models: tuple[str, ...] = ("detkit", "torchvision")
    flops: bool = True
    res5_timing: Optional[bool] = None  # None: on for CUDA, off for the CPU (tens of seconds there)
    memory: bool = True
    profile_dir: Optional[str] = None  # write a torch.profiler table + trace of one step per row here
    seed: int = 0


def _mean_or_none(values: Sequence[int]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def time_res5(res5: nn.Module, num_rois: int, in_channels: int, resolution: int, precision: str, train: bool,
              device: torch.device, channels_last: bool, repeats: int = 5) -> float:
    """Median seconds of res5 alone on (num_rois, C4, 14, 14) random crops: forward (inference) or
    forward + backward (training)."""
    x = torch.randn(num_rois, in_channels, resolution, resolution, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # In a training step the crops come from the trainable trunk: res5 also computes their gradient.
    x.requires_grad_(train)
    amp_dtype = AMP_DTYPES[precision]
    times = []
    for i in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            with torch.no_grad() if not train else nullcontext():
                out = res5(x).mean(dim=(2, 3))
        if train:
            out.float().sum().backward()
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    res5.zero_grad(set_to_none=True)
    return statistics.median(times)


def run_speed_benchmark(options: SpeedOptions) -> dict:
    """Time detkit and torchvision (see the module docstring). Returns the JSON-ready result:
    {"settings", "environment", "rows", "ratios", "agreement", "flops"}."""
    from detkit.config import load_config
    from detkit.modeling import build_model
    from detkit.utils.env import configure_backends, resolve_device, seed_all
    from detkit.utils.tv_reference import build_torchvision_reference

    device = resolve_device(options.device)
    # Fixed input sizes: cuDNN's autotuning pays off here; fp32 rows use TF32 tensor cores.
    configure_backends(device, cudnn_benchmark=True, allow_tf32=True)
    for precision in options.precisions:
        if precision not in AMP_DTYPES:
            raise ValueError(f"precision {precision!r}: use fp32, bf16 or fp16")
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("fp16 autocast needs a CUDA device; on the CPU use fp32 or bf16")
    height, width = options.image_size
    cfg = load_config(
        None,
        [f"model.depth={options.depth}", f"model.num_classes={options.num_classes}", "model.roi_heads.aligned=false",
         *options.overrides, "model.channels_last=false", "model.compile=false"],
    )
    seed_all(options.seed)
    model = build_model(cfg, device=device)
    start = time.perf_counter()
    calibrate_(model, make_inputs(2, height, width, options.num_classes, seed=options.seed + 1).images.to(device))
    logger.info("calibrated the random model on 2 images in %.1f s", time.perf_counter() - start)
    runners = {}
    if "detkit" in options.models:
        runners["detkit"] = DetkitRunner(model)
    if "torchvision" in options.models:
        runners["torchvision"] = TorchvisionRunner(build_torchvision_reference(model, (height, width)).to(device))
    for runner in runners.values():
        if options.channels_last:
            runner.model.to(memory_format=torch.channels_last)
        if options.compile:
            runner.compile()

    rows, agreement, flops = [], [], {}
    fp32_outputs: dict[tuple[str, int], list[dict]] = {}
    res5_timing = options.res5_timing if options.res5_timing is not None else device.type == "cuda"
    for mode in options.modes:
        for batch_size in options.batch_sizes:
            inputs = make_inputs(batch_size, height, width, options.num_classes, seed=options.seed)
            prepared = {name: r.prepare(inputs, device) for name, r in runners.items()}
            for precision in options.precisions:
                steps = {name: make_step(r, prepared[name], mode, precision, device) for name, r in runners.items()}
                # First round: count proposals/RoIs and keep the detections, then warm up and time.
                outputs = {}
                for name, runner in runners.items():
                    runner.counter.reset()
                    runner.counter.active = True
                    outputs[name] = steps[name]()
                    synchronize(device)
                    runner.counter.active = False
                logger.info("%s batch %d %s: first round done; timing %d + %d rounds", mode, batch_size, precision,
                            max(options.warmup - 1, 0), options.repeats)
                timed = time_interleaved(steps, device, max(options.warmup - 1, 0), options.repeats)
                if options.profile_dir:
                    for name in runners:
                        profile_step(steps[name], device, options.profile_dir, f"{name}_{mode}_b{batch_size}_{precision}")
                for name, runner in runners.items():
                    optimizer = getattr(steps[name], "optimizer", None)
                    static = state_bytes(runner.model, optimizer)
                    step_peak = timed[name]["step_peak_bytes"]
                    if step_peak is None and options.memory:
                        step_peak = cpu_step_peak_bytes(steps[name])
                    counts = runner.counter.values
                    row = {
                        "model": name, "mode": mode, "batch_size": batch_size, "precision": precision,
                        "image_size": [height, width], "channels_last": options.channels_last, "compile": options.compile,
                        **summarize_times(timed[name]["times_s"], batch_size),
                        "peak_mem_mb": (static + step_peak) / 2**20 if step_peak is not None else None,
                        "state_mem_mb": static / 2**20,
                        "times_s": timed[name]["times_s"],
                        "rois_per_image": _mean_or_none(counts.get("rois_infer" if mode == "infer" else "rois_train", [])),
                    }
                    if mode == "infer":
                        row["detections_per_image"] = float(np.mean([len(d["boxes"]) for d in outputs[name]]))
                    rows.append(row)
                    logger.info("%s %s batch %d %s: %.2f images/s (median), %.1f RoIs/image", name, mode, batch_size,
                                precision, row["ims_per_s_median"], row["rois_per_image"] or float("nan"))
                if mode == "infer":
                    if "detkit" in outputs and "torchvision" in outputs:
                        agreement.append({"what": "detkit vs torchvision", "batch_size": batch_size, "precision": precision,
                                          **compare_detections(outputs["detkit"], outputs["torchvision"])})
                    for name in outputs:
                        if precision == "fp32":
                            fp32_outputs[(name, batch_size)] = outputs[name]
                        elif (name, batch_size) in fp32_outputs:
                            agreement.append({"what": f"{name} {precision} vs fp32", "batch_size": batch_size, "precision": precision,
                                              **compare_detections(outputs[name], fp32_outputs[(name, batch_size)], iou_thresh=0.9)})
                del steps, outputs, timed
                gc.collect()
            if options.flops and "detkit" in runners and mode not in flops:
                flops[mode] = _flops_of(runners["detkit"], prepared["detkit"], mode, batch_size, device)
            del prepared

    result = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.__dict__.items()},
        "rows": rows,
        "ratios": _ratios(rows),
        "agreement": agreement,
        "flops": flops,
    }
    if flops:
        _add_flop_rates(result, runners, device, res5_timing, options, cfg)
    return result


def _flops_of(runner: DetkitRunner, prepared: tuple, mode: str, batch_size: int, device: torch.device) -> dict:
    """FLOPs per image of one fp32 step of detkit, total and res5, with the RoIs it ran."""
    step = make_step(runner, prepared, mode, "fp32", device)
    runner.counter.reset()
    runner.counter.active = True
    counted = count_flops(step, "FasterRCNN.")
    runner.counter.active = False
    rois = runner.counter.values.get("rois_infer" if mode == "infer" else "rois_train", [])
    res5 = counted["by_module"].get("roi_heads.res5", 0)
    return {
        "batch_size": batch_size,
        "gflops_per_image": counted["total"] / batch_size / 1e9,
        "res5_gflops_per_image": res5 / batch_size / 1e9,
        "res5_share": res5 / max(counted["total"], 1),
        "res5_gflops_per_roi": res5 / max(sum(rois), 1) / 1e9,
        "rois_per_image": _mean_or_none(rois),
        "by_module_gflops_per_image": {k: v / batch_size / 1e9 for k, v in sorted(counted["by_module"].items())},
    }


def _ratios(rows: list[dict]) -> list[dict]:
    """detkit / torchvision for each (mode, batch, precision) both ran."""
    out = []
    by_key = {(r["model"], r["mode"], r["batch_size"], r["precision"]): r for r in rows}
    for (model, mode, batch_size, precision), dk in by_key.items():
        tv = by_key.get(("torchvision", mode, batch_size, precision))
        if model != "detkit" or tv is None:
            continue
        out.append({
            "mode": mode, "batch_size": batch_size, "precision": precision,
            "speedup_median": dk["ims_per_s_median"] / tv["ims_per_s_median"],
            "speedup_best": dk["ims_per_s_best"] / tv["ims_per_s_best"],
            "memory_ratio": (dk["peak_mem_mb"] / tv["peak_mem_mb"]) if dk["peak_mem_mb"] and tv["peak_mem_mb"] else None,
        })
    return out


def _add_flop_rates(result: dict, runners: dict, device: torch.device, res5_timing: bool, options: SpeedOptions, cfg) -> None:
    """Achieved TFLOP/s of each detkit row (FLOPs per image x images/s), its fraction of the GPU's
    peak, and (res5_timing) the same for res5 alone on the RoIs of that row."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for row in result["rows"]:
        counted = result["flops"].get(row["mode"])
        if counted is None or row["model"] != "detkit":
            continue
        achieved = counted["gflops_per_image"] * row["ims_per_s_median"] / 1e3
        peak = gpu_peak_tflops(device_name, row["precision"]) if device.type == "cuda" else None
        row["achieved_tflops"] = achieved
        row["fraction_of_peak"] = achieved / peak if peak else None
        if res5_timing and row["rois_per_image"]:
            runner = runners["detkit"]
            num_rois = int(round(row["rois_per_image"] * row["batch_size"]))
            seconds = time_res5(runner.res5(), num_rois, runner.model.backbone.out_channels,
                                cfg.model.roi_heads.pooler_resolution, row["precision"], row["mode"] == "train",
                                device, options.channels_last)
            res5_tflops = counted["res5_gflops_per_roi"] * num_rois / seconds / 1e3
            row["res5_ms"] = 1000 * seconds
            row["res5_achieved_tflops"] = res5_tflops
            row["res5_fraction_of_peak"] = res5_tflops / peak if peak else None


# --------------------------------------------------------------------------------------------
# COCO evaluation timing
# --------------------------------------------------------------------------------------------

# COCO's 80 category ids (1..90 with gaps), so the synthetic set looks like val2017 to the tools.
COCO_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
]


def make_synthetic_coco(num_images: int = 5000, dets_per_image: int = 100, seed: int = 0) -> tuple[dict, list[dict]]:
    """A COCO-val-like ground truth and a detector-like result list, generated.

    Ground truth: `num_images` images of 640 x 480 / 480 x 640 / 640 x 427, 0..20 boxes each
    (mean ~7, COCO val2017 has 7.3), sides log-uniform in 4..~0.9 x the image (small, medium and
    large all occur), 80 categories with COCO's ids, 1% crowd.
    Results: exactly `dets_per_image` per image: up to 3 jittered copies of each GT box with its
    category (scores 0.3..1), the rest random boxes of random categories (scores 0..0.6).
    Returns (gt_dataset_dict, predictions).
    """
    rng = np.random.default_rng(seed)
    sizes = np.array([[480, 640], [640, 480], [427, 640]])
    images, annotations, predictions = [], [], []
    categories = [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in COCO_CATEGORY_IDS]
    cat_ids = np.array(COCO_CATEGORY_IDS)
    for image_id in range(1, num_images + 1):
        h, w = (int(v) for v in sizes[rng.integers(len(sizes))])
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id:012d}.jpg"})
        num_gt = int(min(rng.poisson(7.0), 20))
        side_max = np.array([w, h]) * 0.9
        bw = np.exp(rng.uniform(np.log(4), np.log(side_max[0]), num_gt))
        bh = np.clip(bw * np.exp(rng.normal(0, 0.5, num_gt)), 4, side_max[1])
        x = rng.uniform(0, 1, num_gt) * (w - bw)
        y = rng.uniform(0, 1, num_gt) * (h - bh)
        gt_cats = cat_ids[rng.integers(len(cat_ids), size=num_gt)]
        crowd = rng.uniform(size=num_gt) < 0.01
        for i in range(num_gt):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(gt_cats[i]),
                "bbox": [round(float(x[i]), 2), round(float(y[i]), 2), round(float(bw[i]), 2), round(float(bh[i]), 2)],
                "area": float(bw[i] * bh[i]), "iscrowd": int(crowd[i]),
            })
        # Detections: jittered copies of the GT first, then random boxes.
        copies = rng.integers(1, 4, size=num_gt) if num_gt else np.zeros(0, dtype=np.int64)
        src = np.repeat(np.arange(num_gt), copies)[:dets_per_image]
        num_true = len(src)
        jitter = rng.normal(0, 0.08, (num_true, 4))
        det_w = bw[src] * np.exp(jitter[:, 2])
        det_h = bh[src] * np.exp(jitter[:, 3])
        det_x = x[src] + jitter[:, 0] * bw[src]
        det_y = y[src] + jitter[:, 1] * bh[src]
        det_cat = gt_cats[src]
        det_score = rng.uniform(0.3, 1.0, num_true)
        num_rand = dets_per_image - num_true
        rand_w = np.exp(rng.uniform(np.log(4), np.log(side_max[0]), num_rand))
        rand_h = np.clip(rand_w * np.exp(rng.normal(0, 0.5, num_rand)), 4, side_max[1])
        det_x = np.concatenate((det_x, rng.uniform(0, 1, num_rand) * (w - rand_w)))
        det_y = np.concatenate((det_y, rng.uniform(0, 1, num_rand) * (h - rand_h)))
        det_w = np.concatenate((det_w, rand_w))
        det_h = np.concatenate((det_h, rand_h))
        det_cat = np.concatenate((det_cat, cat_ids[rng.integers(len(cat_ids), size=num_rand)]))
        det_score = np.concatenate((det_score, rng.uniform(0.0, 0.6, num_rand)))
        boxes = np.round(np.stack((det_x, det_y, det_w, det_h), axis=1), 2).tolist()
        predictions.extend(
            {"image_id": image_id, "category_id": c, "bbox": b, "score": round(s, 5)}
            for b, c, s in zip(boxes, det_cat.tolist(), det_score.tolist())
        )
    gt = {"info": {"description": "detkit synthetic COCO-like set"}, "images": images, "annotations": annotations,
          "categories": categories}
    return gt, predictions


def _quiet() -> object:
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())


def time_pycocotools(gt_file: str, predictions: list[dict]) -> dict:
    """COCOeval used directly (the usual script): loadRes + evaluate + accumulate + summarize.
    Returns {"load_gt_s", "eval_s", "AP"}."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    start = time.perf_counter()
    with _quiet():
        coco_gt = COCO(gt_file)
    load_gt = time.perf_counter() - start
    results = [dict(p) for p in predictions]  # loadRes adds keys to the dicts it gets
    start = time.perf_counter()
    with _quiet():
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {"load_gt_s": load_gt, "eval_s": time.perf_counter() - start, "AP": float(coco_eval.stats[0] * 100)}


def time_detkit_evaluator(gt_file: str, predictions: list[dict], backend: str) -> dict:
    """detkit's COCOEvaluator: construction (reads and checks the GT) and `evaluate` (checks the
    predictions, indexes them, runs the backend). Returns {"load_gt_s", "eval_s", "AP"}."""
    from detkit.engine.evaluator import COCOEvaluator

    start = time.perf_counter()
    evaluator = COCOEvaluator(gt_file, backend=backend)
    load_gt = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluator.evaluate(predictions)
    return {"load_gt_s": load_gt, "eval_s": time.perf_counter() - start, "AP": float(metrics["AP"])}


def run_eval_benchmark(num_images: int = 5000, dets_per_image: int = 100, repeats: int = 1,
                       backends: Sequence[str] = ("pycocotools", "faster_coco_eval"), workdir: Optional[str] = None,
                       seed: int = 0) -> dict:
    """Time COCO box evaluation of a generated set (see `make_synthetic_coco`): pycocotools'
    COCOeval directly, then detkit's COCOEvaluator with each backend, `repeats` times each,
    interleaved. Returns {"settings", "rows": [{"evaluator", "eval_s_min", "eval_s_median",
    "load_gt_s", "AP"}], "max_ap_difference"}."""
    import json
    import tempfile
    from pathlib import Path

    from detkit.engine.evaluator import available_backends

    start = time.perf_counter()
    gt, predictions = make_synthetic_coco(num_images, dets_per_image, seed)
    generate_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        gt_file = str(Path(tmp) / "synthetic_gt.json")
        Path(gt_file).write_text(json.dumps(gt))
        runs: dict[str, Callable[[], dict]] = {"pycocotools COCOeval (direct)": lambda: time_pycocotools(gt_file, predictions)}
        usable = available_backends()
        for backend in backends:
            if backend not in usable:
                logger.warning("backend %s does not import here: not timed", backend)
                continue
            runs[f"detkit COCOEvaluator ({backend})"] = lambda b=backend: time_detkit_evaluator(gt_file, predictions, b)
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                results[name].append(run())
                logger.info("%s: %.2f s", name, results[name][-1]["eval_s"])
    rows = []
    for name, rs in results.items():
        times = [r["eval_s"] for r in rs]
        rows.append({"evaluator": name, "eval_s_min": min(times), "eval_s_median": statistics.median(times),
                     "load_gt_s": statistics.median(r["load_gt_s"] for r in rs), "AP": rs[0]["AP"], "repeats": len(rs)})
    aps = [r["AP"] for r in rows]
    return {
        "settings": {"num_images": num_images, "dets_per_image": dets_per_image, "num_predictions": len(predictions),
                     "num_gt_boxes": len(gt["annotations"]), "repeats": repeats, "generate_s": generate_s, "seed": seed},
        "rows": rows,
        "max_ap_difference": max(aps) - min(aps) if aps else None,
    }


# --------------------------------------------------------------------------------------------
# Accuracy and wall time of a real training run, detkit vs torchvision
# --------------------------------------------------------------------------------------------


def run_accuracy_comparison(cfg, output_dir: str) -> dict:
    """Train `cfg` twice from the same initial weights, through the same loader, optimizer,
    schedule, AMP setting and evaluator: once detkit's model, once torchvision's FasterRCNN
    (`TorchvisionDetector`); each evaluates on cfg.data.test at the end.

    The runs go one after the other (detkit first) into output_dir/detkit and
    output_dir/torchvision. Returns {"detkit": summary, "torchvision": summary} with the Trainer's
    summary (wall_time_s = training only, s_per_iter, eval {"bbox/AP", ...}).
    """
    from pathlib import Path

    from detkit.config import replace
    from detkit.engine.trainer import Trainer
    from detkit.modeling import build_model
    from detkit.utils.env import seed_all
    from detkit.utils.tv_reference import TorchvisionDetector, build_torchvision_reference

    seed_all(cfg.seed)
    detkit_model = build_model(cfg)  # loads model.weights / backbone weights if the config names them
    # Copies every tensor before detkit's run changes them: both start from the same weights.
    reference = build_torchvision_reference(detkit_model)
    if cfg.model.channels_last:
        reference.to(memory_format=torch.channels_last)
    if cfg.model.compile:
        reference.backbone.compile()
        reference.roi_heads.box_head.compile()
    models = {"detkit": detkit_model, "torchvision": TorchvisionDetector(reference)}
    summaries = {}
    for name, model in models.items():
        run_cfg = replace(cfg, **{"output_dir": str(Path(output_dir) / name)})
        logger.info("training %s for %d iterations into %s", name, cfg.solver.max_iter, run_cfg.output_dir)
        summaries[name] = Trainer(run_cfg, model=model).train()
        models[name] = None  # free the first model's memory before the second run
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return summaries
