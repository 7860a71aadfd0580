"""The weight-free ControlNet 1.1 entries: shuffle, tile, scribble, mlsd (the contract itself is in
test_contract.py; here, what each map must show)."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessors import get_preprocessor

QUADRANT_COLOURS = np.array([(220, 30, 30), (30, 200, 40), (40, 50, 210), (230, 220, 60)], dtype=np.float32)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()[40:190, 100:300].copy()


@pytest.fixture(scope="module")
def quadrants() -> np.ndarray:
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    for index, (rows, cols) in enumerate(((slice(0, 128), slice(0, 128)), (slice(0, 128), slice(128, 256)),
                                          (slice(128, 256), slice(0, 128)), (slice(128, 256), slice(128, 256)))):
        image[rows, cols] = QUADRANT_COLOURS[index]
    return image


def _high_frequency(image: np.ndarray) -> float:
    """Mean absolute Laplacian: the energy of the finest detail."""
    import cv2

    return float(np.abs(cv2.Laplacian(image.astype(np.float32), cv2.CV_32F)).mean())


# shuffle

def test_shuffle_same_seed_same_map_other_seed_other_map(photo):
    first = np.asarray(get_preprocessor("shuffle", seed=7)(photo))
    again = np.asarray(get_preprocessor("shuffle", seed=7)(photo))
    other = np.asarray(get_preprocessor("shuffle", seed=8)(photo))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 10


def test_shuffle_keeps_colours_and_moves_content(quadrants):
    shuffled = np.asarray(get_preprocessor("shuffle", seed=1, detect_resolution=None)(quadrants)).astype(np.float32)
    distance = np.linalg.norm(shuffled[:, :, None, :] - QUADRANT_COLOURS[None, None], axis=-1)
    nearest = distance.argmin(axis=-1)
    # Remap samples the image: pixels are its colours (blends only where the flow crosses a quadrant border).
    assert (distance.min(axis=-1) < 12).mean() > 0.8
    shares = np.bincount(nearest.ravel(), minlength=4) / nearest.size
    assert shares.min() > 0.03 and shares.max() < 0.9  # every colour kept, none smeared over the map
    assert (nearest != np.repeat(np.repeat(np.arange(4).reshape(2, 2), 128, 0), 128, 1)).mean() > 0.2  # moved


def test_shuffle_noise_is_the_references_stream():
    """np.random.seed(s) then uniform (the reference) draws what RandomState(s).uniform draws."""
    from preprocessors.shuffle import make_noise_disk

    noise = make_noise_disk(np.random.RandomState(5), 64, 96, 32)
    assert noise.shape == (64, 96) and noise.min() == 0 and noise.max() == pytest.approx(1)
    np.testing.assert_array_equal(noise, make_noise_disk(np.random.RandomState(5), 64, 96, 32))


# tile

@pytest.mark.parametrize("params", [{"down_sampling_rate": 4.0}, {"mode": "colorfix"}], ids=["resample", "colorfix"])
def test_tile_is_a_blurred_copy_with_the_same_colours(photo, params):
    tiled = np.asarray(get_preprocessor("tile", **params)(photo))
    assert tiled.shape == photo.shape
    assert _high_frequency(tiled) < 0.35 * _high_frequency(photo)
    np.testing.assert_allclose(tiled.reshape(-1, 3).mean(0), photo.reshape(-1, 3).mean(0), atol=2.0)


def test_tile_below_the_reference_cut_off_is_the_image(photo):
    np.testing.assert_array_equal(np.asarray(get_preprocessor("tile", down_sampling_rate=1.05)(photo)), photo)


# scribble

def test_scribble_xdog_is_binary_white_on_black_along_a_square():
    import cv2

    image = np.full((128, 128, 3), 255, dtype=np.uint8)
    image[32:96, 32:96] = 40  # a dark square on white
    array = np.asarray(get_preprocessor("scribble", detect_resolution=None)(image))
    assert set(np.unique(array)) <= {0, 255}
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all()
    strokes = array[..., 0] > 0
    outline = np.zeros((128, 128), dtype=np.uint8)
    cv2.rectangle(outline, (32, 32), (95, 95), 1, 1)
    near_outline = cv2.dilate(outline, np.ones((21, 21), np.uint8)) > 0
    assert strokes.any() and not strokes[~near_outline].any()  # only where the edges are
    for side in (strokes[30:40, 40:88], strokes[88:98, 40:88], strokes[40:88, 30:40], strokes[40:88, 88:98]):
        assert side.mean() > 0.2  # every side drawn
    assert strokes.mean() < 0.3  # black background


def test_scribble_xdog_of_a_photo_is_mostly_black(photo):
    array = np.asarray(get_preprocessor("scribble")(photo))
    assert set(np.unique(array)) <= {0, 255} and 0.01 < (array > 0).mean() < 0.5


def test_scribble_hed_is_binary_white_on_black(photo):
    from preprocessors.scribble import ScribblePreprocessor

    if ScribblePreprocessor.hed_missing():
        pytest.skip(ScribblePreprocessor.hed_missing())
    array = np.asarray(get_preprocessor("scribble", method="hed", detect_resolution=128)(photo))
    assert set(np.unique(array)) <= {0, 255} and 0.01 < (array > 0).mean() < 0.5


# mlsd

def test_mlsd_draws_the_sides_of_a_rectangle():
    import cv2

    image = np.zeros((256, 256, 3), dtype=np.uint8)
    cv2.rectangle(image, (60, 80), (200, 180), (255, 255, 255), -1)
    array = np.asarray(get_preprocessor("mlsd", detect_resolution=None)(image))[..., 0]
    lit = array > 0
    for band in (lit[77:84, 70:190], lit[177:184, 70:190]):  # top and bottom: one lit row along the side
        assert band.any(axis=0).mean() > 0.9
    for band in (lit[90:170, 57:64], lit[90:170, 197:204]):  # left and right
        assert band.any(axis=1).mean() > 0.9
    outline = np.zeros((256, 256), dtype=np.uint8)
    cv2.rectangle(outline, (60, 80), (200, 180), 1, 1)
    assert not lit[cv2.dilate(outline, np.ones((7, 7), np.uint8)) == 0].any()  # nothing elsewhere


def test_mlsd_of_a_blank_image_is_empty_and_max_lines_bounds_it():
    from preprocessors.mlsd import MlsdPreprocessor

    assert not np.asarray(get_preprocessor("mlsd")(np.full((96, 128, 3), 128, dtype=np.uint8))).any()
    image = np.zeros((128, 128, 3), dtype=np.uint8)
    image[40:90, 30:100] = 255
    assert len(MlsdPreprocessor(max_lines=1, detect_resolution=None).segments(image)) == 1
    assert MlsdPreprocessor.check_ready() is None


# bad parameters: one line from the registry's type checks, or the constructor's range checks

@pytest.mark.parametrize(("name", "params", "message"), [
    ("shuffle", {"seed": "abc"}, "parameter `seed` must be an integer"),
    ("shuffle", {"seed": 1.5}, "parameter `seed` must be an integer"),
    ("shuffle", {"cell_size": 0}, "`cell_size` must be >= 1"),
    ("tile", {"down_sampling_rate": "fast"}, "parameter `down_sampling_rate` must be a number"),
    ("tile", {"down_sampling_rate": 0.5}, "`down_sampling_rate` must be between 1 and 8"),
    ("tile", {"mode": 2}, "parameter `mode` must be a string"),
    ("tile", {"mode": "blur"}, "Unknown tile `mode`"),
    ("scribble", {"method": "pidinet"}, "Unknown scribble `method`"),
    ("scribble", {"threshold": "high"}, "parameter `threshold` must be an integer"),
    ("mlsd", {"min_length": None}, "parameter `min_length` must be a number"),
    ("mlsd", {"max_lines": 0}, "`max_lines` must be >= 1"),
    ("mlsd", {"score_threshold": 0.1}, "Unknown parameter"),
])
def test_bad_parameters_are_refused_in_one_line(name, params, message):
    with pytest.raises(ValueError, match=message) as info:
        get_preprocessor(name, **params)
    assert "\n" not in str(info.value)
