"""Deployment: the whole detector as one ONNX, torch.export (pt2) or AOTInductor file, and a predictor that runs it.

    tools/export.py --weights model_final.pth --format onnx --output model.onnx
    ExportedPredictor("model.onnx")(read_image("photo.jpg"))   # same Detections as Predictor

graph.py: the single-image test-time model that is exported; exporter.py: writing the files with
their metadata; runtime.py: ONNX Runtime / torch.export / AOTInductor behind the Predictor interface.
"""

from detkit.export.exporter import FORMATS, export_model
from detkit.export.runtime import BACKENDS, ExportedPredictor

__all__ = ["BACKENDS", "FORMATS", "ExportedPredictor", "export_model"]
