"""How far two sets of detections of one image differ: the one comparison behind the export
parity check (detkit.export.parity), the export benchmark's parity table (detkit.export.benchmark)
and the speed benchmark's agreement with torchvision (detkit.benchmark.calibration).

Shapes: D_r reference and D_c candidate detections of one image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou


def _field(detections: Any, name: str) -> Tensor:
    """detections[name] or detections.name (a dict or `Detections`), as a CPU tensor."""
    value = detections[name] if isinstance(detections, dict) else getattr(detections, name)
    if isinstance(value, Tensor):
        return value.detach().cpu()
    return torch.from_numpy(np.asarray(value))


def _max_abs(diff: Tensor) -> float:
    return float(diff.abs().max()) if diff.numel() else 0.0


def diff_detections(reference: Any, candidate: Any, iou_thresh: float = 0.99) -> dict:
    """Compare two sets of detections of one image, rank by rank and matched whatever their order.

    reference, candidate: dicts or objects (`Detections`) with boxes (D, 4) xyxy, scores (D,) and
    labels (D,), as numpy arrays or tensors; boxes and scores are compared in float32.

    Returns a dict:
    - "reference", "candidate": the counts D_r, D_c;
    - "same": the same count and the same labels in the same order;
    - "max_box_diff_px", "max_score_diff": max |difference| rank by rank when "same" (0.0 for no
      detections), else None;
    - "matched": pairs of the same label with IoU >= iou_thresh; each reference detection, best
      first, takes the not yet matched candidate of its label with the highest IoU;
    - "matched_max_box_diff_px", "matched_max_score_diff": max |difference| over the matched
      pairs (0.0 when none).
    """
    ref_boxes, cand_boxes = _field(reference, "boxes").float(), _field(candidate, "boxes").float()
    ref_scores, cand_scores = _field(reference, "scores").float(), _field(candidate, "scores").float()
    ref_labels, cand_labels = _field(reference, "labels").long(), _field(candidate, "labels").long()
    num_ref, num_cand = int(ref_boxes.shape[0]), int(cand_boxes.shape[0])

    same = num_ref == num_cand and torch.equal(ref_labels, cand_labels)
    box_diff: float | None = _max_abs(ref_boxes - cand_boxes) if same else None
    score_diff: float | None = _max_abs(ref_scores - cand_scores) if same else None

    matched, matched_box, matched_score = 0, 0.0, 0.0
    if num_ref and num_cand:
        iou = box_iou(ref_boxes, cand_boxes)  # (D_r, D_c)
        iou[ref_labels[:, None] != cand_labels[None, :]] = -1.0  # another label never matches
        taken = torch.zeros(num_cand, dtype=torch.bool)
        for i in range(num_ref):
            row = iou[i].masked_fill(taken, -1.0)
            j = int(row.argmax())
            if row[j] >= iou_thresh:
                taken[j] = True
                matched += 1
                matched_box = max(matched_box, float((ref_boxes[i] - cand_boxes[j]).abs().max()))
                matched_score = max(matched_score, float((ref_scores[i] - cand_scores[j]).abs()))
    return {
        "reference": num_ref,
        "candidate": num_cand,
        "same": bool(same),
        "max_box_diff_px": box_diff,
        "max_score_diff": score_diff,
        "matched": matched,
        "matched_max_box_diff_px": matched_box,
        "matched_max_score_diff": matched_score,
    }
