"""COCO AP of a trained shapes model on images of mixed sizes: batch 1 vs batch N, invariance on / off.

The shapes validation images (160 x 160) are each placed at a random offset on a canvas of random
size (160..288 px per side, filled with the image's mean colour), so the test-time resize (short
side 160) gives images of mixed sizes and a batch of them is padded beyond most of its images. The
checkpoint's Predictor then detects them at batch 1 and at batch N with test.batch_invariant true
and false; each run is evaluated against the shifted ground truth.

    python -m benchmarks.batch_invariance_ap output/shapes/model_final.pth --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from detkit.data.synthetic import ensure_shapes_dataset, params_from_config
from detkit.engine.evaluator import COCOEvaluator
from detkit.engine.predictor import Predictor


def mixed_size_split(ann_file: str, image_root: str, seed: int) -> tuple[list[np.ndarray], dict]:
    """RGB images on random canvases and their COCO ground truth (boxes shifted with them)."""
    gt = json.loads(Path(ann_file).read_text())
    rng = np.random.default_rng(seed)
    images, gt_images, annotations = [], [], []
    offsets = {}
    for info in sorted(gt["images"], key=lambda i: i["id"]):
        image = cv2.imread(str(Path(image_root) / info["file_name"]))[:, :, ::-1]
        h, w = image.shape[:2]
        canvas_h, canvas_w = (int(v) for v in rng.integers(160, 289, size=2))
        canvas_h, canvas_w = max(canvas_h, h), max(canvas_w, w)
        top, left = int(rng.integers(0, canvas_h - h + 1)), int(rng.integers(0, canvas_w - w + 1))
        canvas = np.empty((canvas_h, canvas_w, 3), dtype=np.uint8)
        canvas[:] = image.reshape(-1, 3).mean(axis=0).astype(np.uint8)
        canvas[top : top + h, left : left + w] = image
        images.append(np.ascontiguousarray(canvas))
        gt_images.append({**info, "height": canvas_h, "width": canvas_w})
        offsets[info["id"]] = (left, top)
    for ann in gt["annotations"]:
        x, y, bw, bh = ann["bbox"]
        left, top = offsets[ann["image_id"]]
        annotations.append({**ann, "bbox": [x + left, y + top, bw, bh]})
    return images, {**gt, "images": gt_images, "annotations": annotations}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batch_invariance_ap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("weights", help="a shapes checkpoint (tools/train.py's model_final.pth)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    predictor = Predictor(args.weights, device="cpu", batch_size=1)
    ann_file, image_root = ensure_shapes_dataset(params_from_config(predictor.cfg.data.test[0]))
    images, gt = mixed_size_split(ann_file, image_root, args.seed)
    image_ids = [info["id"] for info in gt["images"]]
    with tempfile.TemporaryDirectory() as tmp:
        gt_file = Path(tmp) / "gt.json"
        gt_file.write_text(json.dumps(gt))
        evaluator = COCOEvaluator(gt_file)
        sizes = {tuple(predictor.preprocess(image).shape[1:]) for image in images}
        print(f"{len(images)} images, {len(sizes)} distinct model input sizes")
        results = {}
        runs = [(1, True), (args.batch_size, True), (args.batch_size, False)]
        for batch_size, invariant in runs:
            predictor.batch_size = batch_size
            predictor.model.batch_invariant = invariant
            detections = predictor.predict(images)
            predictions = [
                row
                for dets, image_id in zip(detections, image_ids)
                for row in dets.to_coco(image_id, predictor.category_ids)
            ]
            metrics = evaluator.evaluate(predictions)
            name = f"batch {batch_size}, batch_invariant {str(invariant).lower()}"
            results[name] = {k: metrics[k] for k in ("AP", "AP50", "AP75")} | {"detections": len(predictions)}
            print(
                f"{name}: "
                + ", ".join(f"{k} {v:.2f}" if k != "detections" else f"{k} {v}" for k, v in results[name].items())
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
