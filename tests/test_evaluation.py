"""`training.evaluation.evaluate_controlnet` on a tiny real base and ControlNet: the maps it generates from (computed
with the stored or given preprocessor parameters, or given), the images, the metric, bad pairs."""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from controlkit.control import Control
from controlkit.controlnet import ConditionMetadata, build_controlnet
from controlkit.errors import ConfigError
from controlkit.pipeline import generate
from preprocessors.registry import get_preprocessor
from training.data.dataset import load_pairs
from training.evaluation import DEFAULT_NEGATIVE_PROMPT, evaluate_controlnet
from training.metrics import controllability

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)
SETTINGS = {"resolution": 32, "steps": 2, "seed": 1, "progress": False}
STORED = {"low_threshold": 300, "high_threshold": 700}


@pytest.fixture(scope="module")
def control(components):
    """A canny ControlNet with non-zero zero-convolutions (as after training), stored with thresholds 300/700
    (far from the defaults, 100/200, so that maps and re-annotations with either differ)."""
    torch.manual_seed(1)
    controlnet = build_controlnet(components["unet"], conditioning_embedding_out_channels=(16, 32))
    for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
        torch.nn.init.normal_(conv.weight, std=0.3)
    metadata = ConditionMetadata(condition="canny", preprocessor="canny", preprocessor_params=STORED)
    return Control(None, controlnet.eval(), metadata=metadata)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut()[::8, ::8])  # (64, 64, 3)


@pytest.fixture()
def pairs(tmp_path, photo):
    """A photo without a map (computed), a missing image, and a 32 x 32 photo with its own map."""
    Image.fromarray(photo).save(tmp_path / "0.png")
    Image.fromarray(np.ascontiguousarray(photo[::2, ::2])).save(tmp_path / "2.png")
    given = np.zeros((32, 32, 3), np.uint8)
    given[8:24, 16] = 255
    given[16, 4:28] = 255
    Image.fromarray(given).save(tmp_path / "2-map.png")
    lines = [{"image": "0.png", "prompt": "a red sphere"}, {"image": "gone.png", "prompt": "a blue cube"},
             {"image": "2.png", "condition": "2-map.png", "prompt": "a green cone"}]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return load_pairs(tmp_path / "val.jsonl")


def halves(path) -> tuple[np.ndarray, np.ndarray]:
    grid = np.asarray(Image.open(path))
    return grid[:, :32], grid[:, 32:]


def canny_at_32(photo: np.ndarray, low: int, high: int) -> np.ndarray:
    """What the dataset computes: the photo's short side resized to 32 (area), then Canny, as RGB."""
    edges = cv2.Canny(cv2.resize(photo, (32, 32), interpolation=cv2.INTER_AREA), low, high)
    return np.repeat(edges[..., None], 3, axis=2)


def test_generates_from_each_map_and_scores_the_reannotated_images(base, control, pairs, photo, tmp_path):
    result = evaluate_controlnet(base, control, "canny", pairs, grid_folder=tmp_path / "grids", **SETTINGS)
    assert result.keys == ["0.png", "2.png"]
    assert [key for key, _ in result.bad_pairs] == ["gone.png"] and "no such file" in result.bad_pairs[0][1]
    grids = sorted((tmp_path / "grids").glob("*.png"))
    assert [grid.name for grid in grids] == ["00000.png", "00001.png"]
    (computed, first), (given, second) = halves(grids[0]), halves(grids[1])
    np.testing.assert_array_equal(computed, canny_at_32(photo, 300, 700))  # as stored with the ControlNet
    np.testing.assert_array_equal(given, np.asarray(Image.open(tmp_path / "2-map.png")))
    # Each image is what `generate` makes from its map and caption with the evaluation's settings.
    expected = generate(base, "a red sphere", [replace(control, image=computed)], steps=2, seed=1,
                        negative_prompt=DEFAULT_NEGATIVE_PROMPT, guidance_scale=7.5).images[0]
    np.testing.assert_array_equal(first, np.asarray(expected))
    # The metric re-annotates with the same (stored) parameters the maps were made with.
    metric = result.metric
    assert (metric.name, metric.higher_is_better, len(metric.per_image)) == ("edge_f1", True, 2)
    again = controllability("canny", [first, second], [computed, given], preprocessor=get_preprocessor(
        "canny", **STORED))
    assert metric.per_image == pytest.approx(again.per_image)
    default = controllability("canny", [first, second], [computed, given])
    assert metric.per_image != pytest.approx(default.per_image)  # so the check above tells the two apart
    assert metric.value == pytest.approx(np.mean(metric.per_image))
    assert all(0.0 <= value <= 1.0 for value in metric.per_image)


def test_given_parameters_go_over_the_stored_ones_and_other_preprocessors_params_are_ignored(
    base, control, pairs, photo, tmp_path
):
    evaluate_controlnet(base, control, "canny", pairs[:1], preprocessor_params={"low_threshold": 150},
                        grid_folder=tmp_path / "given", **SETTINGS)
    np.testing.assert_array_equal(halves(tmp_path / "given" / "00000.png")[0], canny_at_32(photo, 150, 700))
    depth = ConditionMetadata(condition="depth", preprocessor="depth", preprocessor_params=STORED)
    evaluate_controlnet(base, replace(control, metadata=depth), "canny", pairs[:1],
                        grid_folder=tmp_path / "other", **SETTINGS)
    np.testing.assert_array_equal(halves(tmp_path / "other" / "00000.png")[0], canny_at_32(photo, 100, 200))


def test_no_usable_pair_gives_no_metric_and_lists_them(base, control, pairs):
    result = evaluate_controlnet(base, control, "canny", pairs[1:2], **SETTINGS)
    assert result.metric is None and result.keys == []
    assert [key for key, _ in result.bad_pairs] == ["gone.png"]


def test_bad_condition_or_parameters_fail_before_generating(base, control, pairs):
    with pytest.raises(ConfigError, match="no controllability metric for condition 'segment'"):
        evaluate_controlnet(base, control, "segment", pairs, **SETTINGS)
    with pytest.raises(ConfigError, match="preprocessor 'canny': Unknown parameter"):
        evaluate_controlnet(base, control, "canny", pairs[2:], preprocessor_params={"bogus": 1}, **SETTINGS)
