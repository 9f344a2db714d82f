"""Suite-wide set-up and fixtures shared across test folders.

Tests marked `cuda` run only where torch sees a CUDA device: they are deselected (not skipped)
elsewhere, and the header says so; `make gpu-check` (benchmarks/gpu_check.sh) runs them with `-m cuda`.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

# The tools the tests run as subprocesses (python tools/train.py ...) import the detkit of this
# checkout, not another one an editable install in the environment may point to.
_CHECKOUT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_CHECKOUT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)


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


# A random ResNet-18 C4 on 64 px inputs with few proposals: dozens of detections per frame at
# score 0.05, which is all the video bookkeeping tests need.
TINY_MODEL = [
    "device=cpu",
    "model.depth=18",
    "model.num_classes=3",
    "model.rpn.pre_nms_topk_test=100",
    "model.rpn.post_nms_topk_test=16",
    "model.roi_heads.pooler_resolution=4",
    "data.min_size_test=64",
    "data.max_size_test=96",
]


def shapes_frame(k: int, width: int = 96, height: int = 64) -> np.ndarray:
    """BGR frame k of a clip of moving shapes: a circle moving right, a square moving left, on a
    horizontal gradient whose brightness changes with k (so every frame differs)."""
    frame = np.tile(np.linspace(20, 120, width, dtype=np.float32), (height, 1))[:, :, None].repeat(3, axis=2)
    frame = (frame + (k * 7) % 60).astype(np.uint8)
    cv2.circle(frame, ((10 + 3 * k) % width, height // 2), max(height // 6, 4), (0, 220, 0), -1)
    x = (width - 20 - 2 * k) % width
    cv2.rectangle(frame, (x, height // 8), (x + width // 5, height // 8 + width // 5), (220, 40, 40), -1)
    return frame


def write_shapes_video(
    path: Path, codec: str, num_frames: int = 20, size_wh: tuple[int, int] = (96, 64), fps: float = 10.0
) -> Path:
    """A clip of `num_frames` shapes frames written with cv2.VideoWriter in `codec` (e.g. MJPG in
    .avi, mp4v in .mp4)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size_wh)
    assert writer.isOpened(), f"this OpenCV cannot write {codec} into {path.suffix}"
    for k in range(num_frames):
        writer.write(shapes_frame(k, *size_wh))
    writer.release()
    return path


def read_all_frames(path: Path) -> list[np.ndarray]:
    """Every frame OpenCV decodes from `path`, as RGB arrays (an independent read-back)."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


def write_standin_imagenet_resnet(path: Path, depth: int = 18, seed: int = 0) -> Path:
    """A file laid out as torchvision's ImageNet ResNet-`depth` (`resnet18-f37072fd.pth`): its own
    random initialisation (seeded), so BatchNorm statistics are the identity. Training refuses frozen
    BatchNorm with no backbone file (detkit.modeling.check_initialisation); tiny test runs pass this
    one, which keeps the run offline and its numbers independent of the real ImageNet weights."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def standin_imagenet_r18(tmp_path_factory) -> Path:
    """Path of `write_standin_imagenet_resnet`'s ResNet-18 file (one per test session)."""
    return write_standin_imagenet_resnet(tmp_path_factory.mktemp("standin") / "resnet18-standin.pth")


@pytest.fixture
def write_video():
    """write_video(path, codec, num_frames=20, size_wh=(96, 64), fps=10) -> path (see write_shapes_video)."""
    return write_shapes_video


@pytest.fixture
def read_video():
    """read_video(path) -> list of RGB frames, read with plain cv2.VideoCapture."""
    return read_all_frames


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A detkit checkpoint of a random tiny model (TINY_MODEL) with classes circle, square, triangle."""
    import torch

    from detkit.config import config_to_dict, load_config
    from detkit.engine.checkpoint import save_checkpoint
    from detkit.modeling import build_model

    torch.manual_seed(0)
    cfg = load_config(None, TINY_MODEL)
    model = build_model(cfg, load_weights=False).eval()
    path = tmp_path_factory.mktemp("tiny_checkpoint") / "model.pth"
    save_checkpoint(
        {"model": model.state_dict(), "config": config_to_dict(cfg), "class_names": ["circle", "square", "triangle"]},
        path,
    )
    return path
