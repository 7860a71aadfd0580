"""Controllability metrics against known answers: perfect, worst, hand-computed, and skimage's own SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
from skimage.metrics import structural_similarity

from controlkit.errors import ConfigError
from preprocessors import PREPROCESSORS, get_preprocessor
from training.metrics import (
    METRICS,
    angular_error,
    controllability,
    edge_f1,
    keypoint_distance,
    keypoints_from_pose_map,
    rmse,
    ssim,
)

EMPTY = np.zeros((64, 64, 3), np.uint8)
FULL = np.full((64, 64, 3), 255, np.uint8)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut()[::2, ::2])  # (256, 256, 3)


def vertical_line(column: int, size: int = 64) -> np.ndarray:
    edges = np.zeros((size, size, 3), np.uint8)
    edges[8:56, column] = 255
    return edges


# --- edge F1 -------------------------------------------------------------------------------------------------


def test_edge_f1_perfect_worst_and_empty():
    line = vertical_line(20)
    assert edge_f1(line, line) == 1.0
    assert edge_f1(EMPTY, EMPTY) == 1.0
    assert edge_f1(EMPTY, line) == edge_f1(line, EMPTY) == 0.0
    assert edge_f1(EMPTY, FULL) == 0.0


def test_edge_f1_counts_a_shift_within_the_tolerance_only():
    assert edge_f1(vertical_line(21), vertical_line(20)) == 1.0  # one pixel off, default tolerance 1
    assert edge_f1(vertical_line(21), vertical_line(20), tolerance=0) == 0.0
    assert edge_f1(vertical_line(23), vertical_line(20)) == 0.0
    assert edge_f1(vertical_line(23), vertical_line(20), tolerance=3) == 1.0


def test_edge_f1_with_no_tolerance_is_the_exact_pixel_f1():
    reference = np.zeros((8, 8), np.uint8)
    predicted = np.zeros((8, 8), np.uint8)
    reference[0, :8] = reference[1, :2] = 255  # 10 reference edge pixels
    predicted[0, :6] = predicted[5, :4] = 255  # 10 predicted, 6 of them on reference edges
    precision, recall = 6 / 10, 6 / 10
    assert edge_f1(predicted, reference, tolerance=0) == pytest.approx(2 * precision * recall / (precision + recall))
    # Binary F1 is 2 TP / (2 TP + FP + FN), the torchmetrics BinaryF1Score definition.
    assert edge_f1(predicted, reference, tolerance=0) == pytest.approx(2 * 6 / (2 * 6 + 4 + 4))


def test_edge_f1_thresholds_grey_edges_at_half():
    faint = vertical_line(20) // 2  # 127: below the threshold, so no edge
    assert edge_f1(faint, vertical_line(20)) == 0.0
    assert edge_f1((vertical_line(20) // 255) * 128, vertical_line(20)) == 1.0


# --- SSIM, RMSE, normals --------------------------------------------------------------------------------------


def test_ssim_is_skimages_on_the_grey_maps(photo):
    edges = np.asarray(get_preprocessor("canny")(photo))
    noisy = np.clip(edges.astype(int) + np.random.default_rng(0).integers(-40, 40, edges.shape), 0, 255)
    noisy = noisy.astype(np.uint8)
    noisy[..., 1:] = noisy[..., :1]  # a grey map stored as RGB
    expected = structural_similarity(noisy[..., 0], edges[..., 0], data_range=255)
    assert ssim(noisy, edges) == pytest.approx(expected, abs=1e-12)
    assert 0.05 < expected < 0.95
    assert ssim(edges, edges) == pytest.approx(1.0)
    assert ssim(EMPTY, FULL) < 0.01


def test_rmse_hand_checked():
    half = EMPTY.copy()
    half[:32] = 3  # half the pixels differ by 3 grey levels
    assert rmse(half, EMPTY) == pytest.approx(math.sqrt(9 / 2))
    assert rmse(EMPTY, EMPTY) == 0.0
    assert rmse(EMPTY, FULL) == 255.0


def normal_map(vector) -> np.ndarray:
    vector = np.asarray(vector, float) / np.linalg.norm(vector)
    return np.broadcast_to(np.round((vector + 1) * 127.5), (16, 16, 3)).astype(np.uint8).copy()


def test_angular_error_in_degrees():
    up, right = normal_map([0, 0, 1]), normal_map([1, 0, 0])
    assert angular_error(up, up) == pytest.approx(0.0, abs=1e-6)
    assert angular_error(up, right) == pytest.approx(90.0, abs=0.5)
    assert angular_error(normal_map([0, 1, 1]), up) == pytest.approx(45.0, abs=0.5)
    assert angular_error(EMPTY, FULL) == pytest.approx(180.0)
    # The encoding's channel order does not matter: permuting both maps keeps the angle.
    assert angular_error(up[..., ::-1], right[..., ::-1]) == pytest.approx(angular_error(up, right))


# --- pose ----------------------------------------------------------------------------------------------------

#: A standing figure on a 300 x 400 canvas: 18 body points in OpenPose's COCO order, well apart.
FIGURE = [
    (150, 60), (150, 110), (110, 115), (95, 170), (90, 225), (190, 115), (205, 170), (210, 225), (125, 220),
    (120, 290), (118, 360), (175, 220), (180, 290), (182, 360), (140, 50), (160, 50), (128, 58), (172, 58),
]


def pose(points, width=300, height=400, shift=(0, 0)) -> dict:
    people = [{"pose_keypoints_2d": [v for x, y in person for v in (x + shift[0], y + shift[1], 1.0)]}
              for person in points]
    return {"people": people, "canvas_width": width, "canvas_height": height}


def test_keypoint_distance_known_answers():
    reference = pose([FIGURE])
    assert keypoint_distance(reference, reference) == (0.0, {"keypoints_found": 1.0})
    distance, extra = keypoint_distance(pose([FIGURE], shift=(3, 4)), reference)
    assert distance == pytest.approx(5 / 500) and extra["keypoints_found"] == 1.0  # diagonal of 300x400 is 500
    assert keypoint_distance(pose([]), reference) == (1.0, {"keypoints_found": 0.0})
    half = [list(FIGURE)]
    missing = pose(half)
    for index in range(0, 18, 2):
        missing["people"][0]["pose_keypoints_2d"][3 * index + 2] = 0.0
    assert keypoint_distance(missing, reference) == (0.0, {"keypoints_found": 0.5})
    distance, extra = keypoint_distance(reference, pose([]))
    assert math.isnan(distance) and math.isnan(extra["keypoints_found"])


def test_keypoint_distance_matches_people_in_any_order():
    other = [(x + 60, y) for x, y in FIGURE]
    assert keypoint_distance(pose([other, FIGURE]), pose([FIGURE, other]))[0] == 0.0


def test_keypoints_are_read_back_from_a_drawn_pose_map():
    from preprocessors.openpose import draw_openpose

    reference = pose([FIGURE])
    drawn = draw_openpose(reference, (300, 400))
    decoded = keypoints_from_pose_map(drawn)
    distance, extra = keypoint_distance(decoded, reference)
    assert extra["keypoints_found"] == 1.0 and distance * 500 < 1.5  # within 1.5 pixels
    assert keypoints_from_pose_map(np.zeros((40, 30, 3), np.uint8))["people"] == []


# --- controllability() ----------------------------------------------------------------------------------------


def test_the_metric_table_covers_registry_conditions_only():
    assert set(METRICS) <= set(PREPROCESSORS)
    assert {"canny", "softedge", "lineart", "depth", "pose", "normal"} <= set(METRICS)
    assert [METRICS[name].higher_is_better for name in ("canny", "softedge", "depth", "pose")] == [
        True, True, False, False,
    ]


def test_controllability_canny_perfect_partial_and_worst(photo):
    edges = get_preprocessor("canny")(photo)
    noisy = np.clip(photo.astype(int) + np.random.default_rng(1).normal(0, 25, photo.shape), 0, 255)
    grey = np.full_like(photo, 128)
    result = controllability("canny", [photo, noisy.astype(np.uint8), grey], [edges, edges, edges])
    assert (result.name, result.higher_is_better) == ("edge_f1", True)
    assert result.per_image[0] == 1.0 and result.per_image[2] == 0.0
    assert 0.05 < result.per_image[1] < 0.95
    assert result.value == pytest.approx(np.mean(result.per_image))


def test_controllability_resizes_the_generated_image_to_the_condition(photo):
    edges = get_preprocessor("canny")(photo)
    big = np.repeat(np.repeat(photo, 2, axis=0), 2, axis=1)  # generated at twice the size
    assert controllability("canny", [big], [edges]).value > 0.8


def test_controllability_uses_the_given_preprocessor_and_ssim(photo):
    lineart = get_preprocessor("lineart")
    reference = lineart(photo)
    result = controllability("lineart", [photo, np.zeros_like(photo)], [reference, reference], preprocessor=lineart)
    assert result.name == "ssim" and result.per_image[0] == pytest.approx(1.0)
    assert result.per_image[1] < 0.5


def test_controllability_rejects_unknown_conditions_and_length_mismatch(photo):
    with pytest.raises(ConfigError, match="no controllability metric for condition 'segment'.*known: canny"):
        controllability("segment", [photo], [photo])
    with pytest.raises(ConfigError, match="2 generated images but 1 input conditions"):
        controllability("canny", [photo, photo], [photo])


def test_controllability_pose_with_the_real_pose_preprocessor(photo):
    pose_module = pytest.importorskip("preprocessors.pose")
    if pose_module.PosePreprocessor.check_ready() is not None:
        pytest.skip(pose_module.PosePreprocessor.check_ready())
    import warnings

    annotator = get_preprocessor("pose")
    keypoints = annotator.keypoints(photo)
    assert keypoints["people"], "mediapipe finds the astronaut"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no person found" for the blank image
        result = controllability(
            "pose", [photo, photo, np.zeros_like(photo)], [annotator(photo), keypoints, keypoints],
            preprocessor=annotator,
        )
    assert (result.name, result.higher_is_better) == ("keypoint_distance", False)
    assert result.per_image[0] < 0.01 and result.per_image[1] == 0.0 and result.per_image[2] == 1.0
    assert result.extra["keypoints_found"] == pytest.approx((1 + 1 + 0) / 3, abs=0.1)
