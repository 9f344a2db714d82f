"""Why a detector fails, and whether a dataset fits the anchors: `detkit-analyze` / tools/analyze.py.

Modules: errors (COCO analyze curves, TIDE breakdown, confusion matrix, per-class table),
dataset (box statistics and anchor coverage before any training), plots (matplotlib figures,
training curves included), report (report.html and analysis.json).
"""
