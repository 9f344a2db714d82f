"""What only a GPU can show (run by `make gpu-check`; deselected without CUDA, see conftest.py):
the default bf16 AMP path and fp16 with a gradient scaler on CUDA, CPU/GPU agreement in fp32, and
the backend flags. (Detectron2 bit-identity on CUDA: tests/modeling/test_detectron2_reference.py.)"""

import pytest
import torch

import detkit.modeling.roi_heads as roi_heads_module
from detkit.config import load_config, replace
from detkit.modeling import build_model
from detkit.utils.env import configure_backends

pytestmark = pytest.mark.cuda


def tiny_model(device):
    torch.manual_seed(0)
    cfg = replace(
        load_config(),
        **{
            "model.depth": 18,
            "model.num_classes": 3,
            "model.rpn.pre_nms_topk_train": 200,
            "model.rpn.post_nms_topk_train": 16,
            "model.rpn.pre_nms_topk_test": 200,
            "model.rpn.post_nms_topk_test": 16,
            "model.rpn.batch_size_per_image": 64,
            "model.roi_heads.batch_size_per_image": 8,
            "model.rpn.smooth_l1_beta": 0.1,
            "model.roi_heads.smooth_l1_beta": 0.1,
        },
    )
    return build_model(cfg).to(device)


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 192, 256), dtype=torch.uint8, generator=g) for _ in range(2)]
    targets = [
        {
            "boxes": torch.tensor([[10.25, 20.5, 120.75, 150.125], [140.0, 8.0, 250.5, 100.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_training_step_on_cuda_keeps_boxes_fp32_and_gradients_finite(dtype, monkeypatch):
    device = torch.device("cuda")
    model = tiny_model(device).train()
    seen = []
    original = roi_heads_module.roi_align
    monkeypatch.setattr(
        roi_heads_module, "roi_align", lambda f, b, *a, **k: seen.append(b.dtype) or original(f, b, *a, **k)
    )
    images, targets = batch()
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    with torch.autocast("cuda", dtype=dtype):
        losses = model(images, targets)
    assert seen == [torch.float32]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    scaler.scale(sum(losses.values())).backward()
    scaler.unscale_(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fp32_on_cuda_gives_the_cpu_detections():
    cpu_model = tiny_model("cpu").eval()
    gpu_model = tiny_model("cuda").eval()
    configure_backends(torch.device("cuda"), cudnn_benchmark=False, allow_tf32=False)
    images, _ = batch()
    with torch.no_grad():
        on_cpu = cpu_model(images)
        on_gpu = gpu_model(images)
    for a, b in zip(on_cpu, on_gpu):
        n = min(5, len(a["scores"]))
        assert abs(len(a["scores"]) - len(b["scores"])) <= 2
        torch.testing.assert_close(b["boxes"][:n].cpu(), a["boxes"][:n], rtol=0, atol=1e-2)
        torch.testing.assert_close(b["scores"][:n].cpu(), a["scores"][:n], rtol=0, atol=1e-4)


def test_backend_flags_follow_the_config():
    configure_backends(torch.device("cuda"), cudnn_benchmark=True, allow_tf32=True)
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    configure_backends(torch.device("cuda"), cudnn_benchmark=False, allow_tf32=False)
    assert not (
        torch.backends.cudnn.benchmark or torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    )
