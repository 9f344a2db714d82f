"""Are two predictors the same model? Detections compared image by image (tools/export.py --check).

Both predictors see the same original images (smooth random blobs of given sizes) through their
own `predict`, so the resize, the graph and the filtering are all in the comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

from detkit.export.exporter import smooth_random_image
from detkit.structures.compare import diff_detections


def compare_backends(reference, candidate, sizes: Sequence[tuple[int, int]], seed: int = 0) -> dict:
    """reference, candidate: predictors (Predictor / ExportedPredictor); sizes: original (h, w)s.

    Returns {"rows": one detkit.structures.compare.diff_detections dict per size, with "size",
    "same_detections": every row "same", "max_box_diff_px", "max_score_diff": over those rows}.
    """
    rows = []
    for index, (h, w) in enumerate(sizes):
        image = smooth_random_image(h, w, seed=seed + index)
        ref = reference.predict([image])[0]
        cand = candidate.predict([image])[0]
        rows.append({"size": [h, w], **diff_detections(ref, cand)})
    same = all(row["same"] for row in rows)
    return {
        "rows": rows,
        "same_detections": same,
        "max_box_diff_px": max((r["max_box_diff_px"] for r in rows if r["same"]), default=None),
        "max_score_diff": max((r["max_score_diff"] for r in rows if r["same"]), default=None),
    }


def format_parity(report: dict) -> str:
    lines = []
    for row in report["rows"]:
        h, w = row["size"]
        if row["same"]:
            lines.append(
                f"{h}x{w}: {row['reference']} detections, same labels, max |box| diff "
                f"{row['max_box_diff_px']:.2e} px, max |score| diff {row['max_score_diff']:.2e}"
            )
        else:
            lines.append(
                f"{h}x{w}: DIFFERENT: {row['reference']} detections (PyTorch) vs {row['candidate']} (exported), "
                f"{row['matched']} matched (IoU >= 0.99, same label)"
            )
    lines.append("parity: " + ("same detections" if report["same_detections"] else "DETECTIONS DIFFER"))
    return "\n".join(lines)
