"""NormalBAE, the surface-normal network behind ControlNet 1.1's `normalbae` annotator, and its released file.

Bae, Budvytis and Cipolla, "Estimating and Exploiting the Aleatoric Uncertainty in Surface Normal Estimation"
(ICCV 2021): an EfficientNet-B5 encoder (`normalbae_encoder`) and a U-Net-like decoder that predicts, per pixel,
a unit normal and a concentration `kappa` (the inverse of the uncertainty):

- `conv2` (1x1, 2048 -> 2048) on the encoder head, then four `UpSampleBN` blocks (bilinear up-sampling with
  aligned corners to the skip's size, concatenation, two 3x3 conv + BN + LeakyReLU) with skips from encoder
  stages 4, 2, 1 and 0, giving features at 1/16, 1/8, 1/4 and 1/2 of the input;
- `out_conv_res8`: a 3x3 convolution to 4 channels at 1/8;
- `out_conv_res4`, `out_conv_res2`, `out_conv_res1`: per-pixel MLPs (1x1 Conv1d 128-128-128-4 with ReLU) that
  refine the prediction one octave finer each, reading the decoder feature and the previous prediction, both
  up-sampled x2 (bilinear, aligned corners).

Every level is normalised: (x, y, z) to unit length, kappa = elu(k) + 1.01. The paper's uncertainty-guided
sampling (`sampling_ratio` 0.4, `importance_ratio` 0.7 in the released configuration) chooses which pixels the
MLPs are trained on; in evaluation the reference refines every pixel, which is all this inference-only port
does, so those two settings have no effect here. Input sides must be multiples of 32 (the decoder joins the
x2-upsampled coarse level with the next skip); `NormalPreprocessor` pads to that.

The released `scannet.pt` (lllyasviel/Annotators) holds {"model": state_dict} with names such as
`encoder.original_model.blocks.0.0.conv_dw.weight` and `decoder.out_conv_res1.6.bias`; `load_normalbae` reads
it through the project's weights-only reader and checks every key and shape.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from preprocessors.nets import load_state_dict_into, read_state_dict
from preprocessors.nets.normalbae_encoder import Encoder, round_channels

#: Input sides must be multiples of this (the encoder's total stride).
INPUT_MULTIPLE = 32
MIN_KAPPA = 0.01
_PIXEL_MLP_WIDTH = 128


class UpSampleBN(nn.Module):
    """Up-sample to the skip's size, concatenate, then (3x3 conv, BN, LeakyReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self._net = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.LeakyReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.LeakyReLU(),
        )

    def forward(self, features: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        features = F.interpolate(features, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self._net(torch.cat([features, skip], dim=1))


def _pixel_mlp(in_channels: int) -> nn.Sequential:
    # Conv1d over flattened pixels, as trained (the training path runs it on sampled points only).
    width = _PIXEL_MLP_WIDTH
    return nn.Sequential(
        nn.Conv1d(in_channels, width, 1), nn.ReLU(), nn.Conv1d(width, width, 1), nn.ReLU(),
        nn.Conv1d(width, width, 1), nn.ReLU(), nn.Conv1d(width, 4, 1),
    )


def normalise_prediction(prediction: torch.Tensor) -> torch.Tensor:
    """(B, 4, ...) raw output -> unit (x, y, z) and kappa = elu(k) + 1 + 0.01, as the reference."""
    x, y, z, kappa = torch.split(prediction, 1, dim=1)
    length = torch.sqrt(x**2.0 + y**2.0 + z**2.0) + 1e-10
    return torch.cat([x / length, y / length, z / length, F.elu(kappa) + 1.0 + MIN_KAPPA], dim=1)


def _up2(tensor: torch.Tensor) -> torch.Tensor:
    return F.interpolate(tensor, scale_factor=2, mode="bilinear", align_corners=True)


class Decoder(nn.Module):
    """BAE's decoder ("BN" architecture), evaluation path: every pixel is refined at 1/4, 1/2 and 1/1."""

    def __init__(self) -> None:
        super().__init__()
        head, skip16, skip8, skip4, skip2 = (round_channels(c) for c in (1280, 112, 40, 24, 16))
        self.conv2 = nn.Conv2d(head, head, 1)
        self.up1 = UpSampleBN(head + skip16, 1024)
        self.up2 = UpSampleBN(1024 + skip8, 512)
        self.up3 = UpSampleBN(512 + skip4, 256)
        self.up4 = UpSampleBN(256 + skip2, 128)
        self.out_conv_res8 = nn.Conv2d(512, 4, 3, padding=1)
        self.out_conv_res4 = _pixel_mlp(512 + 4)
        self.out_conv_res2 = _pixel_mlp(256 + 4)
        self.out_conv_res1 = _pixel_mlp(128 + 4)

    def forward(self, stage0: torch.Tensor, stage1: torch.Tensor, stage2: torch.Tensor, stage4: torch.Tensor,
                head: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features (strides 2, 4, 8, 16, 32) -> [1/8, 1/4, 1/2, 1/1] predictions, (B, 4, h, w) each."""
        at16 = self.up1(self.conv2(head), stage4)
        at8 = self.up2(at16, stage2)
        at4 = self.up3(at8, stage1)
        at2 = self.up4(at4, stage0)
        res8 = normalise_prediction(self.out_conv_res8(at8))
        res4 = self._refine(self.out_conv_res4, at8, res8)
        res2 = self._refine(self.out_conv_res2, at4, res4)
        res1 = self._refine(self.out_conv_res1, at2, res2)
        return [res8, res4, res2, res1]

    @staticmethod
    def _refine(mlp: nn.Sequential, features: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([_up2(features), _up2(coarse)], dim=1)
        batch, channels, height, width = joined.shape
        return normalise_prediction(mlp(joined.reshape(batch, channels, height * width))).reshape(
            batch, 4, height, width)


class NormalBAE(nn.Module):
    """NNET(architecture="BN") for inference.

    Input (B, 3, H, W): RGB / 255 normalised with the ImageNet mean and std, H and W multiples of 32.
    Output: a 1-tuple holding the per-level list [1/8, 1/4, 1/2, 1/1] of (B, 4, h, w) predictions, channels
    (x, y, z, kappa) with (x, y, z) unit length; `out[0][-1]` is the full-resolution prediction, as for the
    reference NNET (whose further tuple entries are training-time samples).
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor]]:
        _stem, stage0, stage1, stage2, _stage3, stage4, _stage5, _stage6, head = self.encoder(image)
        return (self.decoder(stage0, stage1, stage2, stage4, head),)


def load_normalbae(path: str | os.PathLike) -> NormalBAE:
    """The released NormalBAE network (`scannet.pt`, or the same state dict plain or as safetensors), in eval
    mode on the CPU.

    Raises:
        CheckpointError: not weights, or missing/unexpected keys or wrong shapes (listed).
        UnsafeCheckpointError: a pickle that would need code outside the weights-only allowlist.
    """
    network = NormalBAE()
    state = read_normalbae_state(path)
    load_state_dict_into(network, state, what="NormalBAE (scannet.pt)", path=path)
    return network.eval()


def read_normalbae_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat state dict from a NormalBAE file (the released one wraps it as {"model": state_dict}, which the
    project reader unwraps); a `module.` prefix from DataParallel training is dropped."""
    return {key.removeprefix("module."): value for key, value in read_state_dict(path).items()}
