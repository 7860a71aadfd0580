"""Content shuffle, as ControlNet 1.1's `annotator/shuffle` `ContentShuffleDetector` feeds the shuffle model.

Two smooth random maps are made with `make_noise_disk(h, w, 1, f)`: uniform noise on a grid of
(h // f + 2) x (w // f + 2) cells, resized with bicubic interpolation to (h + 2f) x (w + 2f), cropped by f on
each side and min-max normalised to [0, 1]. Scaled to W - 1 and H - 1 they are a flow field (x, y) that
`cv2.remap` (bilinear) samples the image with, so the map keeps the image's colours and textures but not its
layout. Reference defaults (`gradio_shuffle.py`): h, w = the image's size, f = 256, on the image resized to
512 (its `image_resolution`). The reference seeds NumPy's global generator (`np.random.seed(seed)`); this entry
draws from `np.random.RandomState(seed)`, the same stream, so a seed gives the reference's noise.
The shuffle checkpoint also needs global average pooling of the ControlNet outputs (not a preprocessor matter).
"""

from __future__ import annotations

import numpy as np

from preprocessors.base import Preprocessor, check_detect_resolution


class ShufflePreprocessor(Preprocessor):
    """The image's content, shuffled by a smooth random flow field; deterministic for a given `seed`.

    Args:
        seed: seed of the flow field (the reference's `np.random.seed(seed)`).
        cell_size: the reference's `f`, the noise grid's cell in pixels (reference 256); larger is smoother.
        height, width: the reference's `h`, `w`, the size of the flow field (and of the map before it is resized
            back); None (reference) is the size of the detect-resolution image.
        detect_resolution: run at this short side, sides rounded to 64 (reference 512); None runs at input size.
    """

    name = "shuffle"

    def __init__(self, *, seed: int = 0, cell_size: int = 256, height: int | None = None, width: int | None = None,
                 detect_resolution: int | None = 512) -> None:
        if not 0 <= seed < 2**32:
            raise ValueError(f"`seed` must be in [0, 2**32), got {seed!r}")  # RandomState's range
        if cell_size < 1:
            raise ValueError(f"`cell_size` must be >= 1, got {cell_size!r}")
        for key, value in (("height", height), ("width", width)):
            if value is not None and not 1 <= value <= 8192:
                raise ValueError(f"`{key}` must be between 1 and 8192 or None, got {value!r}")
        self.seed = int(seed)
        self.cell_size = int(cell_size)
        self.height = height
        self.width = width
        self.detect_resolution = check_detect_resolution(detect_resolution)

    def detect(self, image: np.ndarray) -> np.ndarray:
        import cv2

        image = self.at_detect_resolution(image)
        rows, cols = image.shape[:2]
        height = self.height or rows
        width = self.width or cols
        # A fresh generator per call: the same seed gives the same map for every image and every call.
        random = np.random.RandomState(self.seed)
        flow_x = make_noise_disk(random, height, width, self.cell_size) * float(cols - 1)
        flow_y = make_noise_disk(random, height, width, self.cell_size) * float(rows - 1)
        return cv2.remap(image, flow_x, flow_y, cv2.INTER_LINEAR)


def make_noise_disk(random: np.random.RandomState, height: int, width: int, cell: int) -> np.ndarray:
    """The reference's smooth noise (one channel): (height, width) float32 in [0, 1]."""
    import cv2

    noise = random.uniform(low=0, high=1, size=((height // cell) + 2, (width // cell) + 2, 1))
    noise = cv2.resize(noise, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    noise = noise[cell:cell + height, cell:cell + width]
    noise = noise - np.min(noise)
    # A constant field (possible only in degenerate sizes) would divide by zero; it then samples one pixel.
    span = np.max(noise)
    return (noise / span if span > 0 else noise).astype(np.float32)
