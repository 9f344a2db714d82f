"""Speed: detkit vs torchvision's FasterRCNN on identical inputs and weights; images/s, memory, FLOPs.

    result = run_speed_benchmark(SpeedOptions(depth=101, batch_sizes=(1, 8), modes=("infer", "train")))

The model gets random weights calibrated to behave like a trained one (calibration.py); the
torchvision reference (tv_reference.py) copies them; both run the same steps interleaved
(timing.py). The result reports the RoIs per image each model ran through res5 and how many of
their detections agree. tools/benchmark.py prints it; BENCHMARKS.md holds the figures.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from detkit.benchmark.calibration import calibrate_, compare_detections, make_inputs
from detkit.benchmark.timing import (
    AMP_DTYPES,
    DetkitRunner,
    TorchvisionRunner,
    count_flops,
    cpu_step_peak_bytes,
    gpu_peak_tflops,
    make_step,
    profile_step,
    state_bytes,
    summarize_times,
    synchronize,
    time_interleaved,
)

logger = logging.getLogger(__name__)


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
    res5_timing: bool | None = None  # None: on for CUDA, off for the CPU (tens of seconds there)
    memory: bool = True
    profile_dir: str | None = None  # write a torch.profiler table + trace of one step per row here
    seed: int = 0


def _mean_or_none(values: Sequence[int]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def time_res5(
    res5: nn.Module,
    num_rois: int,
    in_channels: int,
    resolution: int,
    precision: str,
    train: bool,
    device: torch.device,
    channels_last: bool,
    repeats: int = 5,
) -> float:
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
        with (
            torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext(),
            torch.no_grad() if not train else nullcontext(),
        ):
            out = res5(x).mean(dim=(2, 3))
        if train:
            out.float().sum().backward()
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    res5.zero_grad(set_to_none=True)
    return statistics.median(times)


def run_speed_benchmark(options: SpeedOptions) -> dict:
    """Time detkit and torchvision (module docstring). Returns the JSON-ready result:
    {"settings", "environment", "rows", "ratios", "agreement", "flops"}."""
    from detkit.benchmark.tv_reference import build_torchvision_reference
    from detkit.config import load_config
    from detkit.modeling import build_model
    from detkit.utils.env import configure_backends, resolve_device, seed_all

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
        [
            f"model.depth={options.depth}",
            f"model.num_classes={options.num_classes}",
            "model.roi_heads.aligned=false",
            *options.overrides,
            "model.channels_last=false",
            "model.compile=false",
        ],
    )
    seed_all(options.seed)
    model = build_model(cfg, device=device)
    start = time.perf_counter()
    calibrate_(model, make_inputs(2, height, width, options.num_classes, seed=options.seed + 1).images.to(device))
    logger.info("calibrated the random model on 2 images in %.1f s", time.perf_counter() - start)
    runners: dict[str, DetkitRunner | TorchvisionRunner] = {}
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
                outputs: dict[str, Any] = {}  # infer: per-image detection dicts; train: the summed loss
                for name, runner in runners.items():
                    runner.counter.reset()
                    runner.counter.active = True
                    outputs[name] = steps[name]()
                    synchronize(device)
                    runner.counter.active = False
                logger.info(
                    "%s batch %d %s: first round done; timing %d + %d rounds",
                    mode,
                    batch_size,
                    precision,
                    max(options.warmup - 1, 0),
                    options.repeats,
                )
                timed = time_interleaved(steps, device, max(options.warmup - 1, 0), options.repeats)
                if options.profile_dir:
                    for name in runners:
                        profile_step(
                            steps[name], device, options.profile_dir, f"{name}_{mode}_b{batch_size}_{precision}"
                        )
                for name, runner in runners.items():
                    optimizer = getattr(steps[name], "optimizer", None)
                    static = state_bytes(runner.model, optimizer)
                    step_peak = timed[name]["step_peak_bytes"]
                    if step_peak is None and options.memory:
                        step_peak = cpu_step_peak_bytes(steps[name])
                    counts = runner.counter.values
                    row = {
                        "model": name,
                        "mode": mode,
                        "batch_size": batch_size,
                        "precision": precision,
                        "image_size": [height, width],
                        "channels_last": options.channels_last,
                        "compile": options.compile,
                        **summarize_times(timed[name]["times_s"], batch_size),
                        "peak_mem_mb": (static + step_peak) / 2**20 if step_peak is not None else None,
                        "state_mem_mb": static / 2**20,
                        "times_s": timed[name]["times_s"],
                        "rois_per_image": _mean_or_none(
                            counts.get("rois_infer" if mode == "infer" else "rois_train", [])
                        ),
                    }
                    if mode == "infer":
                        row["detections_per_image"] = float(np.mean([len(d["boxes"]) for d in outputs[name]]))
                    rows.append(row)
                    logger.info(
                        "%s %s batch %d %s: %.2f images/s (median), %.1f RoIs/image",
                        name,
                        mode,
                        batch_size,
                        precision,
                        row["ims_per_s_median"],
                        row["rois_per_image"] or float("nan"),
                    )
                if mode == "infer":
                    if "detkit" in outputs and "torchvision" in outputs:
                        agreement.append(
                            {
                                "what": "detkit vs torchvision",
                                "batch_size": batch_size,
                                "precision": precision,
                                **compare_detections(outputs["detkit"], outputs["torchvision"]),
                            }
                        )
                    for name in outputs:
                        if precision == "fp32":
                            fp32_outputs[(name, batch_size)] = outputs[name]
                        elif (name, batch_size) in fp32_outputs:
                            agreement.append(
                                {
                                    "what": f"{name} {precision} vs fp32",
                                    "batch_size": batch_size,
                                    "precision": precision,
                                    **compare_detections(
                                        outputs[name], fp32_outputs[(name, batch_size)], iou_thresh=0.9
                                    ),
                                }
                            )
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


def _flops_of(
    runner: DetkitRunner | TorchvisionRunner, prepared: tuple, mode: str, batch_size: int, device: torch.device
) -> dict:
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
        out.append(
            {
                "mode": mode,
                "batch_size": batch_size,
                "precision": precision,
                "speedup_median": dk["ims_per_s_median"] / tv["ims_per_s_median"],
                "speedup_best": dk["ims_per_s_best"] / tv["ims_per_s_best"],
                "memory_ratio": (dk["peak_mem_mb"] / tv["peak_mem_mb"])
                if dk["peak_mem_mb"] and tv["peak_mem_mb"]
                else None,
            }
        )
    return out


def _add_flop_rates(
    result: dict, runners: dict, device: torch.device, res5_timing: bool, options: SpeedOptions, cfg
) -> None:
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
            num_rois = round(row["rois_per_image"] * row["batch_size"])
            seconds = time_res5(
                runner.res5(),
                num_rois,
                runner.model.backbone.out_channels,
                cfg.model.roi_heads.pooler_resolution,
                row["precision"],
                row["mode"] == "train",
                device,
                options.channels_last,
            )
            res5_tflops = counted["res5_gflops_per_roi"] * num_rois / seconds / 1e3
            row["res5_ms"] = 1000 * seconds
            row["res5_achieved_tflops"] = res5_tflops
            row["res5_fraction_of_peak"] = res5_tflops / peak if peak else None
