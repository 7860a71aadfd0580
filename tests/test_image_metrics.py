"""The controllability metrics of the conditions whose map is the image itself (training/image_metrics.py) and
their place in `controllability`."""

from __future__ import annotations

import numpy as np
import pytest

from controlkit.errors import ControlkitError
from training.image_metrics import histogram_distance, image_ssim, masked_rmse
from training.metrics import controllability


def scene(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_histogram_distance_is_zero_for_the_same_colours_in_any_layout_and_one_for_disjoint_ones():
    image = scene(0)
    shuffled = image.reshape(-1, 3)[np.random.default_rng(1).permutation(32 * 32)].reshape(32, 32, 3)
    assert histogram_distance(image, shuffled) == pytest.approx(0.0, abs=1e-12)
    black, white = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    assert histogram_distance(black, white) == pytest.approx(1.0)
    half = black.copy()
    half[:4] = 255
    assert 0.0 < histogram_distance(black, half) < 1.0


def test_masked_rmse_measures_inside_the_mask_and_reports_outside():
    truth = scene(2)
    reference = np.concatenate([truth, np.full((32, 32, 1), 255, np.uint8)], axis=2)
    reference[8:16, 8:16, 3] = 0
    generated = truth.copy()
    generated[8:16, 8:16] = np.clip(truth[8:16, 8:16].astype(int) + 10, 0, 255)  # +10 inside, where it fits
    generated[0, 0] = truth[0, 0] // 2
    value, extra = masked_rmse(generated, reference)
    inside = (generated[8:16, 8:16].astype(float) - truth[8:16, 8:16]) ** 2
    assert value == pytest.approx(np.sqrt(inside.mean()))
    assert extra["rmse_outside"] > 0
    with pytest.raises(ControlkitError, match="masked region"):
        masked_rmse(generated, truth)


def test_controllability_compares_the_image_itself_for_tile_shuffle_and_inpaint():
    truth, other = scene(3), scene(4)
    tile = controllability("tile", [truth, other], [truth, truth])
    assert tile.name == "ssim_to_truth" and tile.higher_is_better
    assert tile.per_image[0] == pytest.approx(1.0) and tile.per_image[1] < 0.5
    assert tile.per_image[1] == pytest.approx(image_ssim(other, truth))
    shuffle = controllability("shuffle", [truth], [other])
    assert shuffle.name == "histogram_distance" and not shuffle.higher_is_better
    reference = np.concatenate([truth, np.full((32, 32, 1), 255, np.uint8)], axis=2)
    reference[:16, :, 3] = 0
    inpaint = controllability("inpaint", [truth, other], [reference, reference])
    assert inpaint.per_image[0] == 0.0 and inpaint.per_image[1] > 50
    assert inpaint.extra["rmse_outside"] > 0  # the second image changed the kept half too


def test_scribble_and_line_segments_are_scored_by_edge_f1_of_their_reannotation():
    from preprocessors import get_preprocessor

    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 200
    lines = get_preprocessor("mlsd", detect_resolution=None)
    result = controllability("mlsd", [image], [lines(image)], preprocessor=lines)
    assert result.name == "edge_f1" and result.value == pytest.approx(1.0)
    assert controllability("scribble", [image], [np.zeros((64, 64, 3), np.uint8)],
                           preprocessor=get_preprocessor("scribble", detect_resolution=None)).value == 0.0
