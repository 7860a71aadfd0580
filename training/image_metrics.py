"""Controllability of the conditions whose map is the image itself, transformed: compared with the image the map
was made from, not with a re-annotation (`training.metrics.METRICS` entries with `compares_image`).

- tile: SSIM of the generated image and the ground truth (grey, skimage defaults). The map is the truth
  downsampled and blurred back, so this is how much structure and detail at the output's resolution the
  generation recovered.
- shuffle: the distance between the colour histograms of the generated image and of the reference image the
  shuffled map came from (4 x 4 x 4 RGB bins, normalised; the Hellinger distance, 0 for identical histograms, 1
  for disjoint ones): the shuffle map keeps colours and textures, not layout. With 8 bins a channel, the demo's
  soft 64-pixel images put any two images 0.95-0.97 apart; 4 bins resolve their palettes.
- inpaint: RMSE (0..255 RGB) inside the mask between the generated image and the ground truth, the reference
  being the truth as an RGBA map with alpha 0 where masked (`controlkit.image.load_condition`);
  `extra["rmse_outside"]` is the same outside the mask (0 when the unmasked pixels were kept).
"""

from __future__ import annotations

import numpy as np

from controlkit.errors import ControlkitError

#: Histogram bins per RGB channel for `histogram_distance`.
HISTOGRAM_BINS = 4


def image_ssim(generated: np.ndarray, truth: np.ndarray) -> float:
    """SSIM of the grey images (skimage: 7x7 window, data range 255, as `training.metrics.ssim`); 1 for identical
    images."""
    import cv2
    from skimage.metrics import structural_similarity

    first, second = (cv2.cvtColor(np.ascontiguousarray(_rgb(image)), cv2.COLOR_RGB2GRAY) for image in (generated, truth))
    if first.shape != second.shape:
        raise ControlkitError(f"images of different sizes: {first.shape[1]}x{first.shape[0]} and "
                              f"{second.shape[1]}x{second.shape[0]}")
    return float(structural_similarity(first, second, data_range=255))


def histogram_distance(generated: np.ndarray, reference: np.ndarray) -> float:
    """Hellinger distance in [0, 1] between the normalised 4 x 4 x 4 RGB histograms of two uint8 images."""
    first, second = _histogram(_rgb(generated)), _histogram(_rgb(reference))
    return float(np.sqrt(max(0.0, 1.0 - float(np.sqrt(first * second).sum()))))


def masked_rmse(generated: np.ndarray, reference: np.ndarray) -> tuple[float, dict[str, float]]:
    """RMSE inside the mask of `reference` (RGBA uint8, alpha 0 = masked) and, as extra, outside it.

    Raises:
        ControlkitError: the reference has no masked pixel (it is not an inpaint reference).
    """
    from controlkit.image import MASK_ALPHA

    reference = np.asarray(reference)
    if reference.ndim != 3 or reference.shape[2] != 4 or not (reference[..., 3] < MASK_ALPHA).any():
        raise ControlkitError("an inpaint reference must be an RGBA map with a masked region (alpha 0)")
    image = _rgb(generated).astype(np.float64)
    if image.shape[:2] != reference.shape[:2]:
        raise ControlkitError(f"images of different sizes: {image.shape[1]}x{image.shape[0]} and "
                              f"{reference.shape[1]}x{reference.shape[0]}")
    masked = reference[..., 3] < MASK_ALPHA
    error = (image - reference[..., :3].astype(np.float64)) ** 2
    outside = float(np.sqrt(error[~masked].mean())) if (~masked).any() else 0.0
    return float(np.sqrt(error[masked].mean())), {"rmse_outside": outside}


def _histogram(image: np.ndarray) -> np.ndarray:
    bins = (image // (256 // HISTOGRAM_BINS)).reshape(-1, 3).astype(np.int64)
    flat = (bins[:, 0] * HISTOGRAM_BINS + bins[:, 1]) * HISTOGRAM_BINS + bins[:, 2]
    counts = np.bincount(flat, minlength=HISTOGRAM_BINS**3).astype(np.float64)
    return counts / counts.sum()


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ControlkitError(f"images must be uint8, got {image.dtype}")
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
