"""Benchmarks, one module per question (`tools/benchmark.py` runs them; BENCHMARKS.md holds the figures).

Modules: speed (detkit vs torchvision's FasterRCNN on identical inputs and weights: images/s,
memory, FLOPs), calibration (the inputs, the calibrated random weights both models share, the
agreement of their detections), timing (runners, interleaved timing, memory, profiles, FLOPs),
tv_reference (torchvision's FasterRCNN assembled as the same C4 detector, with detkit's weights),
eval_speed (COCO evaluation speed on a generated set), loader (training-loader throughput),
accuracy (a real training run of each model).

Import from the submodules: this package re-exports nothing, so timing the loader never pulls in
torchvision's detection models.
"""
