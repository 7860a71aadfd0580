"""EfficientNet-B5 as NormalBAE's encoder uses it, with the parameter names of the released `scannet.pt`.

NormalBAE (Bae, Budvytis and Cipolla, ICCV 2021) builds its encoder with gen-efficientnet's
`tf_efficientnet_b5_ap`: the EfficientNet-B0 stage table scaled by width 1.6 and depth 2.2, Swish activations,
squeeze-excite in every block, BatchNorm with TensorFlow's eps 1e-3, and TensorFlow "SAME" padding, which for a
strided convolution pads asymmetrically (the extra pixel goes bottom/right) so the output is ceil(input / stride).
The classifier and global pooling were replaced by identities, so the file holds no classifier weights.

Parameter names follow the module tree `conv_stem, bn1, blocks.<stage>.<block>.{conv_pw, bn1, conv_dw, bn2, se,
conv_pwl, bn3}, conv_head, bn2` (the first stage's depthwise-separable blocks have `conv_dw, bn1, se, conv_pw,
bn2`); the NormalBAE network nests this tree under `encoder.original_model`.

At an input of (H, W), multiples of 32, the stage outputs have these channels and strides:

    stem 48 /2 | stage 0: 24 /2 | 1: 40 /4 | 2: 64 /8 | 3: 128 /16 | 4: 176 /16 | 5: 304 /32 | 6: 512 /32 |
    conv_head 2048 /32
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: TensorFlow's BatchNorm epsilon, which the ported weights were trained with.
BN_EPS = 1e-3
WIDTH_MULTIPLIER = 1.6
DEPTH_MULTIPLIER = 2.2
SE_RATIO = 0.25
#: EfficientNet-B0 stages before scaling: (block kind, repeats, kernel, stride, expansion, output channels);
#: "ds" is a depthwise-separable block, "ir" an inverted residual.
B0_STAGES = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
B0_STEM, B0_HEAD = 32, 1280


def round_channels(channels: float, multiplier: float = WIDTH_MULTIPLIER, divisor: int = 8) -> int:
    """Channels scaled by the width multiplier, rounded to a multiple of `divisor` and never more than 10 %
    below the scaled value (the EfficientNet rule)."""
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def scaled_repeats(repeats: int, multiplier: float = DEPTH_MULTIPLIER) -> int:
    """Blocks in a stage after depth scaling; EfficientNet rounds up."""
    return math.ceil(repeats * multiplier)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis as (before, after): the output has ceil(size / stride) samples and
    an odd total puts the extra sample after. Integer arithmetic only, so it also traces with symbolic sizes."""
    output = (size + stride - 1) // stride
    total = max((output - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow "SAME" padding and no bias unless asked.

    Stride 1 with an odd kernel is symmetric and becomes the convolution's own padding; a strided
    convolution pads its input per call from the input size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, *, groups: int = 1,
                 bias: bool = False) -> None:
        symmetric = stride == 1 and kernel % 2 == 1
        super().__init__(in_channels, out_channels, kernel, stride, padding=(kernel - 1) // 2 if symmetric else 0,
                         groups=groups, bias=bias)
        self.dynamic_padding = not symmetric

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.dynamic_padding:
            top, bottom = same_padding(features.shape[-2], self.kernel_size[0], self.stride[0])
            left, right = same_padding(features.shape[-1], self.kernel_size[1], self.stride[1])
            features = F.pad(features, (left, right, top, bottom))
        return super().forward(features)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class SqueezeExcite(nn.Module):
    """Channel gate: global mean, 1x1 reduce, Swish, 1x1 expand, sigmoid. `reduced` comes from the block's
    input channels, not from the expanded width the gate acts on."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        gate = self.conv_expand(F.silu(self.conv_reduce(features.mean((2, 3), keepdim=True))))
        return features * torch.sigmoid(gate)


def _se_channels(block_input: int) -> int:
    return max(1, int(block_input * SE_RATIO + 0.5))


class DepthwiseSeparable(nn.Module):
    """Depthwise conv, BN, Swish, squeeze-excite, pointwise conv, BN (no activation); residual when the shape
    is kept."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = SameConv2d(in_channels, in_channels, kernel, stride, groups=in_channels)
        self.bn1 = _batch_norm(in_channels)
        self.se = SqueezeExcite(in_channels, _se_channels(in_channels))
        self.conv_pw = SameConv2d(in_channels, out_channels, 1)
        self.bn2 = _batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.se(F.silu(self.bn1(self.conv_dw(features))))
        out = self.bn2(self.conv_pw(out))
        return out + features if self.residual else out


class InvertedResidual(nn.Module):
    """Pointwise expansion, BN, Swish, depthwise conv, BN, Swish, squeeze-excite, pointwise projection, BN;
    residual when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        middle = in_channels * expansion  # already a multiple of 8: every width here is
        self.conv_pw = SameConv2d(in_channels, middle, 1)
        self.bn1 = _batch_norm(middle)
        self.conv_dw = SameConv2d(middle, middle, kernel, stride, groups=middle)
        self.bn2 = _batch_norm(middle)
        self.se = SqueezeExcite(middle, _se_channels(in_channels))
        self.conv_pwl = SameConv2d(middle, out_channels, 1)
        self.bn3 = _batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = F.silu(self.bn1(self.conv_pw(features)))
        out = self.se(F.silu(self.bn2(self.conv_dw(out))))
        out = self.bn3(self.conv_pwl(out))
        return out + features if self.residual else out


def _stage(kind: str, repeats: int, kernel: int, stride: int, expansion: int, in_channels: int,
           out_channels: int) -> nn.Sequential:
    """One stage: only its first block strides and changes the width."""
    blocks = []
    for index in range(scaled_repeats(repeats)):
        block_in, block_stride = (in_channels, stride) if index == 0 else (out_channels, 1)
        if kind == "ds":
            blocks.append(DepthwiseSeparable(block_in, out_channels, kernel, block_stride))
        else:
            blocks.append(InvertedResidual(block_in, out_channels, kernel, block_stride, expansion))
    return nn.Sequential(*blocks)


class EfficientNetB5(nn.Module):
    """The TF-ported EfficientNet-B5 trunk without pooling and classifier (`tf_efficientnet_b5_ap`'s layout).

    `forward` maps (B, 3, H, W) to the list [stem, stage 0, ..., stage 6, conv_head], the stem after its
    BN and Swish, the head before `bn2`: NormalBAE's decoder reads the raw 1x1 head convolution. `bn2` is kept
    because the released file holds its weights (the reference computes and then ignores it).
    """

    def __init__(self) -> None:
        super().__init__()
        stem = round_channels(B0_STEM)
        self.conv_stem = SameConv2d(3, stem, 3, 2)
        self.bn1 = _batch_norm(stem)
        stages, channels = [], stem
        for kind, repeats, kernel, stride, expansion, out in B0_STAGES:
            stages.append(_stage(kind, repeats, kernel, stride, expansion, channels, round_channels(out)))
            channels = round_channels(out)
        self.blocks = nn.Sequential(*stages)
        self.conv_head = SameConv2d(channels, round_channels(B0_HEAD), 1)
        self.bn2 = _batch_norm(round_channels(B0_HEAD))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        features = [F.silu(self.bn1(self.conv_stem(image)))]
        for stage in self.blocks:
            features.append(stage(features[-1]))
        features.append(self.conv_head(features[-1]))
        return features


class Encoder(nn.Module):
    """NormalBAE's encoder: the trunk under the name `original_model`, as in the released file."""

    def __init__(self) -> None:
        super().__init__()
        self.original_model = EfficientNetB5()

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.original_model(image)
