"""Suite-wide set-up: tests marked `cuda` run only where torch sees a CUDA device.

They are deselected (not skipped) elsewhere, and the header says so; `make gpu-check`
(tools/gpu_check.sh) runs them with `-m cuda` on a GPU machine.
"""

import pytest
import torch


def pytest_report_header(config):
    if not torch.cuda.is_available():
        return "cuda: no CUDA device, tests marked 'cuda' are deselected (run them with make gpu-check on a GPU)"
    return f"cuda: {torch.cuda.get_device_name(0)}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if cuda_items:
        config.hook.pytest_deselected(items=cuda_items)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]
