"""M-LSD large, the line segment network behind ControlNet's MLSD annotator, and its decoding.

Gu et al., "Towards Light-weight and Real-time Line Segment Detection" (AAAI 2022), in the PyTorch port that
ControlNet (`annotator/mlsd`) and controlnet_aux run with `mlsd_large_512_fp32.pth` (lllyasviel/Annotators):

- input: RGB plus a channel of ones, all mapped by x / 127.5 - 1 (4 channels); sides multiples of 16;
- backbone: the first 14 layers of MobileNetV2 (up to the 96-channel stage, stride 16) with TFLite padding
  (stride-2 convolutions pad one pixel right and bottom only); stages at layers 1, 3, 6, 10, 13 feed the decoder;
- decoder: `block15`..`block22` alternately fuse a skip (1x1 conv, BN, ReLU on both, the coarser one
  up-sampled x2 bilinearly with aligned corners) and refine (two 3x3 conv + BN + ReLU, the first residual),
  back to stride 2; `block23` (dilated 3x3, 3x3, 1x1) gives 16 channels, of which the last 9 are the "tp map":
  channel 0 the segment-centre logit, 1..4 the displacements (dx, dy) from the centre to the two ends.

`decode_segments` is the reference `deccode_output_score_and_ptss` plus the filtering of `pred_lines`;
`predict_segments` is `pred_lines`. State-dict names (`backbone.features.3.conv.1.0.weight`,
`block23.conv3.bias`, ...) are the reference's, so the released file loads with strict key and shape checks.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from preprocessors.nets import load_state_dict_into, read_state_dict

#: Input sides must be multiples of this (the backbone's total stride).
INPUT_MULTIPLE = 16
#: The tp map is at half the input resolution; segment coordinates are doubled back.
OUTPUT_STRIDE = 2
#: Centre candidates kept after non-maximum suppression, and its window (reference: 200, 3).
TOP_K = 200
NMS_KERNEL = 3
#: MobileNetV2 stages (expansion t, channels c, repeats n, first stride s), truncated after the 96-channel stage.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
#: Layers whose outputs are the skips c1..c5 (strides 2, 4, 8, 16, 16).
_SKIP_LAYERS = (1, 3, 6, 10, 13)
_STEM_CHANNELS = 32
_DECODER_CHANNELS = 64
_TP_CHANNELS = 9


class ConvBNReLU6(nn.Sequential):
    """conv (no bias), BN, ReLU6; a stride-2 conv pads (0, 1, 0, 1) instead of symmetrically, as TFLite does."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        padding = 0 if stride == 2 else (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True),
        )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion (omitted when t = 1), 3x3 depthwise, linear 1x1 projection, BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = int(round(in_channels * expansion))
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, hidden, kernel_size=1)] if expansion != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Features(nn.Module):
    """The truncated MobileNetV2 of M-LSD: a 4-channel stem, then `_STAGES`; returns the five skips."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(4, _STEM_CHANNELS, stride=2)]
        channels = _STEM_CHANNELS
        for expansion, out_channels, repeats, stride in _STAGES:
            for index in range(repeats):
                layers.append(InvertedResidual(channels, out_channels, stride if index == 0 else 1, expansion))
                channels = out_channels
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _SKIP_LAYERS:
                skips.append(x)
        return skips


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SkipFusion(nn.Module):
    """Project the skip (`conv2`) and the coarser features (`conv1`, up-sampled x2 unless `upscale` is False),
    then concatenate them, skip first."""

    def __init__(self, skip_channels: int, coarse_channels: int, upscale: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(coarse_channels, _DECODER_CHANNELS, 1)
        self.conv2 = _conv_bn_relu(skip_channels, _DECODER_CHANNELS, 1)
        self.upscale = upscale

    def forward(self, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        coarse = self.conv1(coarse)
        if self.upscale:
            coarse = F.interpolate(coarse, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat([self.conv2(skip), coarse], dim=1)


class Refine(nn.Module):
    """A residual 3x3 conv + BN + ReLU, then a 3x3 conv + BN + ReLU to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, in_channels, 3)
        self.conv2 = _conv_bn_relu(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class Head(nn.Module):
    """Dilated (5) 3x3 and plain 3x3 conv + BN + ReLU, then a 1x1 conv to the output channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, in_channels, 3, dilation=5)
        self.conv2 = _conv_bn_relu(in_channels, in_channels, 3)
        self.conv3 = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class MLSDLarge(nn.Module):
    """M-LSD large: (B, 4, H, W) normalised input -> (B, 9, H / 2, W / 2) tp map (H, W multiples of 16)."""

    def __init__(self) -> None:
        super().__init__()
        width = _DECODER_CHANNELS
        self.backbone = MobileNetV2Features()
        self.block15 = SkipFusion(64, 96, upscale=False)
        self.block16 = Refine(2 * width, width)
        self.block17 = SkipFusion(32, width)
        self.block18 = Refine(2 * width, width)
        self.block19 = SkipFusion(24, width)
        self.block20 = Refine(2 * width, width)
        self.block21 = SkipFusion(16, width)
        self.block22 = Refine(2 * width, width)
        self.block23 = Head(width, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, -_TP_CHANNELS:]


def load_mlsd(path: str | os.PathLike) -> MLSDLarge:
    """M-LSD large with the weights of `path` (`mlsd_large_512_fp32.pth` or the same state dict as safetensors),
    strict keys and shapes, eval mode, on the CPU.

    Raises:
        CheckpointError: not weights, or missing/unexpected keys or wrong shapes (listed).
        UnsafeCheckpointError: a pickle that would need code outside the weights-only allowlist.
    """
    network = MLSDLarge()
    state = read_state_dict(path)
    load_state_dict_into(network, state, what="M-LSD large (mlsd_large_512_fp32.pth)", path=path)
    return network.eval().requires_grad_(False)


def decode_segments(tp_map: torch.Tensor, *, score_threshold: float = 0.1, distance_threshold: float = 0.1,
                    top_k: int = TOP_K) -> np.ndarray:
    """Segments of a (1, 9, h, w) tp map (channels past the first 5 unused) as (N, 4) float64 rows x1, y1, x2, y2
    on its own grid, best first.

    Centres: sigmoid of channel 0, kept where it equals its 3x3 maximum, the `top_k` highest; a centre (x, y)
    with displacements (dx1, dy1, dx2, dy2) gives the segment (x + dx1, y + dy1, x + dx2, y + dy2), kept when
    its score > `score_threshold` and its length > `distance_threshold` (both strict, as the reference).
    """
    if tp_map.ndim != 4 or tp_map.shape[0] != 1 or tp_map.shape[1] < 5:
        raise ValueError(f"the tp map must be (1, 9, h, w) (at least 5 channels), got {tuple(tp_map.shape)}")
    tp_map = tp_map.detach().float().cpu()
    width = tp_map.shape[3]
    heat = torch.sigmoid(tp_map[:, 0])
    peaks = F.max_pool2d(heat, NMS_KERNEL, stride=1, padding=NMS_KERNEL // 2)
    heat = (heat * (peaks == heat)).reshape(-1)
    scores, indices = torch.topk(heat, min(top_k, heat.numel()))
    ys, xs = (indices // width).numpy(), (indices % width).numpy()
    displacement = tp_map[0, 1:5].permute(1, 2, 0).numpy()[ys, xs]
    lengths = np.sqrt(np.sum((displacement[:, :2] - displacement[:, 2:]) ** 2, axis=1))  # float32, as the reference
    keep = (scores.numpy() > score_threshold) & (lengths > distance_threshold)
    centres = np.stack([xs, ys, xs, ys], axis=1).astype(np.float64)
    return (centres + displacement.astype(np.float64))[keep]


def network_input_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) the network runs at for an image of this size: each side rounded to the nearest multiple
    of 16, halves up (the sides themselves at the reference detect resolutions, which are multiples of 64)."""
    return tuple(max(INPUT_MULTIPLE, INPUT_MULTIPLE * int(side / INPUT_MULTIPLE + 0.5)) for side in (height, width))


def predict_segments(network: nn.Module, image: np.ndarray, *, score_threshold: float = 0.1,
                     distance_threshold: float = 0.1) -> np.ndarray:
    """The reference `pred_lines`: segments of RGB uint8 (H, W, 3) as (N, 4) float64 x1, y1, x2, y2 in its pixels.

    The image is resized (area) to `network_input_size` (a no-op at the reference sizes), a ones channel is
    appended, x / 127.5 - 1; the decoded segments are doubled and scaled back by the resize ratios.
    """
    import cv2

    height, width = image.shape[:2]
    input_height, input_width = network_input_size(height, width)
    resized = image if (input_height, input_width) == (height, width) else cv2.resize(
        image, (input_width, input_height), interpolation=cv2.INTER_AREA)
    planes = np.concatenate([resized.astype(np.float32), np.ones((input_height, input_width, 1), np.float32)], 2)
    parameter = next(network.parameters())
    # A channels-last view, as the reference's transposed numpy batch is (the convolutions then round alike).
    batch = torch.from_numpy(planes[None]).permute(0, 3, 1, 2) / 127.5 - 1.0
    with torch.inference_mode():
        tp_map = network(batch.to(parameter.device, parameter.dtype))
    segments = decode_segments(tp_map, score_threshold=score_threshold, distance_threshold=distance_threshold)
    scale = np.array([width / input_width, height / input_height] * 2) * OUTPUT_STRIDE
    return segments * scale
