"""ResNet trunk / res5: sizes of the reference model, depths, freezing, strides, shortcuts, norms, and
numerical equality with torchvision's ResNet when its weights are loaded."""

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from detkit.config import load_config, replace
from detkit.modeling import build_model
from detkit.modeling.backbone import (
    GEMM_CONV_MAX_POSITIONS,
    BasicBlock,
    Bottleneck,
    Conv2d,
    FrozenBatchNorm2d,
    PadShortcut,
    ResNetTrunk,
    build_res5,
)


def small_config(**changes):
    """Depth 18, 3 classes, plus `changes` (dotted keys)."""
    return replace(load_config(), **{"model.depth": 18, "model.num_classes": 3, **changes})


# ------------------------------------------------------------------------------------ R101-C4


@pytest.fixture(scope="module")
def r101():
    """The reference model: load_config() defaults (R101-C4, 80 classes, FrozenBN, freeze_at 2)."""
    return build_model(load_config()).eval()


def test_r101_c4_parameter_counts(r101):
    # Detectron2's R101-C4 with 80 classes: 52,731,548 parameters, 52,509,148 trainable at freeze_at 2
    # (FrozenBN statistics and affine terms are buffers, not parameters).
    assert sum(p.numel() for p in r101.parameters()) == 52_731_548
    assert sum(p.numel() for p in r101.parameters() if p.requires_grad) == 52_509_148


def test_r101_res4_map_shape(r101):
    with torch.no_grad():
        res4 = r101.backbone(torch.randn(1, 3, 480, 640))
    assert res4.shape == (1, 1024, 30, 40)
    assert r101.backbone.out_channels == 1024 and r101.backbone.stride == 16


# ------------------------------------------------------------------------------------ depths


@pytest.mark.parametrize(
    "depth, block_cls, blocks, c4, c5",
    [
        (18, BasicBlock, (2, 2, 2, 2), 256, 512),
        (34, BasicBlock, (3, 4, 6, 3), 256, 512),
        (50, Bottleneck, (3, 4, 6, 3), 1024, 2048),
    ],
)
def test_depths_build_the_right_blocks(depth, block_cls, blocks, c4, c5):
    trunk = ResNetTrunk(depth=depth)
    res5, res5_channels = build_res5(depth=depth)
    stages = (trunk.layer1, trunk.layer2, trunk.layer3, res5)
    assert tuple(len(stage) for stage in stages) == blocks
    assert all(type(block) is block_cls for stage in stages for block in stage)
    assert trunk.out_channels == c4 and res5_channels == c5
    if depth == 18:  # forward only for the smallest: (N, 3, H, W) -> (N, C4, H/16, W/16) -> res5 on crops
        with torch.no_grad():
            assert trunk.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 256, 4, 6)
            assert res5.eval()(torch.randn(2, 256, 14, 14)).shape == (2, 512, 7, 7)


def test_unknown_depth_raises():
    with pytest.raises(ValueError, match="depth 20 not supported"):
        ResNetTrunk(depth=20)


# ------------------------------------------------------------------------------------ freezing


def stage_modules(model):
    """(stem, res2, res3, res4, res5) of a detector as module lists."""
    backbone = model.backbone
    return [
        [backbone.conv1, backbone.bn1],
        [backbone.layer1],
        [backbone.layer2],
        [backbone.layer3],
        [model.roi_heads.res5],
    ]


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 4, 5])
def test_freeze_at_with_bn_freezes_and_converts_the_first_stages(freeze_at):
    model = build_model(small_config(**{"model.backbone.norm": "BN", "model.backbone.freeze_at": freeze_at}))
    for stage_index, modules in enumerate(stage_modules(model), start=1):
        frozen = freeze_at >= stage_index  # stem is stage 1, res2 stage 2, ..., res5 stage 5
        params = [p for m in modules for p in m.parameters()]
        assert params, f"stage {stage_index} has no parameters"
        assert all(p.requires_grad != frozen for p in params), (freeze_at, stage_index)
        norms = [m for mod in modules for m in mod.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert norms
        expected_type = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
        assert all(type(m) is expected_type for m in norms), (freeze_at, stage_index)
    # The heads are never frozen.
    assert all(p.requires_grad for p in model.rpn.parameters())
    assert all(p.requires_grad for p in model.roi_heads.box_predictor.parameters())


def test_freeze_at_with_gn_stops_gradients_but_keeps_group_norm():
    model = build_model(small_config(**{"model.backbone.norm": "GN", "model.backbone.freeze_at": 2}))
    stem, res2, res3 = stage_modules(model)[:3]
    for modules, frozen in ((stem, True), (res2, True), (res3, False)):
        assert all(p.requires_grad != frozen for m in modules for p in m.parameters())
        norms = [n for m in modules for n in m.modules() if isinstance(n, (nn.GroupNorm, FrozenBatchNorm2d))]
        assert norms and all(type(n) is nn.GroupNorm for n in norms)


def test_frozen_bn_norm_has_no_norm_parameters_even_unfrozen():
    model = build_model(small_config(**{"model.backbone.freeze_at": 0}))
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # Only convs (no bias) carry backbone parameters: every backbone parameter is a 4-d weight.
    assert all(p.dim() == 4 for p in model.backbone.parameters())


# ------------------------------------------------------------------------------------ blocks


@pytest.mark.parametrize("stride_in_1x1, conv1_stride, conv2_stride", [(True, (2, 2), (1, 1)), (False, (1, 1), (2, 2))])
def test_stride_in_1x1_moves_the_stride(stride_in_1x1, conv1_stride, conv2_stride):
    trunk = ResNetTrunk(depth=50, stride_in_1x1=stride_in_1x1)
    for stage in (trunk.layer2, trunk.layer3):
        assert stage[0].conv1.stride == conv1_stride and stage[0].conv2.stride == conv2_stride
        assert stage[0].conv3.stride == (1, 1)
        assert stage[1].conv1.stride == (1, 1) and stage[1].conv2.stride == (1, 1)
    res5, _ = build_res5(depth=50, stride_in_1x1=stride_in_1x1)
    assert res5[0].conv1.stride == conv1_stride and res5[0].conv2.stride == conv2_stride
    with torch.no_grad():
        assert res5.eval()(torch.randn(1, 1024, 14, 14)).shape == (1, 2048, 7, 7)


def test_pad_shortcut_subsamples_and_zero_pads_channels():
    x = torch.randn(2, 3, 5, 6)
    out = PadShortcut(3, 8, stride=2)(x)
    assert out.shape == (2, 8, 3, 3)
    torch.testing.assert_close(out[:, :3], x[:, :, ::2, ::2])
    assert out[:, 3:].eq(0).all()


def test_shortcut_a_has_no_downsample_parameters():
    trunk = ResNetTrunk(depth=18, shortcut="A", freeze_at=0)
    assert not any("downsample" in name for name, _ in trunk.named_parameters())
    assert trunk.layer1[0].downsample is None  # 64 -> 64, stride 1: identity
    assert isinstance(trunk.layer2[0].downsample, PadShortcut)
    assert trunk.layer2[1].downsample is None
    # The block output = relu(residual + subsampled, zero-padded input).
    block = trunk.layer2[0].eval()
    x = torch.rand(1, 64, 8, 8)
    with torch.no_grad():
        residual = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        shortcut = torch.cat((x[:, :, ::2, ::2], torch.zeros(1, 64, 4, 4)), dim=1)
        torch.testing.assert_close(block(x), torch.relu(residual + shortcut))
    # Fewer parameters than option B by exactly the projection convs (norms are FrozenBN buffers).
    b = ResNetTrunk(depth=18, shortcut="B", freeze_at=0)
    projections = 64 * 128 + 128 * 256  # 1x1 convs of layer2.0 and layer3.0
    assert sum(p.numel() for p in b.parameters()) - sum(p.numel() for p in trunk.parameters()) == projections


@pytest.mark.parametrize(
    "depth, shortcut, expected",
    [
        # option B: a projection only where the shape changes (first block of a stage; for
        # Bottleneck also res2's first block, 64 -> 256 channels).
        (18, "B", {"layer1": [False, False], "layer2": [True, False], "layer3": [True, False]}),
        (50, "B", {"layer1": [True, False, False], "layer2": [True, False, False, False]}),
        # option C: a projection in every block.
        (18, "C", {"layer1": [True, True], "layer2": [True, True], "layer3": [True, True]}),
    ],
)
def test_projection_shortcuts(depth, shortcut, expected):
    trunk = ResNetTrunk(depth=depth, shortcut=shortcut)
    for stage_name, has_projection in expected.items():
        stage = getattr(trunk, stage_name)
        for block, want in zip(stage, has_projection):
            if want:
                assert isinstance(block.downsample, nn.Sequential)
                assert isinstance(block.downsample[0], nn.Conv2d) and block.downsample[0].kernel_size == (1, 1)
            else:
                assert block.downsample is None


def test_unknown_shortcut_raises():
    with pytest.raises(ValueError, match="shortcut option 'D'"):
        ResNetTrunk(depth=18, shortcut="D")


@pytest.mark.parametrize(
    "norm, norm_type", [("BN", nn.BatchNorm2d), ("GN", nn.GroupNorm), ("SyncBN", nn.SyncBatchNorm)]
)
def test_norms_construct_and_run(norm, norm_type):
    trunk = ResNetTrunk(depth=18, norm=norm, freeze_at=0)
    norms = [
        m for m in trunk.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm, FrozenBatchNorm2d))
    ]
    assert norms and all(type(m) is norm_type for m in norms)
    if norm == "GN":
        assert all(m.num_groups == 32 for m in norms)
    with torch.no_grad():
        assert trunk.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 256, 2, 2)


def test_unknown_norm_raises():
    with pytest.raises(ValueError, match="unknown norm 'LN'"):
        ResNetTrunk(depth=18, norm="LN")


# ------------------------------------------------------------------------------------ FrozenBN


def randomise_bn_(module: nn.Module, generator: torch.Generator) -> None:
    """Random affine terms and running statistics in every BatchNorm of `module`."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=generator))
                m.bias.copy_(0.2 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))


def test_frozen_bn_equals_batchnorm_in_eval_mode():
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(6)
    randomise_bn_(bn, g)
    bn.eval()
    frozen = FrozenBatchNorm2d(6)
    # Loading a BatchNorm state dict (with its num_batches_tracked) works.
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(3, 6, 5, 7, generator=g)
    torch.testing.assert_close(frozen(x), bn(x))
    torch.testing.assert_close(FrozenBatchNorm2d.convert(bn)(x), bn(x))
    assert not list(frozen.parameters())


def _frozen_bn_with_random_stats(channels: int, seed: int) -> FrozenBatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    frozen = FrozenBatchNorm2d(channels)
    frozen.weight.copy_(1.0 + 0.3 * torch.randn(channels, generator=g))
    frozen.bias.copy_(0.2 * torch.randn(channels, generator=g))
    frozen.running_mean.copy_(0.5 * torch.randn(channels, generator=g))
    frozen.running_var.copy_(0.1 + torch.rand(channels, generator=g))
    return frozen


def test_frozen_bn_without_grad_is_detectron2_batch_norm_call_bit_for_bit():
    frozen = _frozen_bn_with_random_stats(16, seed=1)
    x = torch.randn(2, 16, 9, 11, generator=torch.Generator().manual_seed(2)) * 3
    expected = F.batch_norm(
        x, frozen.running_mean, frozen.running_var, frozen.weight, frozen.bias, training=False, eps=frozen.eps
    )
    assert torch.equal(frozen(x), expected)
    # The scale-and-shift formula rounds differently: the two branches are not interchangeable.
    scale = frozen.weight * (frozen.running_var + frozen.eps).rsqrt()
    shifted = x * scale.view(1, -1, 1, 1) + (frozen.bias - frozen.running_mean * scale).view(1, -1, 1, 1)
    assert not torch.equal(shifted, expected)
    torch.testing.assert_close(shifted, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_bn_with_grad_is_detectron2_scale_and_bias_bit_for_bit(dtype):
    frozen = _frozen_bn_with_random_stats(16, seed=3)
    x = (torch.randn(2, 16, 9, 11, generator=torch.Generator().manual_seed(4)) * 3).to(dtype).requires_grad_()
    scale = frozen.weight * (frozen.running_var + frozen.eps).rsqrt()
    bias = frozen.bias - frozen.running_mean * scale
    expected = x * scale.reshape(1, -1, 1, 1).to(dtype) + bias.reshape(1, -1, 1, 1).to(dtype)
    out = frozen(x)
    assert out.dtype == dtype
    assert torch.equal(out, expected)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x) * scale.reshape(1, -1, 1, 1).to(dtype))


def test_frozen_bn_default_is_identity():
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(FrozenBatchNorm2d(4)(x), x)


# ------------------------------------------------------------------------------------ torchvision


@pytest.mark.parametrize("depth, input_hw", [(18, (96, 128)), (50, (64, 64))])
def test_torchvision_weights_give_torchvision_outputs(depth, input_hw, tmp_path):
    g = torch.Generator().manual_seed(depth)
    torch.manual_seed(depth)
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    randomise_bn_(tv, g)
    tv.eval()
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(tv.state_dict(), path)

    # Through build_model, as a user does (FrozenBN, freeze_at 2): every trunk / res5 tensor must come
    # from the file, or the outputs below could not match.
    model = build_model(small_config(**{"model.depth": depth, "model.backbone.weights": str(path)})).eval()

    x = torch.randn(1, 3, *input_hw, generator=g)
    with torch.no_grad():
        expected = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
        got = model.backbone(x)
        assert got.shape == expected.shape == (1, model.backbone.out_channels, input_hw[0] // 16, input_hw[1] // 16)
        # Equal up to float32 rounding: 1e-5 of the output's scale (activations reach ~10..500 here,
        # and FrozenBN folds the statistics into one scale and shift, so the roundings differ).
        assert_close_to_scale(got, expected, 1e-5)
        crop = torch.randn(2, model.backbone.out_channels, 14, 14, generator=g)
        assert_close_to_scale(model.roi_heads.res5(crop), tv.layer4(crop), 1e-5)


def assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    scale = expected.abs().max().item()
    assert scale > 1.0
    error = (got - expected).abs().max().item()
    assert error <= tolerance * scale, f"max error {error:.3g} > {tolerance} * {scale:.3g}"


# ----------------------------------------------------------------------- small-map GEMM conv


def _count_library_convs(monkeypatch) -> list:
    """Patch F.conv2d (what nn.Conv2d calls) to record its calls; returns the record."""
    calls, conv2d = [], torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **kw: calls.append(1) or conv2d(*a, **kw))
    return calls


@pytest.mark.parametrize(
    "in_shape, cin, cout, k, stride, padding, bias",
    [
        ((6, 32, 2, 2), 32, 16, 3, 1, 1, False),  # res5 of the demo: 2 x 2 RoI maps
        ((6, 16, 4, 4), 16, 32, 3, 2, 1, True),  # first res5 block, stride 2
        ((6, 16, 4, 4), 16, 32, 1, 2, 0, False),  # its 1x1 projection shortcut
        ((3, 8, 5, 3), 8, 8, 3, 1, 1, True),  # 15 positions, not square
        ((6, 32, 1, 1), 32, 16, 3, 1, 1, True),  # 1 x 1 maps (res5 of the demo): the centre tap only
        ((6, 16, 1, 1), 16, 32, 1, 2, 0, False),  # 1x1 stride 2 on a 1 x 1 map
    ],
)
def test_small_map_conv_runs_as_gemm_and_matches_the_library_conv(
    in_shape, cin, cout, k, stride, padding, bias, monkeypatch
):
    torch.manual_seed(0)
    conv = Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    ref = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    ref.load_state_dict(conv.state_dict())  # same keys and shapes as nn.Conv2d
    x = torch.randn(in_shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    calls = _count_library_convs(monkeypatch)
    out = conv(x)
    monkeypatch.undo()
    assert calls == [] and out.shape[-2] * out.shape[-1] <= GEMM_CONV_MAX_POSITIONS
    expected = ref(x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)


def test_larger_maps_keep_the_library_conv(monkeypatch):
    conv = Conv2d(8, 8, 3, padding=1)
    calls = _count_library_convs(monkeypatch)
    out = conv(torch.randn(2, 8, 5, 5))  # 25 positions
    assert calls == [1] and out.shape == (2, 8, 5, 5)
