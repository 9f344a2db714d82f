"""ResNet split for the C4 detector: a trunk (stem, res2, res3, res4) and res5 for the RoI head.

Shapes: N images, H x W the padded input. The trunk maps (N, 3, H, W) to the res4 map
(N, C4, H/16, W/16) with C4 = 1024 for Bottleneck depths (50/101/152) and 256 for 18/34; res5 maps
RoI crops (R, C4, 14, 14) to (R, C5, 7, 7) with C5 = 2048 (or 512).

Parameter names follow torchvision's ResNet (`conv1`, `bn1`, `layer1`..`layer4`, blocks with
`conv1..3`, `bn1..3`, `downsample.0/1`), so its ImageNet state dicts load without renaming:
layer1..layer3 live in the trunk, layer4 is `res5` in the RoI head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F

# depth -> (block kind, blocks in res2..res5)
RESNET_SPECS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def frozen_batch_norm(
    x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor, eps: float
) -> Tensor:
    """(N, C, H, W) -> (N, C, H, W) in x's dtype, computed exactly as Detectron2's FrozenBatchNorm2d.

    Without grad: one `F.batch_norm(training=False)` call. With grad: `x * scale + bias`, because
    F.batch_norm's backward would also compute gradients for the frozen statistics. The two round
    differently (by ~1 ulp per layer, ~1e-3 after 100 layers), so detkit takes the branch Detectron2
    takes in each case, for bit-identical outputs. torch.fx records a call of this function as one
    node (`torch.fx.wrap` below): the branch on x.requires_grad is taken at run time, not traced.
    """
    if x.requires_grad:
        scale = weight * (running_var + eps).rsqrt()
        shift = bias - running_mean * scale
        # (C,) -> (1, C, 1, 1), in x's dtype so bf16/fp16 activations stay in that dtype.
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)


torch.fx.wrap("frozen_batch_norm")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all stored as buffers.

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, computed by
    `frozen_batch_norm` exactly as Detectron2 does. Buffers (not parameters) so an optimizer never
    sees them; names match nn.BatchNorm2d so torchvision checkpoints load into it.
    """

    # (C,) buffers, registered in __init__
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # nn.BatchNorm2d checkpoints carry a counter that has no meaning here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        return frozen_batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm / SyncBatchNorm in `module` by a FrozenBatchNorm2d with its values."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = cls(module.num_features, module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.running_mean is not None and module.running_var is not None:  # both, or neither
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new_child = cls.convert(child)
            if new_child is not child:
                setattr(module, name, new_child)
        return module


def make_norm(kind: str) -> Callable[[int], nn.Module]:
    """Norm layer factory: 'FrozenBN' | 'BN' | 'SyncBN' | 'GN' (32 groups)."""
    if kind == "FrozenBN":
        return FrozenBatchNorm2d
    if kind == "BN":
        return nn.BatchNorm2d
    if kind == "SyncBN":
        return nn.SyncBatchNorm
    if kind == "GN":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"unknown norm {kind!r}: use FrozenBN, BN, SyncBN or GN")


# Conv outputs of at most this many positions run as one unfold + matmul on the CPU (see Conv2d).
GEMM_CONV_MAX_POSITIONS = 16


def small_map_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Tensor:
    """F.conv2d (groups 1, zero padding) that computes tiny maps on the CPU as an im2col GEMM.

    input (N, Cin, H, W), weight (Cout, Cin, kh, kw) -> (N, Cout, Ho, Wo). Outputs of at most
    GEMM_CONV_MAX_POSITIONS positions: `unfold` (N, Cin*kh*kw, L) then weight (Cout, Cin*kh*kw) @
    cols -> (N, Cout, L); a 1x1 map (1x1 output) is one matmul with the only tap that sees the input.
    Anything else, and every non-CPU tensor, goes to F.conv2d.

    torch.fx records a call of this function as one node (`torch.fx.wrap` below), so the decision,
    which reads the input's device and shape, is taken when the traced graph runs, not when tracing.
    """
    if input.device.type == "cpu" and input.dim() == 4:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = weight.shape[-2:], stride, padding, dilation
        h, w = input.shape[-2:]
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if h == w == 1 and ho == wo == 1 and dh == dw == 1 and 0 <= ph < kh and 0 <= pw < kw:
            # A 1x1 map: every tap but (ph, pw) reads padding, so the conv is one (Cin -> Cout) matmul.
            out = (input.flatten(1) @ weight[:, :, ph, pw].t())[:, :, None]  # (N, Cin) @ (Cin, Cout) -> (N, Cout, 1)
        elif 0 < ho * wo <= GEMM_CONV_MAX_POSITIONS:
            cols = F.unfold(input, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
            out = weight.reshape(weight.shape[0], -1) @ cols  # (Cout, Cin*kh*kw) @ (N, Cin*kh*kw, L)
        else:
            return F.conv2d(input, weight, bias, stride, padding, dilation)
        if bias is not None:
            out = out + bias[:, None]
        return out.view(input.shape[0], weight.shape[0], ho, wo)
    return F.conv2d(input, weight, bias, stride, padding, dilation)


torch.fx.wrap("small_map_conv2d")


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) that computes tiny maps on the CPU as a
    GEMM (`small_map_conv2d`).

    res5 runs on many small RoI maps (R x 512 x 1 x 1 for the CPU demo), where oneDNN's
    convolution, its backward most, is far slower than the same arithmetic as a matmul (torch 2.14,
    2-core CPU machine: 3x3 512->512 on 64 x 2 x 2, forward + backward 102 ms with oneDNN, 47 ms as
    GEMM on 2 threads). A 1x1 map skips the unfold: only the tap at (padding, padding) sees the
    input (192 x 512 x 1 x 1, 1 thread: 493 ms with oneDNN, 13 ms). On the demo's whole training
    step the GEMM path is worth 1.3x (python -m benchmarks.gemm_conv). Larger maps and GPUs keep the
    library convolution (BENCHMARKS.md, "Profile"). Traceable by torch.fx (the decision is inside
    the wrapped function).
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.groups == 1 and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return small_map_conv2d(input, weight, bias, self.stride, self.padding, self.dilation)
        return super()._conv_forward(input, weight, bias)


def conv_init_(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class PadShortcut(nn.Module):
    """Option A shortcut of the ResNet paper: subsample spatially, zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # (N, C_in, h, w) -> (N, C_out, h, w): zero channels appended.
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def make_shortcut(
    in_channels: int, out_channels: int, stride: int, shortcut: str, norm: Callable[[int], nn.Module]
) -> nn.Module | None:
    """None (identity), a PadShortcut (option A) or a 1x1 projection conv + norm (options B, C)."""
    changes_shape = in_channels != out_channels or stride != 1
    if shortcut == "C" or (shortcut == "B" and changes_shape):
        conv = Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        conv_init_(conv)
        return nn.Sequential(conv, norm(out_channels))
    if shortcut == "A" and changes_shape:
        if out_channels < in_channels:
            raise ValueError("shortcut A cannot reduce channels")
        return PadShortcut(in_channels, out_channels, stride)
    if shortcut not in ("A", "B", "C"):
        raise ValueError(f"unknown shortcut option {shortcut!r}: use A, B or C")
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self, in_channels: int, channels: int, stride: int, *, norm, shortcut: str, stride_in_1x1: bool = False
    ):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = Conv2d(channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.downsample = make_shortcut(in_channels, out_channels, stride, shortcut, norm)
        for conv in (self.conv1, self.conv2):
            conv_init_(conv)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu_(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50/101/152).

    stride_in_1x1: put the stride in the first 1x1 conv (MSRA/Caffe2 weights) instead of the 3x3
    (torchvision weights, "ResNet v1.5").
    """

    expansion = 4

    def __init__(
        self, in_channels: int, channels: int, stride: int, *, norm, shortcut: str, stride_in_1x1: bool = False
    ):
        super().__init__()
        out_channels = channels * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(in_channels, channels, 1, stride=stride_1x1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = Conv2d(channels, channels, 3, stride=stride_3x3, padding=1, bias=False)
        self.bn2 = norm(channels)
        self.conv3 = Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = norm(out_channels)
        self.downsample = make_shortcut(in_channels, out_channels, stride, shortcut, norm)
        for conv in (self.conv1, self.conv2, self.conv3):
            conv_init_(conv)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.bn1(self.conv1(x)))
        out = F.relu_(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu_(out + identity)


def make_stage(
    block_cls, in_channels: int, channels: int, num_blocks: int, first_stride: int, **block_kwargs
) -> nn.Sequential:
    blocks = []
    for i in range(num_blocks):
        blocks.append(block_cls(in_channels, channels, first_stride if i == 0 else 1, **block_kwargs))
        in_channels = channels * block_cls.expansion
    return nn.Sequential(*blocks)


def freeze_(module: nn.Module) -> None:
    """No gradients for `module`, and its BatchNorms become FrozenBatchNorm2d."""
    for p in module.parameters():
        p.requires_grad_(False)
    FrozenBatchNorm2d.convert(module)


class ResNetTrunk(nn.Module):
    """Stem + res2 + res3 + res4: (N, 3, H, W) -> (N, out_channels, H/16, W/16)."""

    def __init__(
        self,
        *,
        depth: int = 101,
        norm: str = "FrozenBN",
        freeze_at: int = 2,
        stride_in_1x1: bool = False,
        shortcut: str = "B",
    ):
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"ResNet depth {depth} not supported: use one of {sorted(RESNET_SPECS)}")
        kind, blocks = RESNET_SPECS[depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        norm_layer = make_norm(norm)
        kwargs = dict(norm=norm_layer, shortcut=shortcut, stride_in_1x1=stride_in_1x1)

        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        conv_init_(self.conv1)
        self.bn1 = norm_layer(64)
        self.layer1 = make_stage(block_cls, 64, 64, blocks[0], 1, **kwargs)
        self.layer2 = make_stage(block_cls, 64 * block_cls.expansion, 128, blocks[1], 2, **kwargs)
        self.layer3 = make_stage(block_cls, 128 * block_cls.expansion, 256, blocks[2], 2, **kwargs)
        self.out_channels = 256 * block_cls.expansion
        self.stride = 16

        if freeze_at >= 1:
            freeze_(self.conv1)
            self.bn1 = FrozenBatchNorm2d.convert(self.bn1)
            for p in self.bn1.parameters():
                p.requires_grad_(False)
        for stage_index, stage in enumerate((self.layer1, self.layer2, self.layer3), start=2):
            if freeze_at >= stage_index:
                freeze_(stage)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu_(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)


def build_res5(
    *, depth: int = 101, norm: str = "FrozenBN", freeze: bool = False, stride_in_1x1: bool = False, shortcut: str = "B"
) -> tuple[nn.Sequential, int]:
    """res5 (torchvision's layer4), first block stride 2: (R, C4, 14, 14) -> (R, C5, 7, 7).

    Returns the stage and C5.
    """
    kind, blocks = RESNET_SPECS[depth]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    stage = make_stage(
        block_cls,
        256 * block_cls.expansion,
        512,
        blocks[3],
        2,
        norm=make_norm(norm),
        shortcut=shortcut,
        stride_in_1x1=stride_in_1x1,
    )
    if freeze:
        freeze_(stage)
    return stage, 512 * block_cls.expansion
