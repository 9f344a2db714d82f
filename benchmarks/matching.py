"""Peak memory and time of the training step's matching (IoU + Matcher), each case in a fresh process.

    python -m benchmarks.matching                        # batch 8 x 100 and 300 GT, batch 16 x 300; 800x1333
    python -m benchmarks.matching --cases 16x300 --stages rpn --modes chunked --max-elements 4194304
    cd /path/to/older/checkout && PYTHONPATH=$OLDPWD python -m benchmarks.matching --modes unchunked   # "before"

The "before" line imports detkit from the older checkout (`python -m` puts the current directory
first on the path) and this module from here when that checkout has no benchmarks/; each case's
process inherits the same directory and path, so it measures the same detkit.

Stages: `rpn` matches the anchors of one res4 map (stride 16, 15 anchors per location: 63,000 at
800x1333 padded to 800x1344) with the RPN's rule (0.3 / 0.7 + each GT's best anchors); `roi`
matches 2000 proposals + the GT boxes with the RoI heads' rule (0.5). Modes: `unchunked` is the
whole (N, G, M) IoU matrix into `Matcher` (what the heads called before), `chunked` is
`match_boxes` with its element budget. Random GT boxes and proposals, seeded: both modes match the
same inputs, and the table says whether their results are the same bits.

Peak memory is the growth of the process's peak resident set (Linux: VmHWM, reset through
/proc/self/clear_refs) over its resident set before the matching, on the CPU, with glibc's malloc
told to map every block of 64 KiB or more on its own (MALLOC_MMAP_THRESHOLD_=65536): freed tensors
then leave the resident set at once, and the peak counts live tensors (otherwise glibc keeps freed
blocks under 32 MB in its heap, which adds a varying few hundred MB); on CUDA
torch.cuda.max_memory_allocated over what was allocated before. Prints a markdown table for
BENCHMARKS.md. A case whose estimated need exceeds --max-memory-gb (default: 80% of the memory
available now) is skipped rather than run into the OOM killer.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence

import detkit
from detkit.cli.common import run_cli
from detkit.errors import DetkitError

# Child processes: malloc maps blocks >= 64 KiB on their own, so the peak RSS counts live tensors.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# fp32 copies of the (N, G, M) IoU that the unchunked path held at its peak (measured: ~9-10 with the
# (N, G, M, 2) corner-pair IoU), for the memory guard only.
UNCHUNKED_COPIES_ESTIMATE = 11


def _proc_bytes(path: str, field: str) -> int:
    """A "Field:   123 kB" line of /proc/self/status or /proc/meminfo, in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in {path}")


def _inputs(case: dict):
    """GT boxes (N, G, 4), valid (N, G), boxes (N, M, 4) and the matcher of the case's stage."""
    import torch

    from detkit.modeling.anchors import AnchorGenerator
    from detkit.modeling.matcher import Matcher

    device = torch.device(case["device"])
    g = torch.Generator().manual_seed(case.get("seed", 0))
    n, num_gt = case["images"], case["boxes_per_image"]
    height, width = case.get("height", 800), case.get("width", 1333)

    def random_boxes(count: int, min_side: float, max_side: float):
        # (n, count, 4): log-uniform sides, centres anywhere in the image, clipped to it.
        sides = torch.exp(math.log(min_side) + torch.rand(n, count, 2, generator=g) * math.log(max_side / min_side))
        centres = torch.rand(n, count, 2, generator=g) * torch.tensor([width, height])
        boxes = torch.cat((centres - sides / 2, centres + sides / 2), dim=-1)
        return torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height], dtype=torch.float32))

    gt_boxes = random_boxes(num_gt, 16, 512).to(device)
    gt_valid = torch.ones(n, num_gt, dtype=torch.bool, device=device)
    if case["stage"] == "rpn":
        # Detectron2's R-C4 RPN: one map of stride 16 on the input padded to a multiple of 32.
        pad_h, pad_w = 32 * math.ceil(height / 32), 32 * math.ceil(width / 32)
        generator = AnchorGenerator(sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0), stride=16)
        anchors = generator((pad_h // 16, pad_w // 16)).to(device)  # (M, 4)
        boxes = anchors.unsqueeze(0).expand(n, -1, -1)  # (M, 4) -> (N, M, 4), as RPN.label_and_sample_anchors
        matcher = Matcher(low_threshold=0.3, high_threshold=0.7, allow_low_quality_matches=True)
    elif case["stage"] == "roi":
        proposals = random_boxes(case.get("proposals", 2000), 8, 800).to(device)
        boxes = torch.cat((proposals, gt_boxes), dim=1)  # (N, P + G, 4), as RoIHeads.label_and_sample_proposals
        matcher = Matcher(low_threshold=0.5, high_threshold=0.5, allow_low_quality_matches=False)
    else:
        raise DetkitError(f"unknown stage {case['stage']!r}: use rpn or roi")
    return gt_boxes, gt_valid, boxes, matcher


def measure(case: dict) -> dict:
    """Match one case in this process; returns peak bytes, seconds and a hash of the results."""
    import torch

    from detkit.structures.boxes import batched_box_iou

    torch.set_num_threads(case.get("threads", 1))
    if case["mode"] == "unchunked":

        def match(matcher, gt_boxes, gt_valid, boxes):
            return matcher(batched_box_iou(gt_boxes, boxes), gt_valid)
    elif case["mode"] == "chunked":
        from detkit.modeling.matcher import match_boxes

        def match(matcher, gt_boxes, gt_valid, boxes):
            return match_boxes(matcher, gt_boxes, gt_valid, boxes, max_elements=case["max_elements"])
    else:
        raise DetkitError(f"unknown mode {case['mode']!r}: use unchunked or chunked")

    gt_boxes, gt_valid, boxes, matcher = _inputs(case)
    cuda = gt_boxes.is_cuda
    match(matcher, gt_boxes[:1, :2], gt_valid[:1, :2], boxes[:1, :50])  # warm-up: kernels, thread pools
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        before = _proc_bytes("/proc/self/status", "VmRSS")
    start = time.perf_counter()
    matched_idxs, labels = match(matcher, gt_boxes, gt_valid, boxes)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else _proc_bytes("/proc/self/status", "VmHWM")) - before
    digest = hashlib.sha1(matched_idxs.cpu().numpy().tobytes() + labels.cpu().numpy().tobytes()).hexdigest()
    n, num_gt, num_boxes = gt_boxes.shape[0], gt_boxes.shape[1], boxes.shape[1]
    return {
        **case,
        "num_boxes": num_boxes,
        "iou_values": n * num_gt * num_boxes,
        "peak_bytes": peak,
        "seconds": seconds,
        "result_sha1": digest,
        "num_positive": int((labels == 1).sum()),
    }


def _available_bytes() -> int:
    try:
        return _proc_bytes("/proc/meminfo", "MemAvailable")
    except (OSError, RuntimeError):
        return 1 << 62


def _commit() -> str:
    """The commit (and -dirty) of this checkout (the detkit measured may come from another: see the header)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _parse_case(text: str) -> tuple[int, int]:
    try:
        images, boxes = text.lower().split("x")
        return int(images), int(boxes)
    except ValueError:
        raise DetkitError(f"--cases takes IMAGESxBOXES such as 8x300, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.matching",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["8x100", "8x300", "16x300"],
        help="IMAGESxGT_BOXES per image (default: 8x100 8x300 16x300)",
    )
    parser.add_argument("--stages", nargs="+", default=["rpn", "roi"], choices=["rpn", "roi"])
    parser.add_argument("--modes", nargs="+", default=["unchunked", "chunked"], choices=["unchunked", "chunked"])
    parser.add_argument(
        "--max-elements", type=int, default=None, help="match_boxes budget (default: MATCH_MAX_ELEMENTS)"
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[800, 1333],
        metavar=("H", "W"),
        help="input image size (default: 800 1333)",
    )
    parser.add_argument(
        "--proposals", type=int, default=2000, help="proposals per image for the roi stage (default: 2000)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="skip cases estimated above this (default: 80%% of MemAvailable)",
    )
    # Child mode: a case (JSON object) or several in turn (a list; the peak is reset before each),
    # the result(s) as one JSON line.
    parser.add_argument("--measure", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        cases = json.loads(args.measure)
        print(json.dumps([measure(c) for c in cases] if isinstance(cases, list) else measure(cases)))
        return 0

    max_elements = args.max_elements
    if "chunked" in args.modes and max_elements is None:
        from detkit.modeling.matcher import MATCH_MAX_ELEMENTS

        max_elements = MATCH_MAX_ELEMENTS
    limit = args.max_memory_gb * 1e9 if args.max_memory_gb is not None else 0.8 * _available_bytes()
    # Each case runs as `python -m benchmarks.matching --measure` in this directory with the detkit
    # and the benchmarks package this process imported first on the path.
    here = [
        os.path.dirname(os.path.dirname(os.path.abspath(detkit.__file__))),
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ]  # the folder holding benchmarks/
    env = dict(
        os.environ, **CHILD_ENV, PYTHONPATH=os.pathsep.join(p for p in [*here, os.environ.get("PYTHONPATH")] if p)
    )
    height, width = args.size
    rows = []
    for text in args.cases:
        images, boxes_per_image = _parse_case(text)
        for stage in args.stages:
            digests = {}
            for mode in args.modes:
                case = {
                    "stage": stage,
                    "mode": mode,
                    "images": images,
                    "boxes_per_image": boxes_per_image,
                    "height": height,
                    "width": width,
                    "proposals": args.proposals,
                    "device": args.device,
                    "threads": args.threads,
                }
                if mode == "chunked":
                    case["max_elements"] = max_elements
                num_boxes = (
                    (32 * math.ceil(height / 32) // 16) * (32 * math.ceil(width / 32) // 16) * 15
                    if stage == "rpn"
                    else args.proposals + boxes_per_image
                )
                need = (
                    UNCHUNKED_COPIES_ESTIMATE * 4 * images * boxes_per_image * num_boxes if mode == "unchunked" else 0
                )
                if need > limit:
                    rows.append(
                        {
                            **case,
                            "skipped": f"needs ~{need / 1e9:.1f} GB, limit {limit / 1e9:.1f} GB",
                            "num_boxes": num_boxes,
                        }
                    )
                    continue
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.matching", "--measure", json.dumps(case)],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                if out.returncode != 0:
                    raise DetkitError(f"measuring {case} failed:\n{out.stderr[-2000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                digests[mode] = row["result_sha1"]
                rows.append(row)
            for row in rows[-len(args.modes) :]:
                if "skipped" not in row and len(digests) == 2:
                    row["same"] = "yes" if len(set(digests.values())) == 1 else "NO"

    code = os.path.dirname(os.path.dirname(os.path.abspath(detkit.__file__)))
    print(
        f"\nMatching memory, {datetime.date.today().isoformat()}, commit {_commit()} (detkit imported from {code}), {platform.node()}, device {args.device}, "
        f"{args.threads} thread(s), torch {__import__('torch').__version__}, images {height}x{width}"
        + (f", match_boxes budget {max_elements:,} IoU values per tile" if max_elements else "")
        + "\n"
    )
    print(
        "| stage | batch | GT / image | boxes / image (M) | IoU values N*G*M | mode | peak memory | time | results sha1 | same bits |"
    )
    print("| :--- | ---: | ---: | ---: | ---: | :--- | ---: | ---: | :--- | :---: |")
    for r in rows:
        values = r["images"] * r["boxes_per_image"] * r["num_boxes"]
        peak = f"{r['peak_bytes'] / 2**20:,.0f} MiB" if "peak_bytes" in r else "skipped (" + r["skipped"] + ")"
        seconds = f"{r['seconds']:.2f} s" if "seconds" in r else "-"
        print(
            f"| {r['stage']} | {r['images']} | {r['boxes_per_image']} | {r['num_boxes']:,} | {values / 1e6:,.1f}M | {r['mode']} | {peak} | {seconds} | {r.get('result_sha1', '-')[:10]} | {r.get('same', '-')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
