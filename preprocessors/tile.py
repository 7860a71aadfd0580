"""Tile condition: the image itself, downsampled (ControlNet 1.1 tile; the A1111 extension's `tile_resample`),
or strongly blurred with its colours kept (`tile_colorfix`).

- "resample" (default): A1111 `tile_resample(img, thr_a)`: if the "Down Sampling Rate" `thr_a` is below 1.1
  the image is returned as it is (ControlNet 1.1's tile demo feeds the raw image resized, too); else it is
  resized with area interpolation to (int(H / thr_a), int(W / thr_a)). Slider default 1.0, range 1..8. The map
  is then resized back to the input size with bilinear interpolation (the contract's rule), which is what makes
  it a blurred copy.
- "colorfix": a Gaussian blur of sigma `variation` (the extension's "Variation" slider: default 8, range 3..32),
  which keeps the local colours and drops detail. The extension applies this blur to the latents at every
  sampling step; here it is applied to the image, the part a preprocessor can do.
No weights.
"""

from __future__ import annotations

import numpy as np

from preprocessors.base import Preprocessor, check_detect_resolution

MODES = ("resample", "colorfix")


class TilePreprocessor(Preprocessor):
    """A downsampled or blurred copy of the image, RGB.

    Args:
        mode: "resample" (tile_resample) or "colorfix" (tile_colorfix).
        down_sampling_rate: "resample": divide each side by this, 1..8 (reference 1.0: below 1.1 nothing is done).
        variation: "colorfix": Gaussian sigma in pixels, 3..32 (reference 8).
        detect_resolution: run at this short side, sides rounded to 64; None (default, as tile_resample, which
            has no resolution of its own) runs at input size.
    """

    name = "tile"

    def __init__(self, *, mode: str = "resample", down_sampling_rate: float = 1.0, variation: float = 8.0,
                 detect_resolution: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"Unknown tile `mode` {mode!r}; use one of {', '.join(MODES)}")
        if not 1.0 <= down_sampling_rate <= 8.0:
            raise ValueError(f"`down_sampling_rate` must be between 1 and 8, got {down_sampling_rate!r}")
        if not 3.0 <= variation <= 32.0:
            raise ValueError(f"`variation` must be between 3 and 32, got {variation!r}")
        self.mode = mode
        self.down_sampling_rate = float(down_sampling_rate)
        self.variation = float(variation)
        self.detect_resolution = check_detect_resolution(detect_resolution)

    def detect(self, image: np.ndarray) -> np.ndarray:
        import cv2

        image = self.at_detect_resolution(image)
        if self.mode == "colorfix":
            return cv2.GaussianBlur(image, (0, 0), self.variation)
        if self.down_sampling_rate < 1.1:  # the reference's cut-off
            return image
        rows, cols = image.shape[:2]
        # At least one pixel: a thin strip divided by the rate would otherwise have no rows.
        size = (max(1, int(cols / self.down_sampling_rate)), max(1, int(rows / self.down_sampling_rate)))
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
