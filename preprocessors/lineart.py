"""Line art, white lines on black, as ControlNet 1.1's lineart checkpoints are fed.

Variants (`model`):
- "standard" (default, no weights): the weight-free line art of controlnet_aux / A1111.
  g = GaussianBlur(x, sigma); intensity = min over RGB of (g - x), clipped at 0, so only pixels darker than
  their surroundings (drawn lines, dark contours) light up; intensity / max(16, median(intensity[intensity >
  threshold])) * 127, to uint8.
- "realistic", "coarse": the informative-drawings generator of ControlNet 1.1 (`sk_model.pth`,
  `sk_model2.pth`); input RGB / 255.
- "anime": the Anime2Sketch U-Net (`netG.pth`); the image is resized with bicubic interpolation to multiples of
  256, scaled to [-1, 1], and the output is resized back.
The learned models draw dark lines on white; ControlNet 1.1 inverts them when feeding the model
(`1 - map / 255`), and so does this preprocessor, so every variant returns white lines on black.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from preprocessors.base import Preprocessor, check_detect_resolution

if TYPE_CHECKING:
    import torch

#: Learned variants: (file name in the models folder and in lllyasviel/Annotators, name in messages).
LEARNED_MODELS = {
    "realistic": ("sk_model.pth", "line-art realistic"),
    "coarse": ("sk_model2.pth", "line-art coarse"),
    "anime": ("netG.pth", "line-art anime"),
}
MODELS = ("standard", *LEARNED_MODELS)
_ANIME_MULTIPLE = 256  # 8 stride-2 levels: a 256x256 input reaches 1x1


class LineartPreprocessor(Preprocessor):
    """White lines on black.

    Args:
        model: "standard" (weight-free), "realistic", "coarse" or "anime".
        network: the ready network of a learned variant (`build_lineart_network(model)` with weights loaded);
            use `LineartPreprocessor.create(model=..., weights=...)` to load it from a file.
        detect_resolution: run at this short side, sides rounded to 64 (reference 512); None runs at input size.
        gaussian_sigma: "standard" only: blur sigma of the background estimate (reference 6.0).
        intensity_threshold: "standard" only: darkness (0..255) above which pixels count for the median that
            normalises the map (reference 8).
    """

    name = "lineart"

    def __init__(self, *, model: str = "standard", network: torch.nn.Module | None = None,
                 detect_resolution: int | None = 512, gaussian_sigma: float = 6.0,
                 intensity_threshold: float = 8) -> None:
        if model not in MODELS:
            raise ValueError(f"Unknown line-art `model` {model!r}; use one of {', '.join(MODELS)}")
        if model == "standard" and network is not None:
            raise ValueError("the 'standard' line art has no network; pass `network` only with a learned `model`")
        if model != "standard" and network is None:
            raise ValueError(
                f"line-art model {model!r} needs its network: use LineartPreprocessor.create(model={model!r}, "
                f"weights='path/to/{LEARNED_MODELS[model][0]}')"
            )
        if not gaussian_sigma > 0:
            raise ValueError(f"`gaussian_sigma` must be > 0, got {gaussian_sigma!r}")
        if not 0 <= intensity_threshold < 255:
            raise ValueError(f"`intensity_threshold` must be in [0, 255), got {intensity_threshold!r}")
        self.model = model
        self.network = network
        self.detect_resolution = check_detect_resolution(detect_resolution)
        self.gaussian_sigma = float(gaussian_sigma)
        self.intensity_threshold = float(intensity_threshold)

    @classmethod
    def create(cls, *, model: str = "standard", weights: str | os.PathLike | None = None,
               detect_resolution: int | None = 512, gaussian_sigma: float = 6.0,
               intensity_threshold: float = 8) -> LineartPreprocessor:
        """Build a variant, loading a learned model's weights.

        Args:
            weights: learned variants: a weight file (.pth read with weights_only, or safetensors), a folder
                holding it, or a hub id (fetched only when given); default: the file of that name in the
                models folder ($CONTROLKIT_MODELS). "standard" takes none.
            The other arguments are those of the class.

        Raises:
            WeightsNotFoundError: no weights found offline; the message says what to pass.
            CheckpointError: the file does not hold this network (the message lists the keys).
        """
        network = None
        if model in LEARNED_MODELS:
            network = load_lineart_network(model, find_lineart_weights(model, weights))
        elif weights is not None and model == "standard":
            raise ValueError("the 'standard' line art takes no `weights`; choose a learned `model`")
        return cls(model=model, network=network, detect_resolution=detect_resolution,
                   gaussian_sigma=gaussian_sigma, intensity_threshold=intensity_threshold)

    def detect(self, image: np.ndarray) -> np.ndarray:
        image = self.at_detect_resolution(image)
        if self.model == "standard":
            return standard_lineart(image, self.gaussian_sigma, self.intensity_threshold)
        if self.model == "anime":
            return 255 - _anime_lines(self.network, image)
        return 255 - _generator_lines(self.network, image)

    def to(self, device: Any) -> LineartPreprocessor:
        if self.network is not None:
            self.network.to(device)
        return self


def standard_lineart(image: np.ndarray, sigma: float = 6.0, threshold: float = 8) -> np.ndarray:
    """The weight-free line art of one RGB uint8 (H, W, 3) image: (H, W) uint8, white lines on black."""
    import cv2

    pixels = image.astype(np.float32)
    background = cv2.GaussianBlur(pixels, (0, 0), sigma)
    darkness = np.min(background - pixels, axis=2).clip(0, 255)
    strong = darkness[darkness > threshold]
    # A flat image has no pixel above the threshold: its map is black (the floor of 16 applies).
    scale = max(16.0, float(np.median(strong))) if strong.size else 16.0
    return (darkness / scale * 127).clip(0, 255).astype(np.uint8)


def build_lineart_network(model: str) -> torch.nn.Module:
    """A randomly initialised network of the learned variant `model` (the released architecture)."""
    from preprocessors.nets.lineart_nets import AnimeUnet, LineartGenerator

    if model == "anime":
        return AnimeUnet(3, 1, levels=8, base_channels=64)
    if model in LEARNED_MODELS:
        return LineartGenerator(3, 1, residual_blocks=3)
    raise ValueError(f"line-art model {model!r} has no network; learned models: {', '.join(LEARNED_MODELS)}")


def find_lineart_weights(model: str, weights: str | os.PathLike | None = None) -> Path:
    """The weight file of a learned variant: explicit path (file or folder), models folder, or hub id."""
    from controlkit.errors import WeightsNotFoundError
    from controlkit.weights import resolve_weights

    file_name, what = LEARNED_MODELS[model]
    path = resolve_weights(
        what, weights, local_names=(file_name,), hub_filename=file_name,
        hint=f"Pass weights='path/to/{file_name}' (from lllyasviel/Annotators) or put it in the models folder.",
    )
    if path.is_dir():
        if not (path / file_name).is_file():
            raise WeightsNotFoundError(f"{what} weights: {path} has no {file_name}")
        path = path / file_name
    return path


def load_lineart_network(model: str, path: str | os.PathLike) -> torch.nn.Module:
    """The network of `model` with the weights of `path` (strict keys), eval mode, on the CPU."""
    from preprocessors.nets import load_state_dict_into, read_state_dict

    network = build_lineart_network(model)
    load_state_dict_into(network, read_state_dict(path), what=LEARNED_MODELS[model][1], path=path)
    return network.eval().requires_grad_(False)


def _generator_lines(network: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Dark-on-white lines (H', W') uint8 from the informative-drawings generator; input RGB / 255."""
    import torch

    parameter = next(network.parameters())
    with torch.inference_mode():
        rgb = torch.from_numpy(image).to(parameter.device, parameter.dtype).permute(2, 0, 1)[None] / 255.0
        lines = network(rgb)[0, 0].float().cpu().numpy()
    return (lines * 255.0).clip(0, 255).astype(np.uint8)


def _anime_lines(network: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Dark-on-white lines (H, W) uint8 from the anime U-Net, through a bicubic resize to multiples of 256."""
    import cv2
    import torch

    height, width = image.shape[:2]
    padded_height = _ANIME_MULTIPLE * int(np.ceil(height / _ANIME_MULTIPLE))
    padded_width = _ANIME_MULTIPLE * int(np.ceil(width / _ANIME_MULTIPLE))
    resized = cv2.resize(image, (padded_width, padded_height), interpolation=cv2.INTER_CUBIC)
    parameter = next(network.parameters())
    with torch.inference_mode():
        rgb = torch.from_numpy(resized).to(parameter.device, parameter.dtype).permute(2, 0, 1)[None]
        lines = network(rgb / 127.5 - 1.0)[0, 0].float().cpu().numpy() * 127.5 + 127.5
    lines = cv2.resize(lines, (width, height), interpolation=cv2.INTER_CUBIC)
    return lines.clip(0, 255).astype(np.uint8)
