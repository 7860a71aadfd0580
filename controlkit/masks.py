"""Inpainting masks: one reader, one rule for which pixels are repainted, and the random masks of training pairs.

A mask is any image `controlkit.image.load_image` reads (a path, bytes, PIL, numpy, tensor), white where the image
is repainted and black where it is kept, as diffusers' and the A1111 extension's masks are. Its grey level is
PIL's "L" conversion of the RGB (what diffusers' mask processor uses); a pixel is repainted at grey >= 128, which
is both diffusers' binarisation (>= 0.5 after / 255) and the reference inpaint condition's `mask > 0.5`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from controlkit.errors import ConfigError

#: Grey level from which a mask pixel is repainted (see the module docstring).
REPAINT_LEVEL = 128


def load_mask(source: Any, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask as grey uint8 (H, W), resized (bilinear) to `size` = (width, height) when given.

    Raises:
        ImageError: the mask cannot be read (one line naming it).
    """
    from PIL import Image

    from controlkit.image import load_image, resize_to

    grey = np.asarray(Image.fromarray(load_image(source)).convert("L"))
    if size is not None:
        grey = resize_to(grey[..., None], size)[..., 0]
    return np.ascontiguousarray(grey)


def repainted(grey: np.ndarray) -> np.ndarray:
    """The pixels a grey uint8 (H, W) mask repaints, as bool (H, W)."""
    return grey >= REPAINT_LEVEL


def check_repaints(grey: np.ndarray, what: str = "`mask`") -> None:
    """ConfigError when the mask repaints no pixel (an all-black mask would return the image as it is)."""
    if not repainted(grey).any():
        raise ConfigError(f"{what} is black everywhere, so nothing would be repainted; paint the region to repaint "
                          "white (grey 128 or more)")


def random_mask(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A seeded random inpainting mask of (H, W) = `shape`, bool, True where repainted: one to three boxes and
    thick strokes (brush-like polylines), together usually a tenth to a half of the image. For training pairs:
    the reference inpaint model was trained on random masks; the same seed gives the same mask."""
    import cv2

    rng = np.random.default_rng(seed)
    height, width = shape
    side = min(height, width)
    canvas = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.5:
            box_h, box_w = (int(rng.integers(max(1, side // 8), max(2, side // 2) + 1)) for _ in range(2))
            top, left = int(rng.integers(0, max(1, height - box_h + 1))), int(rng.integers(0, max(1, width - box_w + 1)))
            canvas[top : top + box_h, left : left + box_w] = 255
        else:
            count = 2 + int(rng.integers(0, 4))  # 2..5 vertices
            points = np.stack([rng.integers(0, width, count), rng.integers(0, height, count)], axis=1)
            thickness = int(rng.integers(max(1, side // 16), max(2, side // 6) + 1))
            cv2.polylines(canvas, [points.astype(np.int32).reshape(-1, 1, 2)], False, 255, thickness)
    return canvas > 0
