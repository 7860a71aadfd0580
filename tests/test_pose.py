"""Pose: OpenPose drawing against the reference tables, keypoint conversion, JSON round trip, mediapipe on a photo."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest

from controlkit.errors import ControlkitError
from preprocessors.openpose import (
    BODY_PARTS,
    COLORS,
    LIMBS,
    draw_openpose,
    empty_pose,
    flatten_keypoints,
    hand_edge_colors,
    load_openpose_json,
    render_openpose_json,
    write_openpose_json,
)
from preprocessors.pose import MEDIAPIPE_FACE, PosePreprocessor, openpose_body

# The reference's tables (ControlNet annotator/openpose/util.py, draw_bodypose), typed in independently.
REFERENCE_COLORS = [
    [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
    [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
    [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
]
REFERENCE_LIMBS_1_BASED = [
    [2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13], [13, 14],
    [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18],
]
NOSE, NECK, R_SHOULDER, R_ELBOW, L_SHOULDER = 0, 1, 2, 3, 5


def _pose(points: dict[int, tuple[float, float]], width: int = 512, height: int = 512, **extra) -> dict:
    body = np.zeros((18, 3))
    for part, (x, y) in points.items():
        body[part] = (x, y, 1.0)
    return {**empty_pose(width, height), "people": [{"pose_keypoints_2d": flatten_keypoints(body), **extra}]}


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def pose_preprocessor():
    return PosePreprocessor()


def test_tables_match_the_reference():
    assert [list(color) for color in COLORS] == REFERENCE_COLORS
    # only the first 17 limbs are drawn; the two ear-shoulder pairs never are
    assert [[a + 1, b + 1] for a, b in LIMBS] == REFERENCE_LIMBS_1_BASED[:17]
    assert BODY_PARTS[R_SHOULDER] == "right_shoulder" and BODY_PARTS[L_SHOULDER] == "left_shoulder"


def test_limb_is_60_percent_of_its_colour_on_black_and_joints_are_radius_4():
    canvas = draw_openpose(_pose({NECK: (100, 100), R_SHOULDER: (200, 100)}))
    assert canvas.shape == (512, 512, 3) and canvas.dtype == np.uint8
    assert canvas[100, 150].tolist() == [153, 0, 0]  # limb 0 (neck to right shoulder): 0.6 * (255, 0, 0)
    assert canvas[100 + 4, 150].tolist() == [153, 0, 0] and not canvas[100 + 5, 150].any()  # 4 px half width
    assert canvas[100, 96].tolist() == list(COLORS[NECK])  # joint beyond the limb's end, full colour
    assert canvas[100, 204].tolist() == list(COLORS[R_SHOULDER])
    assert not canvas[100, 95].any() and not canvas[100, 205].any()  # radius 4
    assert not canvas[:90].any() and not canvas[111:].any()  # black background


def test_every_limb_has_its_reference_colour():
    for limb, (start, end) in enumerate(LIMBS):
        canvas = draw_openpose(_pose({start: (100, 300), end: (300, 300)}))
        expected = [int(round(0.6 * channel)) for channel in REFERENCE_COLORS[limb]]
        assert canvas[300, 200].tolist() == expected, BODY_PARTS[start] + "-" + BODY_PARTS[end]


def test_missing_points_and_their_limbs_are_not_drawn():
    pose = _pose({NECK: (100, 100), R_SHOULDER: (200, 100)})
    pose["people"][0]["pose_keypoints_2d"][3 * R_SHOULDER + 2] = 0.0  # confidence 0: missing
    canvas = draw_openpose(pose)
    assert not canvas[100, 150].any() and not canvas[100, 204].any()
    assert canvas[100, 100].tolist() == list(COLORS[NECK])


def test_hand_and_face_drawing():
    hand = np.zeros((21, 3))
    hand[0], hand[1] = (100, 400, 1), (160, 400, 1)
    face = np.zeros((70, 3))
    face[0] = (300, 300, 1)
    canvas = draw_openpose(
        _pose({}, hand_right_keypoints_2d=flatten_keypoints(hand), face_keypoints_2d=flatten_keypoints(face))
    )
    assert canvas[400, 130].tolist() == [255, 0, 0]  # edge 0: hue 0
    assert canvas[400, 100].tolist() == [0, 0, 255] and canvas[400, 160].tolist() == [0, 0, 255]  # points
    assert not canvas[403, 130].any()  # a 2 px line
    assert canvas[300, 303].tolist() == [255, 255, 255] and not canvas[300, 304].any()  # face radius 3
    assert hand_edge_colors()[0] == (255.0, 0.0, 0.0) and hand_edge_colors()[5] == (127.5, 255.0, 0.0)
    assert draw_openpose(_pose({}, face_keypoints_2d=flatten_keypoints(face)), face=False).max() == 0


def test_strokes_scale_with_the_short_side():
    pose = _pose({NECK: (100, 100), R_SHOULDER: (200, 100)})
    large = draw_openpose(pose, (1024, 1024))  # twice the reference 512: 8 px half width, radius 8
    assert large[200 + 8, 300].tolist() == [153, 0, 0] and not large[200 + 9, 300].any()
    fixed = draw_openpose(pose, (1024, 1024), reference_resolution=None)
    assert fixed[200 + 4, 300].tolist() == [153, 0, 0] and not fixed[200 + 5, 300].any()


def test_openpose_body_conversion():
    landmarks = np.zeros((33, 3))
    landmarks[:, 2] = 0.9
    landmarks[0] = (50, 20, 0.99)  # nose
    landmarks[11] = (80, 60, 0.8)  # mediapipe left shoulder = the person's left
    landmarks[12] = (20, 60, 0.7)  # right shoulder
    landmarks[14] = (10, 90, 0.3)  # right elbow, low visibility
    landmarks[16] = (-5, 120, 0.9)  # right wrist outside the image
    body = openpose_body(landmarks, 100, 100, min_visibility=0.5)
    assert body[NOSE].tolist() == [50, 20, 0.99]
    assert body[L_SHOULDER].tolist() == [80, 60, 0.8] and body[R_SHOULDER].tolist() == [20, 60, 0.7]
    assert body[NECK].tolist() == [50, 60, 0.7]  # midpoint of the shoulders, the lower confidence
    assert body[R_ELBOW].tolist() == [0, 0, 0] and body[4].tolist() == [0, 0, 0]
    landmarks[:, 2] = 0.1
    assert openpose_body(landmarks, 100, 100, min_visibility=0.5) is None


def test_face_table_is_70_distinct_mesh_points():
    assert len(MEDIAPIPE_FACE) == 70 and len(set(MEDIAPIPE_FACE)) == 70
    assert MEDIAPIPE_FACE[68:] == (468, 473) and max(MEDIAPIPE_FACE) < 478


def test_check_ready():
    assert PosePreprocessor.check_ready() is None


def test_astronaut_keypoints_where_a_person_would_put_them(pose_preprocessor, astronaut):
    pose = pose_preprocessor.keypoints(astronaut)
    assert (pose["canvas_width"], pose["canvas_height"]) == (512, 512) and len(pose["people"]) == 1
    body = np.array(pose["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    assert np.hypot(*(body[NOSE, :2] - (223, 128))) < 10
    assert np.hypot(*(body[L_SHOULDER, :2] - (306, 257))) < 12
    assert np.hypot(*(body[R_SHOULDER, :2] - (113, 240))) < 12
    assert body[R_SHOULDER, 0] < body[NOSE, 0] < body[L_SHOULDER, 0]  # facing the camera: her right is image left
    assert body[14, 0] < body[15, 0] and body[16, 0] < body[17, 0]  # right eye / ear on the image's left
    np.testing.assert_allclose(body[NECK, :2], (body[L_SHOULDER, :2] + body[R_SHOULDER, :2]) / 2)
    assert (body[8:14, 2] == 0).all()  # hips and legs are out of the frame
    assert pose["people"][0]["face_keypoints_2d"] == [] and pose["people"][0]["hand_left_keypoints_2d"] == []
    json.dumps(pose)  # plain JSON types


def test_astronaut_map(pose_preprocessor, astronaut):
    pose_map = np.asarray(pose_preprocessor(astronaut))
    assert pose_map.shape == (512, 512, 3)
    body = np.array(pose_preprocessor.keypoints(astronaut)["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    middle = ((body[NECK, :2] + body[R_SHOULDER, :2]) / 2).astype(int)
    assert pose_map[middle[1], middle[0]].tolist() == [153, 0, 0]
    assert (pose_map.sum(axis=2) == 0).mean() > 0.9  # mostly black
    assert np.array_equal(pose_map, np.asarray(pose_preprocessor(astronaut)))  # deterministic


def test_json_round_trip_equals_direct_render(pose_preprocessor, astronaut, tmp_path):
    path = write_openpose_json(pose_preprocessor.keypoints(astronaut), tmp_path / "astronaut.json")
    for size in ((512, 512), (768, 640)):
        direct = np.asarray(pose_preprocessor(astronaut, output_size=size))
        rendered = np.asarray(render_openpose_json(path, size))
        assert direct.shape == (size[1], size[0], 3)
        assert np.array_equal(direct, rendered)


def test_hands_and_face_are_found_on_the_astronaut(astronaut):
    full = PosePreprocessor(hands=True, face=True)
    person = full.keypoints(astronaut)["people"][0]
    face = np.array(person["face_keypoints_2d"]).reshape(70, 3)
    assert (face[:, 2] > 0).all()
    assert face[36, 0] < face[68, 0] < face[39, 0]  # right pupil between the right eye's corners
    assert face[42, 0] < face[69, 0] < face[45, 0]
    for side in ("hand_left_keypoints_2d", "hand_right_keypoints_2d"):
        assert len(person[side]) in (0, 63)
    assert np.asarray(full(astronaut)).sum() > np.asarray(PosePreprocessor()(astronaut)).sum()


def test_no_person_gives_a_black_map_and_a_warning(pose_preprocessor):
    grey = np.full((240, 320, 3), 128, dtype=np.uint8)
    from preprocessors.base import EmptyMapWarning

    with pytest.warns(EmptyMapWarning, match="no person found in <array>") as caught:
        pose_map = np.asarray(pose_preprocessor(grey))
    assert [warning.message.reason for warning in caught] == ["no person found (black map)"]
    assert pose_map.shape == (240, 320, 3) and not pose_map.any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pose_preprocessor.keypoints(grey)["people"] == []


def test_pickles_after_use(pose_preprocessor, astronaut):
    pose_preprocessor(astronaut)
    copy = pickle.loads(pickle.dumps(pose_preprocessor))
    assert np.array_equal(np.asarray(copy(astronaut)), np.asarray(pose_preprocessor(astronaut)))


def test_json_reader_checks_and_body25(tmp_path):
    with pytest.raises(ControlkitError, match="pose_keypoints_2d"):
        load_openpose_json({**empty_pose(64, 64), "people": [{"pose_keypoints_2d": [1.0, 2.0]}]})
    with pytest.raises(ControlkitError, match="canvas_size"):
        load_openpose_json({"people": []})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ControlkitError, match="not valid JSON"):
        load_openpose_json(bad)
    coco = _pose({NECK: (100, 100), R_SHOULDER: (200, 100), 8: (120, 300)}, width=400, height=400)
    body18 = np.array(coco["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    body25 = np.zeros((25, 3))
    body25[[0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]] = body18
    body25[8] = (150, 300, 1)  # mid-hip, not a COCO part
    openpose_file = {"version": 1.3, "people": [{"pose_keypoints_2d": flatten_keypoints(body25)}]}
    rendered = render_openpose_json(openpose_file, canvas_size=(400, 400))
    assert np.array_equal(np.asarray(rendered), draw_openpose(coco))
