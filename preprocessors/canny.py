"""Canny edges, as the reference: `cv2.Canny` on the RGB uint8 image (no greyscale step), thresholds 100/200."""

from __future__ import annotations

import numpy as np

from preprocessors.base import Preprocessor, check_detect_resolution


class CannyPreprocessor(Preprocessor):
    """White edges on black.

    Args:
        low_threshold: hysteresis low threshold, 1..255 (reference 100).
        high_threshold: hysteresis high threshold, 1..255 (reference 200).
        detect_resolution: run at this resolution (ControlNet 1.1 uses 512) and resize back bilinearly, which
            makes edges non-binary; None (default) runs on the input as given, as ControlNet 1.0 did.
    """

    name = "canny"

    def __init__(self, *, low_threshold: int = 100, high_threshold: int = 200, detect_resolution: int | None = None):
        if not 0 <= low_threshold <= high_threshold:
            raise ValueError(
                f"`low_threshold` ({low_threshold}) must be between 0 and `high_threshold` ({high_threshold})"
            )
        self.low_threshold = int(low_threshold)
        self.high_threshold = int(high_threshold)
        self.detect_resolution = check_detect_resolution(detect_resolution)

    def detect(self, image: np.ndarray) -> np.ndarray:
        import cv2

        return cv2.Canny(self.at_detect_resolution(image), self.low_threshold, self.high_threshold)
