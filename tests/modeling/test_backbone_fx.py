"""torch.fx on the trunk and res5: the small-map GEMM conv traces as one node per conv and keeps
deciding at run time, so torchvision's feature extraction works on detkit's backbone."""

import pytest
import torch
import torch.fx
from torchvision.models.feature_extraction import create_feature_extractor

from detkit.modeling.backbone import Conv2d, FrozenBatchNorm2d, ResNetTrunk, build_res5, small_map_conv2d


def _count_library_convs(monkeypatch) -> list:
    """Patch F.conv2d to record its calls; returns the record."""
    calls, conv2d = [], torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **kw: calls.append(1) or conv2d(*a, **kw))
    return calls


def _randomize_bn_(module: torch.nn.Module) -> None:
    """Non-trivial norm statistics, so a skipped or repeated norm would show in the outputs."""
    generator = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)


def test_create_feature_extractor_on_the_trunk_gives_the_trunks_res4():
    # The CPU demo's trunk: trainable BatchNorm, nothing frozen.
    torch.manual_seed(0)
    trunk = ResNetTrunk(depth=18, norm="BN", freeze_at=0).eval()
    _randomize_bn_(trunk)
    extractor = create_feature_extractor(trunk, {"layer2": "res3", "layer3": "res4"})
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = extractor(x)
        expected = trunk(x)
    assert features["res4"].shape == (2, 256, 4, 6) and features["res3"].shape == (2, 128, 8, 12)
    assert torch.equal(features["res4"], expected)
    convs = [n for n in extractor.graph.nodes if n.op == "call_function" and n.target is small_map_conv2d]
    # R18: layer1 4 convs, layer2 and layer3 4 + a 1x1 shortcut each (the stem is a plain nn.Conv2d).
    assert len(convs) == sum(isinstance(m, Conv2d) for m in trunk.modules()) == 14


def test_create_feature_extractor_on_a_frozen_bn_trunk_with_frozen_bn_as_a_leaf():
    # FrozenBatchNorm2d picks its formula by x.requires_grad (Detectron2's numerics), which fx
    # cannot trace through; as a leaf module it runs as in eager mode.
    torch.manual_seed(0)
    trunk = ResNetTrunk(depth=18, norm="FrozenBN", freeze_at=2).eval()
    _randomize_bn_(trunk)
    extractor = create_feature_extractor(trunk, {"layer3": "res4"}, tracer_kwargs={"leaf_modules": [FrozenBatchNorm2d]})
    x = torch.randn(1, 3, 80, 64)
    with torch.no_grad():
        assert torch.equal(extractor(x)["res4"], trunk(x))


def test_create_feature_extractor_on_the_default_frozen_bn_trunk_keeps_both_norm_formulas():
    # The default trunk (FrozenBN, stem and res2 frozen): the norm's choice of formula (by
    # x.requires_grad, as Detectron2) is one traced node decided at run time.
    from detkit.modeling.backbone import frozen_batch_norm

    torch.manual_seed(0)
    trunk = ResNetTrunk(depth=18, norm="FrozenBN", freeze_at=2).eval()
    _randomize_bn_(trunk)
    extractor = create_feature_extractor(trunk, {"layer3": "res4"})
    norms = [n for n in extractor.graph.nodes if n.op == "call_function" and n.target is frozen_batch_norm]
    assert len(norms) == sum(isinstance(m, FrozenBatchNorm2d) for m in trunk.modules())
    x = torch.randn(1, 3, 80, 64)
    with torch.no_grad():
        assert torch.equal(extractor(x)["res4"], trunk(x))
    # With grad (res3, res4 trainable): the x * scale + bias branch, the same values as eager.
    assert torch.equal(extractor(x)["res4"], trunk(x))


@pytest.mark.parametrize("size, library_convs", [(1, 0), (2, 0), (14, 5)])
def test_traced_res5_decides_gemm_or_library_conv_at_run_time(size, library_convs, monkeypatch):
    # R18's res5: 5 convs (four 3x3 and the 1x1 shortcut), all with 1x1 outputs for 1x1 and 2x2
    # crops (GEMM), all with 7x7 = 49 outputs for 14x14 crops (the library conv).
    torch.manual_seed(0)
    res5, _ = build_res5(depth=18, norm="BN")
    res5.eval()
    _randomize_bn_(res5)
    traced = torch.fx.symbolic_trace(res5)
    assert sum(n.op == "call_function" and n.target is small_map_conv2d for n in traced.graph.nodes) == 5
    crops = torch.randn(3, 256, size, size)
    with torch.no_grad():
        expected = res5(crops)
        calls = _count_library_convs(monkeypatch)
        out = traced(crops)
        monkeypatch.undo()
    assert torch.equal(out, expected)
    assert len(calls) == library_convs
