"""What batch-invariant inference costs, and a check that it holds: batch 1 vs batch N, on/off.

A calibrated random R101-C4 in Detectron2's layout (configs/frcnn_r101_detectron2.yaml: BGR, MSRA
statistics, stride in the 1x1 convs, no padding to a multiple; detkit.benchmark.calibration makes
its scores behave like a trained model's) detects N smooth random images of mixed sizes (COCO-like
aspect ratios, scaled by --scale) three ways, interleaved round by round so that a drift of the
machine's speed hits all three:
  batch1:        each image alone (a batch of one; batch invariance changes nothing there);
  batchN_inv:    one batch of N, test.batch_invariant true (each image on its own input);
  batchN_padded: one batch of N, test.batch_invariant false (one padded tensor, Detectron2's way).
Prints min / median seconds per image of each and the ratios of the medians to batch1, and checks
that batchN_inv gives every image its batch-1 detections: bit for bit (counted), else within 1e-4
score and 1e-3 px with the same labels. Exits 1 when that check fails (benchmarks/gpu_check.py
runs this on the GPU), 0 otherwise. It also reports how far batchN_padded moves the detections.

    python -m benchmarks.batch_invariance --device cpu --threads 2 --rounds 5 --scale 0.5
    python -m benchmarks.batch_invariance --device cuda --rounds 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from detkit.benchmark.calibration import calibrate_
from detkit.config import load_config
from detkit.modeling import build_model
from detkit.structures import ImageBatch

# (h, w) of Detectron2-resized COCO images (short side 800 for 4:3, 3:4, 16:9, 1:1 photos).
SIZES = [(800, 1067), (800, 600), (750, 1333), (800, 800), (800, 1201), (1067, 800), (800, 1000), (600, 800)]
SCORE_TOL = 1e-4
BOX_TOL_PX = 1e-3
R101_DETECTRON2 = [
    "model.depth=101",
    "model.backbone.weights=",
    "model.backbone.stride_in_1x1=true",
    "model.input_format=BGR",
    "model.pixel_mean=[103.53, 116.28, 123.675]",
    "model.pixel_std=[1.0, 1.0, 1.0]",
    "data.size_divisibility=0",
]


def smooth_image(h: int, w: int, seed: int) -> torch.Tensor:
    """(3, h, w) uint8: low-frequency colour blobs plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(h // 32, 2), max(w // 32, 2), generator=g)
    image = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (image * 200 + torch.rand(3, h, w, generator=g) * 55).clamp(0, 255).to(torch.uint8)


def compare(alone: dict, batched: dict) -> dict:
    """{"bit_identical", "same_labels", "score", "box_px"} of one image's two detection lists."""
    same_count = len(alone["scores"]) == len(batched["scores"])
    same_labels = same_count and torch.equal(alone["labels"], batched["labels"])
    if not same_labels:
        return {"bit_identical": False, "same_labels": False, "score": float("inf"), "box_px": float("inf")}
    n = len(alone["scores"])
    return {
        "bit_identical": torch.equal(alone["scores"], batched["scores"])
        and torch.equal(alone["boxes"], batched["boxes"]),
        "same_labels": True,
        "score": (alone["scores"] - batched["scores"]).abs().max().item() if n else 0.0,
        "box_px": (alone["boxes"] - batched["boxes"]).abs().max().item() if n else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batch_invariance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="N images (the first N of the size list, cycled)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the image sizes (0.5 for a quick CPU run)")
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("overrides", nargs="*", help="config overrides on top of the R101-C4 Detectron2 layout")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cfg = load_config(None, ["device=" + args.device, *R101_DETECTRON2, *args.overrides])
    model = build_model(cfg, device, load_weights=False)
    sizes = [
        (max(int(h * args.scale), 32), max(int(w * args.scale), 32))
        for h, w in (SIZES[i % len(SIZES)] for i in range(args.batch_size))
    ]
    images = [smooth_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    calibrate_(model, torch.stack([smooth_image(sizes[0][0], sizes[0][1], 100)]).to(device))
    model.eval()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def batch1() -> list[dict]:
        model.batch_invariant = True
        return [model(ImageBatch.from_tensors([img], model.size_divisibility))[0] for img in images]

    def batch_n(invariant: bool) -> list[dict]:
        model.batch_invariant = invariant
        return model(ImageBatch.from_tensors(images, model.size_divisibility))

    runs = {"batch1": batch1, "batchN_inv": lambda: batch_n(True), "batchN_padded": lambda: batch_n(False)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list[dict]] = {}
    with torch.no_grad():
        for round_index in range(args.rounds + 1):  # round 0 warms up
            for name, run in runs.items():
                sync()
                start = time.perf_counter()
                outputs[name] = run()
                sync()
                if round_index > 0:
                    times[name].append((time.perf_counter() - start) / len(images))
            print(f"round {round_index}/{args.rounds} done" + (" (warm-up)" if round_index == 0 else ""), flush=True)
    model.batch_invariant = True

    rows = {}
    base = statistics.median(times["batch1"])
    for name, values in times.items():
        rows[name] = {
            "min_s_per_image": min(values),
            "median_s_per_image": statistics.median(values),
            "ratio_to_batch1": statistics.median(values) / base,
        }
        print(
            f"{name:14s} min {min(values) * 1e3:8.1f} ms/image  median {statistics.median(values) * 1e3:8.1f} ms/image"
            f"  x{statistics.median(values) / base:.2f} of batch1"
        )
    checks = {}
    for name in ("batchN_inv", "batchN_padded"):
        diffs = [compare(a, b) for a, b in zip(outputs["batch1"], outputs[name])]
        checks[name] = {
            "bit_identical_images": sum(d["bit_identical"] for d in diffs),
            "same_labels_images": sum(d["same_labels"] for d in diffs),
            "max_score_diff": max(d["score"] for d in diffs),
            "max_box_diff_px": max(d["box_px"] for d in diffs),
        }
        print(f"{name} vs batch1 on {len(images)} images: {checks[name]}")
    detections = [len(d["scores"]) for d in outputs["batch1"]]
    print(f"detections per image (batch1): {detections}")
    inv = checks["batchN_inv"]
    ok = (
        inv["same_labels_images"] == len(images)
        and inv["max_score_diff"] <= SCORE_TOL
        and inv["max_box_diff_px"] <= BOX_TOL_PX
        and min(detections) > 0
    )
    if args.json:
        info = {
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "threads": args.threads,
            "torch": torch.__version__,
            "sizes": sizes,
            "rounds": args.rounds,
            "rows": rows,
            "checks": checks,
            "passed": ok,
        }
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    if not ok:
        print(
            f"FAILED: batch-invariant detections differ from batch 1 beyond {SCORE_TOL} score / {BOX_TOL_PX} px "
            "(or an image has no detection)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
