"""PiDiNet (Su et al., ICCV 2021), the `table5_pidinet` configuration that ControlNet 1.1's SoftEdge_PIDI uses.

Pixel-difference convolutions ("cd" central, "ad" angular, "rd" radial) convolve differences of pixels
instead of pixels. Each is linear in the input, so it equals a vanilla convolution with a kernel derived from
the learned 3x3 kernel; this port derives that kernel on every call and runs one `conv2d`. The configuration
"carv4" repeats cd, ad, rd, cv over the 16 blocks; 60 base channels, dilation module with 24 channels and
spatial attention. Parameter names follow the released `table5_pidinet.pth` (after its `module.` prefix).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: "carv4": the operation of each of the 16 convolution layers (stem + 15 blocks).
CARV4 = ("cd", "ad", "rd", "cv") * 4
#: Angular differences pair each 3x3 position with its clockwise neighbour (row-major flat indices).
_CLOCKWISE = (3, 0, 1, 6, 4, 2, 7, 8, 5)
#: Radial differences: positions of the 5x5 kernel that take +w (outer ring) and -w (inner ring).
_RADIAL_OUTER = (0, 2, 4, 10, 14, 20, 22, 24)
_RADIAL_INNER = (6, 7, 8, 11, 13, 16, 17, 18)


def pixel_difference_kernel(op: str, weight: torch.Tensor) -> torch.Tensor:
    """The vanilla kernel equal to pixel-difference operation `op` with the learned 3x3 `weight` (O, I, 3, 3).

    cd: sum_i w_i (x_i - x_center); ad: sum_i w_i (x_i - x_clockwise(i)); rd: 5x5 kernel, w on the outer
    ring minus w on the inner ring (the center stays 0). cv returns `weight` itself.
    """
    if op == "cv":
        return weight
    out_channels, in_channels = weight.shape[:2]
    flat = weight.reshape(out_channels, in_channels, 9)
    if op == "cd":
        derived = flat.clone()
        derived[:, :, 4] -= flat.sum(dim=2)
        return derived.view_as(weight)
    if op == "ad":
        return (flat - flat[:, :, list(_CLOCKWISE)]).view_as(weight)
    if op == "rd":
        radial = weight.new_zeros(out_channels, in_channels, 25)
        # The released model takes flat positions 1..8 of the 3x3 kernel, in this order, for the 8 directions.
        radial[:, :, list(_RADIAL_OUTER)] = flat[:, :, 1:]
        radial[:, :, list(_RADIAL_INNER)] = -flat[:, :, 1:]
        return radial.view(out_channels, in_channels, 5, 5)
    raise ValueError(f"unknown pixel-difference operation {op!r}; use cv, cd, ad or rd")


class PixelDifferenceConv(nn.Module):
    """A 3x3 convolution (stride 1, padding 1, no bias) of pixel differences; `groups` as in `nn.Conv2d`."""

    def __init__(self, op: str, in_channels: int, out_channels: int, groups: int = 1) -> None:
        super().__init__()
        self.op, self.groups = op, groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        kernel = pixel_difference_kernel(self.op, self.weight)
        padding = kernel.shape[-1] // 2
        return F.conv2d(features, kernel, padding=padding, groups=self.groups)


class _Block(nn.Module):
    """Depthwise pixel-difference conv, ReLU, pointwise conv, plus the input (max-pooled and projected when
    `stride` is 2)."""

    def __init__(self, op: str, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.conv1 = PixelDifferenceConv(op, in_channels, in_channels, groups=in_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            features = self.pool(features)
        residual = self.conv2(self.relu2(self.conv1(features)))
        return residual + (self.shortcut(features) if self.stride > 1 else features)


class _DilationModule(nn.Module):
    """CDCM: ReLU, 1x1 projection, then the sum of four 3x3 convolutions dilated 5, 7, 9 and 11."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, channels, 1)
        for index, dilation in enumerate((5, 7, 9, 11), start=1):
            setattr(self, f"conv2_{index}", nn.Conv2d(channels, channels, 3, dilation=dilation, padding=dilation,
                                                       bias=False))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = self.conv1(self.relu1(features))
        return sum(getattr(self, f"conv2_{index}")(projected) for index in range(1, 5))


class _SpatialAttention(nn.Module):
    """CSAM: features times a sigmoid mask from ReLU, 1x1 conv to 4 channels, 3x3 conv to 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(channels, 4, 1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.sigmoid(self.conv2(self.conv1(self.relu1(features))))


class _MapReduce(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)


class PiDiNet(nn.Module):
    """Input (B, 3, H, W) BGR in [0, 1]; output (B, 1, H, W) edge probability in [0, 1] (the fused map).

    The released table5 model is `PiDiNet()` with its defaults.
    """

    def __init__(self, ops: tuple[str, ...] = CARV4, channels: int = 60, dilation_channels: int = 24) -> None:
        super().__init__()
        if len(ops) != 16:
            raise ValueError(f"PiDiNet needs 16 operations (stem + 15 blocks), got {len(ops)}")
        self.init_block = PixelDifferenceConv(ops[0], 3, channels)
        stage_widths = (channels, channels * 2, channels * 4, channels * 4)
        blocks_per_stage = (3, 4, 4, 4)
        op_index, in_width = 1, channels
        for stage, (width, count) in enumerate(zip(stage_widths, blocks_per_stage), start=1):
            for number in range(1, count + 1):
                stride = 2 if stage > 1 and number == 1 else 1
                setattr(self, f"block{stage}_{number}", _Block(ops[op_index], in_width, width, stride))
                op_index, in_width = op_index + 1, width
        self.stages = tuple(tuple(f"block{stage}_{n}" for n in range(1, count + 1))
                            for stage, count in enumerate(blocks_per_stage, start=1))
        self.dilations = nn.ModuleList(_DilationModule(width, dilation_channels) for width in stage_widths)
        self.attentions = nn.ModuleList(_SpatialAttention(dilation_channels) for _ in stage_widths)
        self.conv_reduces = nn.ModuleList(_MapReduce(dilation_channels) for _ in stage_widths)
        self.classifier = nn.Conv2d(4, 1, 1)

    def forward(self, bgr: torch.Tensor) -> torch.Tensor:
        size = bgr.shape[2:]
        features = self.init_block(bgr)
        side_maps = []
        for index, stage in enumerate(self.stages):
            for name in stage:
                features = getattr(self, name)(features)
            side = self.conv_reduces[index](self.attentions[index](self.dilations[index](features)))
            side_maps.append(F.interpolate(side, size=size, mode="bilinear", align_corners=False))
        return torch.sigmoid(self.classifier(torch.cat(side_maps, dim=1)))
