"""The toy world: determinism, geometric consistency of image/depth/normals/masks, captions, keypoints, circles,
condition-map conventions (the dataset writer: test_toyworld_dataset.py; throughput: benchmarks/)."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from controlkit.demo.toyworld.figure import build_figure, figure_keypoints, sample_pose
from controlkit.demo.toyworld.render import Backdrop, Camera, Lighting, render
from controlkit.demo.toyworld.solids import Sphere
from controlkit.demo.toyworld.world import (
    COLOURS,
    MIN_VISIBLE_FRACTION,
    depth_map,
    normal_map,
    pose_map,
    render_circles,
    render_figure,
    render_scene,
)
from controlkit.errors import ConfigError
from controlkit.tiny import DEFAULT_WORDS
from preprocessors.openpose import BODY_PARTS

SETTING = re.compile(r"^(.*) on an? (\w+) floor with an? (\w+) background$")
K = {name: index for index, name in enumerate(BODY_PARTS)}


def _fields(sample):
    return {k: v for k, v in vars(sample).items()}


def _assert_same(a, b):
    for key, value in _fields(a).items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, getattr(b, key), err_msg=key)
        else:
            assert value == getattr(b, key), key


@pytest.mark.parametrize("render_fn", [render_scene, render_figure, render_circles])
def test_same_seed_same_sample_and_different_seeds_differ(render_fn):
    _assert_same(render_fn(11), render_fn(11))
    _assert_same(render_fn((3, 4)), render_fn((3, 4)))
    images = [render_fn(seed).image for seed in range(6)]
    for i in range(len(images)):
        for j in range(i):
            assert not np.array_equal(images[i], images[j])


@pytest.mark.parametrize("size", [64, 128, 96])
def test_sizes_and_dtypes(size):
    scene = render_scene(1, size=size)
    assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
    assert scene.depth.shape == (size, size) and scene.depth.dtype == np.float32
    assert np.isfinite(scene.depth).all() and scene.depth.min() > 0
    assert scene.normals.shape == (size, size, 3) and scene.normals.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(scene.normals, axis=-1), 1.0, atol=1e-5)
    assert scene.masks.shape == (size, size) and scene.keypoints is None
    figure = render_figure(1, size=size)
    assert figure.image.shape == (size, size, 3) and figure.keypoints.shape == (18, 3)
    circles = render_circles(1, size=size)
    assert circles.image.shape == circles.outline.shape == (size, size, 3) and circles.mask.shape == (size, size)


@pytest.mark.parametrize("size", [60, 8, 64.0, "64", True])
def test_bad_sizes_are_refused(size):
    with pytest.raises(ConfigError, match="`size` must be a multiple of 8"):
        render_scene(0, size=size)


def _points(depth: np.ndarray, focal: float) -> np.ndarray:
    """Back-project a depth map to camera-space points (x right, y up, z towards the viewer), (H, W, 3)."""
    height, width = depth.shape
    columns, rows = np.meshgrid(np.arange(width), np.arange(height))
    x = (columns - (width - 1) / 2) * depth / focal
    y = ((height - 1) / 2 - rows) * depth / focal
    return np.stack([x, y, -depth], axis=-1)


def _normals_from_depth(depth, focal):
    """Finite-difference normals (central differences) from depth, facing the viewer, (H-2, W-2, 3)."""
    points = _points(depth.astype(np.float64), focal)
    along_x = points[1:-1, 2:] - points[1:-1, :-2]
    along_y = points[:-2, 1:-1] - points[2:, 1:-1]  # rows go down; this difference points up the image
    normals = np.cross(along_x, along_y)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    facing = (normals * -points[1:-1, 1:-1]).sum(-1) < 0
    normals[facing] *= -1
    return normals


def _interior(masks):
    """Pixels (H-2, W-2) whose 8 neighbours all share their instance id (no depth discontinuity nearby)."""
    centre = masks[1:-1, 1:-1]
    same = np.ones_like(centre, dtype=bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            same &= masks[1 + dr : masks.shape[0] - 1 + dr, 1 + dc : masks.shape[1] - 1 + dc] == centre
    return same


def _angles(a, b):
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


def test_sphere_depth_and_normals_agree():
    camera = Camera.look_at([0.3, 1.5, 4.0], [0.0, 0.6, 0.0], fov_degrees=45, width=128, height=128)
    sphere = Sphere(1, np.array([0.8, 0.2, 0.2]), np.array([0.0, 0.6, 0.0]), 0.6)
    backdrop = Backdrop(np.full(3, 0.5), np.full(3, 0.8), wall_z=-3.0)
    buffers = render(camera, [sphere], backdrop, Lighting(np.array([0.3, 0.8, 0.5]) / 1.0, 0.8, 0.3))
    on_sphere = _interior(buffers.masks) & (buffers.masks[1:-1, 1:-1] == 1)
    assert on_sphere.sum() > 500
    finite = _normals_from_depth(buffers.depth, camera.focal)
    angles = _angles(finite, buffers.normals[1:-1, 1:-1])[on_sphere]
    assert np.median(angles) < 1.0 and np.percentile(angles, 95) < 5.0, (np.median(angles), angles.max())
    # Exact geometry: every sphere pixel back-projects onto the sphere, with the normal pointing from its centre.
    points = _points(buffers.depth, camera.focal)[buffers.masks == 1]
    centre = camera.to_camera(sphere.centre - camera.position)
    np.testing.assert_allclose(np.linalg.norm(points - centre, axis=-1), 0.6, atol=1e-4)
    np.testing.assert_allclose(buffers.normals[buffers.masks == 1], (points - centre) / 0.6, atol=1e-3)


@pytest.mark.parametrize("seed", range(4))
def test_scene_normals_agree_with_depth(seed):
    scene = render_scene(seed, size=128)
    inside = _interior(scene.masks)
    angles = _angles(_normals_from_depth(scene.depth, scene.focal), scene.normals[1:-1, 1:-1])[inside]
    # Box edges and cone apexes bend within a pixel; nearly every interior pixel is on a smooth patch.
    assert np.median(angles) < 1.0 and np.mean(angles < 5.0) > 0.97


@pytest.mark.parametrize("seed", range(12))
def test_masks_objects_and_caption(seed):
    scene = render_scene(seed)
    instances = [thing.instance for thing in scene.objects]
    assert instances == list(range(1, len(instances) + 1)) and 1 <= len(instances) <= 4
    assert set(np.unique(scene.masks)) == {0, *instances}
    for instance in instances:
        assert (scene.masks == instance).mean() >= MIN_VISIBLE_FRACTION
    # Objects are listed (and named) left to right.
    centres = [np.argwhere(scene.masks == i)[:, 1].mean() for i in instances]
    assert centres == sorted(centres) or len(centres) == 1 or _overlapping(scene.masks, instances)

    match = SETTING.match(scene.caption)
    assert match, scene.caption
    named = [re.fullmatch(r"an? (\w+) (\w+)", phrase).groups() for phrase in re.split(r", | and ", match[1])]
    assert named == [(thing.colour, thing.shape) for thing in scene.objects]
    colours = [thing.colour for thing in scene.objects] + [match[2], match[3]]
    assert len(set(colours)) == len(colours) and set(colours) <= set(COLOURS)
    assert set(re.findall(r"[a-z]+", scene.caption)) <= set(DEFAULT_WORDS)


def _overlapping(masks, instances):
    """Left-to-right order is by the objects' base centres; with occlusion the visible centroids may swap."""
    columns = [np.argwhere(masks == i)[:, 1] for i in instances]
    return any(a.max() >= b.min() for a, b in zip(columns, columns[1:]))


def test_requested_object_count():
    for count in (1, 2, 3, 4):
        scene = render_scene(count, n_objects=count)
        assert len(scene.objects) == count and scene.masks.max() == count
    with pytest.raises(ConfigError, match="n_objects"):
        render_scene(0, n_objects=5)


def test_object_colours_are_the_named_colours():
    """The most lit pixels of each object have its named colour's hue and saturation. Left out: white, black and
    grey (no hue) and brown (a dark orange: only brightness tells them apart, and shading changes brightness)."""
    chromatic = {name: _hue(np.array(rgb, float)) for name, rgb in COLOURS.items()
                 if name not in ("white", "black", "grey", "brown")}  # fmt: skip
    checked = 0
    for seed in range(10):
        scene = render_scene(seed, size=128)
        for thing in scene.objects:
            if thing.colour not in chromatic:
                continue
            pixels = scene.image[scene.masks == thing.instance].astype(float)
            bright = pixels[pixels.sum(1) >= np.percentile(pixels.sum(1), 75)].mean(0)
            nearest = min(chromatic, key=lambda name: _hue_distance(chromatic[name], _hue(bright)))
            assert nearest == thing.colour, (seed, thing, bright)
            checked += 1
    assert checked > 10


def _hue(rgb):
    """(hue in degrees, saturation 0..255) of an RGB colour."""
    hsv = cv2.cvtColor(np.clip(rgb, 0, 255).astype(np.uint8)[None, None], cv2.COLOR_RGB2HSV_FULL)[0, 0]
    return float(hsv[0]) * 360 / 256, float(hsv[1])


def _hue_distance(a, b):
    d = abs(a[0] - b[0]) % 360
    return min(d, 360 - d) + 0.2 * abs(a[1] - b[1])


# -- figure -------------------------------------------------------------------------------------------------

# Body segments (limbs, then torso and face); the first 12 run through the middle of a capsule.
SEGMENTS = [
    ("neck", "right_shoulder"), ("neck", "left_shoulder"), ("right_shoulder", "right_elbow"),
    ("right_elbow", "right_wrist"), ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
    ("right_hip", "right_knee"), ("right_knee", "right_ankle"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
    ("neck", "right_hip"), ("neck", "left_hip"), ("neck", "nose"), ("nose", "right_eye"), ("nose", "left_eye"),
    ("right_eye", "right_ear"), ("left_eye", "left_ear"),
]  # fmt: skip


@pytest.mark.parametrize("size", [64, 128])
def test_keypoints_lie_on_the_figure(size):
    on_limbs, near_skeleton = [], []
    for seed in range(10):
        scene = render_figure(seed, size=size)
        points = scene.keypoints
        visible = points[:, 2] > 0
        assert visible.sum() >= 13, (seed, points)
        assert (points[visible, :2] >= 0).all() and (points[visible, :2] <= size - 1).all()
        figure = scene.masks == 1
        grown = cv2.dilate(figure.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        # Points along each limb between visible keypoints are figure pixels (within one pixel).
        for start, end in SEGMENTS[:12]:
            if visible[K[start]] and visible[K[end]]:
                for t in np.linspace(0.1, 0.9, 9):
                    x, y = points[K[start], :2] * (1 - t) + points[K[end], :2] * t
                    on_limbs.append(grown[int(round(y)), int(round(x))])
        # And every figure pixel is near the skeleton: within 25 cm of a segment (the torso's radius is 13 cm).
        skeleton = np.full((size, size), 255, np.uint8)
        for start, end in SEGMENTS:
            a, b = (tuple(int(round(v)) for v in points[K[name], :2]) for name in (start, end))
            cv2.line(skeleton, a, b, 0, 1)
        distance = cv2.distanceTransform(skeleton, cv2.DIST_L2, 5)
        tolerance = scene.focal * 0.25 / scene.depth + 1.5
        near_skeleton.append((distance <= tolerance)[figure].mean())
    assert np.mean(on_limbs) > 0.97, np.mean(on_limbs)
    assert min(near_skeleton) > 0.98, near_skeleton


def test_right_is_the_figures_own_right():
    camera = Camera.look_at([0.0, 1.0, 5.0], [0.0, 1.0, 0.0], fov_degrees=45, width=64, height=64)
    pose = sample_pose(np.random.default_rng(0), "standing")
    facing = build_figure(pose, [0.0, 0.0, 0.0], 0.0, instance=1, albedo=np.ones(3))
    xy, _ = camera.project(facing.joints)
    for part in ("shoulder", "hip", "eye", "ear", "knee"):
        assert xy[K[f"right_{part}"], 0] < xy[K[f"left_{part}"], 0]  # facing us, its right is on the image's left
    away = build_figure(pose, [0.0, 0.0, 0.0], np.pi, instance=1, albedo=np.ones(3))
    xy, _ = camera.project(away.joints)
    assert xy[K["right_shoulder"], 0] > xy[K["left_shoulder"], 0]
    buffers = render(camera, away.solids, Backdrop(np.zeros(3), np.zeros(3), -3.0), Lighting(np.eye(3)[1], 1, 0.3))
    keypoints = figure_keypoints(away, camera, buffers.depth, buffers.masks, instance=1)
    assert keypoints[[K["nose"], K["right_eye"], K["left_eye"]], 2].tolist() == [0.0, 0.0, 0.0]  # face turned away
    assert keypoints[[K["neck"], K["right_hip"], K["left_knee"]], 2].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("action, words", [("standing", "standing"), ("walking", "walking"),
                                           ("raised_arms", "with raised arms")])  # fmt: skip
def test_figure_caption_and_pose(action, words):
    scene = render_figure(5, action=action)
    person = scene.objects[0]
    assert person.shape == "person" and person.instance == 1
    assert scene.caption.startswith(f"a{'n' if person.colour[0] in 'aeiou' else ''} {person.colour} person {words}")
    assert SETTING.match(scene.caption) and set(re.findall(r"[a-z]+", scene.caption)) <= set(DEFAULT_WORDS)
    assert set(np.unique(scene.masks)) == {0, *(thing.instance for thing in scene.objects)}
    wrists_above_head = scene.keypoints[[K["right_wrist"], K["left_wrist"]], 1] < scene.keypoints[K["nose"], 1]
    assert wrists_above_head.all() == (action == "raised_arms")


def test_figures_placed_anywhere_stay_whole_and_spread_over_the_frame():
    centred, anywhere = [], []
    for index in range(24):
        assert np.array_equal(render_figure((3, index)).image, render_figure((3, index), anywhere=False).image)
        for framing, boxes in ((False, centred), (True, anywhere)):
            scene = render_figure((3, index), anywhere=framing)
            points = scene.keypoints[scene.keypoints[:, 2] > 0, :2]
            assert len(points) >= 12 and points.min() >= 0 and points.max() <= 63  # the figure stays whole
            boxes.append((points.mean(axis=0), np.ptp(points[:, 1])))
    centres = np.array([centre for centre, _ in anywhere])
    assert np.abs(np.array([centre for centre, _ in centred]) - 31.5).max() < 10  # centred: always the middle
    assert centres[:, 0].min() < 20 and centres[:, 0].max() > 44  # anywhere: left and right
    assert min(height for _, height in anywhere) < 0.7 * min(height for _, height in centred)  # and smaller


def test_pose_map_is_drawn_at_the_keypoints():
    scene = render_figure(2, size=128)
    drawn = pose_map(scene)
    assert drawn.shape == (128, 128, 3) and drawn.dtype == np.uint8
    for x, y, visible in scene.keypoints:
        if visible:
            assert drawn[int(y), int(x)].max() > 0
    assert (drawn.max(-1) > 0).mean() < 0.2  # a thin skeleton, not a filled figure


# -- circles ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, size", [(0, 64), (1, 64), (2, 128), (3, 128), (4, 96)])
def test_circle_outline_is_the_boundary_of_the_filled_target(seed, size):
    sample = render_circles(seed, size=size)
    colour, background = np.array(COLOURS[sample.colour]), np.array(COLOURS[sample.background])
    pixels = sample.image.astype(float)
    filled = np.linalg.norm(pixels - colour, axis=-1) < np.linalg.norm(pixels - background, axis=-1)
    assert abs(filled.sum() - np.pi * sample.radius**2) < 2 * np.pi * sample.radius  # the disc, within its rim
    assert set(np.unique(sample.outline)) == {0, 255}
    boundary = filled & ~(cv2.erode(filled.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
    outline = sample.outline[:, :, 0] > 0
    to_boundary = cv2.distanceTransform((~boundary).astype(np.uint8), cv2.DIST_L2, 5)
    to_outline = cv2.distanceTransform((~outline).astype(np.uint8), cv2.DIST_L2, 5)
    stroke = max(1.5, size // 64)  # the outline's documented width
    assert to_boundary[outline].max() <= stroke and to_outline[boundary].max() <= stroke
    cx, cy = sample.centre
    assert tuple(sample.image[int(cy), int(cx)]) == COLOURS[sample.colour]
    assert tuple(sample.image[0, 0]) == COLOURS[sample.background]
    colour, background = sample.colour, sample.background
    assert sample.caption == f"{_a(colour)} {colour} circle on {_a(background)} {background} background"


def _a(word):
    return "an" if word[0] in "aeiou" else "a"


# -- condition maps -----------------------------------------------------------------------------------------


def test_depth_map_is_relative_inverse_depth_near_bright():
    depth = np.array([[1.0, 2.0], [4.0, 8.0]], dtype=np.float32)
    mapped = depth_map(depth)
    assert mapped.shape == (2, 2, 3) and (mapped[..., 0] == mapped[..., 2]).all()
    # 1/d = 1, .5, .25, .125 -> min-max -> 255, 109, 36, 0 (truncated)
    assert mapped[..., 0].tolist() == [[255, 109], [36, 0]]
    scene = render_scene(3)
    grey = depth_map(scene.depth)[..., 0].astype(int)
    order = np.argsort(scene.depth.ravel())
    assert (np.diff(grey.ravel()[order]) <= 0).all()  # nearer is never darker


def test_normal_map_channels():
    """R = towards the viewer, G = up, B = left (MiDaS normal (left, up, front) in the app's reversed order)."""
    facing, up, left, right = [0, 0, 1], [0, 1, 0], [-1, 0, 0], [1, 0, 0]
    mapped = normal_map(np.array([[facing, up, left, right]], dtype=np.float32))[0]
    assert mapped.tolist() == [[255, 127, 127], [127, 255, 127], [127, 127, 255], [127, 127, 0]]


def test_normal_map_agrees_with_the_normal_preprocessor_on_the_same_depth():
    """ControlNet 1.0's normals from depth (`preprocessors.normal.normals_from_depth`, on the scene's inverse
    depth) have the same channel signs as the ground-truth map wherever the surface is clearly tilted, and the
    same flat background with the same `bg_threshold`."""
    from preprocessors.normal import normals_from_depth

    for seed in range(3):
        scene = render_scene(seed, size=128)
        inverse = 1.0 / scene.depth
        # A depth network's raw inverse depth has an arbitrary scale (DPT's is in the thousands); the signs of the
        # normals do not depend on it, their tilt does: scaled up so that slopes are not lost to uint8 rounding.
        reference = normals_from_depth(inverse * 1e4, bg_threshold=0.0).astype(float) - 127.5
        mapped = normal_map(scene.normals).astype(float) - 127.5
        inside = np.zeros_like(scene.masks, dtype=bool)
        inside[1:-1, 1:-1] = _interior(scene.masks)
        for channel in (1, 2):  # up, left (the reference's z channel only says "faces the camera")
            tilted = inside & (np.abs(mapped[..., channel]) > 0.3 * 127.5)
            agree = np.sign(mapped[..., channel][tilted]) == np.sign(reference[..., channel][tilted])
            assert tilted.sum() > 100 and agree.mean() > 0.95, (seed, channel, agree.mean())  # flipped: < 0.05
        flat = normal_map(scene.normals, scene.depth, bg_threshold=0.4)
        reference_flat = normals_from_depth(inverse, bg_threshold=0.4)
        far = (inverse - inverse.min()) / (inverse.max() - inverse.min()) < 0.4
        assert far.mean() > 0.1
        assert (flat[far] == [255, 127, 127]).all() and (reference_flat[far] == [255, 127, 127]).all()
        np.testing.assert_array_equal(flat[~far], normal_map(scene.normals)[~far])
    wall = scene.normals[..., 2] > 0.999
    assert (normal_map(scene.normals)[wall] >= [254, 120, 120]).all()
    with pytest.raises(ConfigError, match="needs the `depth` map"):
        normal_map(scene.normals, bg_threshold=0.4)


# -- dataset writer -----------------------------------------------------------------------------------------
