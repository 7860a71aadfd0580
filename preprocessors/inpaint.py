"""Inpaint condition, as ControlNet 1.1's inpaint checkpoint is fed: the image with its masked pixels set to -1.

The reference (`gradio_inpaint.py` of ControlNet 1.1; diffusers documents the same `make_inpaint_condition`): the
image / 255, and every pixel whose mask is above 0.5 set to -1.0 in all three channels. Maps here are uint8, so
the masked pixels travel as alpha 0 of an RGBA map (a PNG that shows the hole) and become -1 where the map turns
into the model input (`controlkit.control.condition_tensor`).

Where the mask comes from, the first that applies:
- `mask=` when called: white = repaint (`controlkit.masks`: grey >= 128); `generate(..., mask=...)` hands its
  mask to the control's inpaint preprocessor this way;
- `random_mask=SEED`: a seeded random mask (`controlkit.masks.random_mask`), to make training pairs: the
  reference trained its inpaint model on random masks;
- the input's own transparent pixels (an image with the region to repaint erased).
Without any of them the map is the image itself, with nothing masked.
No weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from controlkit.image import ImageInput, to_pil
from preprocessors.base import Preprocessor


class InpaintPreprocessor(Preprocessor):
    """The image with a masked region (RGBA, alpha 0 where masked), or the image when nothing is masked.

    Args:
        random_mask: seed of a random mask (training pairs); None (default) takes the call's `mask=` or the
            input's transparent pixels.
    """

    name = "inpaint"
    takes_mask = True

    def __init__(self, *, random_mask: int | None = None) -> None:
        if random_mask is not None and not 0 <= random_mask < 2**63:
            raise ValueError(f"`random_mask` must be a seed in [0, 2**63) or None, got {random_mask!r}")
        self.random_mask = random_mask

    def __call__(self, image: ImageInput | Sequence[ImageInput], *, output_size: tuple[int, int] | None = None,
                 mask: Any = None) -> Image.Image | list[Image.Image]:
        """Annotate one image (or a list, each with the same `mask`); `mask`: white = repaint, any image
        `load_image` reads, resized to the input's size."""
        from controlkit.masks import load_mask, repainted

        if isinstance(image, (list, tuple)):
            return [self(item, output_size=output_size, mask=mask) for item in image]
        pixels = self.load_input(image, output_size)  # RGBA when the input has transparent (masked) pixels
        size = (pixels.shape[1], pixels.shape[0])
        masked = None if mask is None else repainted(load_mask(mask, size))
        condition = self.masked_map(pixels, masked)
        return to_pil(self._finish(condition, output_size or size))

    def detect(self, image: np.ndarray) -> np.ndarray:
        return self.masked_map(image, None)

    def masked_map(self, pixels: np.ndarray, masked: np.ndarray | None) -> np.ndarray:
        """RGB(A) uint8 (H, W, 3|4) and an optional bool (H, W) mask -> the map: RGBA with alpha 0 where masked,
        or RGB when no pixel is."""
        from controlkit.image import MASK_ALPHA
        from controlkit.masks import random_mask

        if masked is None and self.random_mask is not None:
            masked = random_mask(pixels.shape[:2], self.random_mask)
        if masked is None:
            masked = pixels[..., 3] < MASK_ALPHA if pixels.shape[2] == 4 else np.zeros(pixels.shape[:2], bool)
        if not masked.any():
            return np.ascontiguousarray(pixels[..., :3])
        alpha = np.where(masked, 0, 255).astype(np.uint8)[..., None]
        return np.concatenate([pixels[..., :3], alpha], axis=2)
