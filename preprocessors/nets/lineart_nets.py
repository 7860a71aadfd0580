"""The two learned line-art networks of ControlNet 1.1, with the parameter names of their released files.

- `LineartGenerator`: the "informative drawings" generator (Chan, Durand and Isola, 2022) that made
  `sk_model.pth` (realistic) and `sk_model2.pth` (coarse): 7x7 stem, two stride-2 convolutions, residual
  blocks, two transposed convolutions, 7x7 head and a sigmoid; instance norm without affine parameters, so the
  files hold convolution weights only.
- `AnimeUnet`: the Anime2Sketch pix2pix U-Net that made `netG.pth`: 8 levels of 4x4 stride-2 convolutions
  (a 256x256 input reaches 1x1), skip connections by concatenation, tanh output.

Layer indices inside the `nn.Sequential` containers are part of the parameter names, so the containers
keep the released order even where a layer holds no parameters.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int) -> nn.Module:
    # No affine parameters and no running statistics: statistics of the image itself at train and test time.
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.conv_block(features)


class LineartGenerator(nn.Module):
    """Input (B, 3, H, W) RGB in [0, 1]; output (B, 1, H', W') in [0, 1], dark lines on white.

    H' = H and W' = W when both are multiples of 4 (two stride-2 stages); else they round to multiples of 4.
    The released realistic and coarse models use `residual_blocks=3`.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, residual_blocks: int = 3) -> None:
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_channels, 64, 7), _norm(64),
                                    nn.ReLU(inplace=True))
        self.model1 = nn.Sequential(
            nn.Conv2d(64, 128, 3, stride=2, padding=1), _norm(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 256, 3, stride=2, padding=1), _norm(256), nn.ReLU(inplace=True),
        )
        self.model2 = nn.Sequential(*(_ResidualBlock(256) for _ in range(residual_blocks)))
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), _norm(128), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1), _norm(64), nn.ReLU(inplace=True),
        )
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, out_channels, 7), nn.Sigmoid())

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        features = self.model1(self.model0(rgb))
        return self.model4(self.model3(self.model2(features)))


class _UnetLevel(nn.Module):
    """One U-Net level: down-sample, the inner levels, up-sample; all but the outermost concatenate the input.

    Args:
        outer: channels entering the level (and leaving it, before the skip concatenation).
        inner: channels after the down-sampling convolution.
        inner_level: the next level down, or None for the innermost.
        image_channels: set only on the outermost level: channels of the image it reads.
    """

    def __init__(self, outer: int, inner: int, inner_level: nn.Module | None = None,
                 image_channels: int | None = None) -> None:
        super().__init__()
        self.outermost = image_channels is not None
        down = nn.Conv2d(image_channels or outer, inner, 4, stride=2, padding=1)
        if self.outermost:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1)
            layers = [down, inner_level, nn.ReLU(inplace=True), up, nn.Tanh()]
        elif inner_level is None:
            up = nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1)
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(inplace=True), up, _norm(outer)]
        else:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1)
            layers = [nn.LeakyReLU(0.2), down, _norm(inner), inner_level, nn.ReLU(inplace=True), up, _norm(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(features)
        # The released networks were trained with an in-place LeakyReLU that also overwrote the tensor of the
        # skip connection, so the skip carries the activated features; done explicitly here.
        activated = self.model[0](features)
        return torch.cat([activated, self.model[1:](activated)], dim=1)


class AnimeUnet(nn.Module):
    """Input (B, 3, H, W) RGB in [-1, 1], H and W multiples of 2**levels; output (B, 1, H, W) in [-1, 1].

    The released `netG.pth` is `AnimeUnet(3, 1, levels=8, base_channels=64)`: dark lines on white.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, levels: int = 8,
                 base_channels: int = 64) -> None:
        super().__init__()
        widest = base_channels * 8
        level = _UnetLevel(widest, widest)
        for _ in range(levels - 5):
            level = _UnetLevel(widest, widest, level)
        for factor in (4, 2, 1):
            level = _UnetLevel(base_channels * factor, base_channels * factor * 2, level)
        self.model = _UnetLevel(out_channels, base_channels, level, image_channels=in_channels)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.model(rgb)
