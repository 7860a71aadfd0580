"""OpenPose maps: the COCO-18 body layout, its colours and drawing, and OpenPose JSON in and out.

Nothing here needs a detector (or mediapipe): a pose is an OpenPose-format JSON dict, whatever produced it,

    {"version": 1.3, "canvas_width": W, "canvas_height": H,
     "people": [{"pose_keypoints_2d": [x, y, c] * 18,          # pixels of the W x H canvas; c = 0: missing
                 "hand_left_keypoints_2d": [x, y, c] * 21,     # or [] (the person's left hand)
                 "hand_right_keypoints_2d": [x, y, c] * 21,    # or []
                 "face_keypoints_2d": [x, y, c] * 70}]}        # or []

and `draw_openpose` renders it the way the ControlNet OpenPose annotator (`annotator/openpose/util.py`, the
`draw_bodypose`, `draw_handpose`, `draw_facepose` functions) drew the maps the released OpenPose ControlNets
were trained on: a black canvas; joints first, as filled circles of radius 4 in a fixed 18-colour table; then
each of 17 limbs as a filled ellipse 4 px wide in its colour, blended over the canvas at 60 %; hand edges 2 px
wide in rainbow (HSV) colours with blue points of radius 4; face points white, radius 3. "Right" is the person's
right, as in OpenPose. Coordinates are scaled to the drawing size before drawing, so a map drawn at any size is
sharp; stroke widths follow the reference at a 512-pixel short side (see `reference_resolution`).

A 25-point (BODY_25) body from OpenPose itself is read as its COCO-18 subset.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from controlkit.errors import ControlkitError

if TYPE_CHECKING:
    from PIL import Image

#: The 18 body keypoints, in OpenPose's COCO order.
BODY_PARTS = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
#: The drawn limbs as (from, to) indices into BODY_PARTS, in the reference's drawing order. The reference table
#: lists 19 pairs but draws only the first 17; the two ear-to-shoulder pairs never appear in maps.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
#: RGB colour of joint i and of limb i (the reference's 18-entry table; limbs use the first 17).
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
#: The 20 hand edges (OpenPose hand layout: 0 wrist, then 4 points per finger from thumb to little finger).
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)
NUM_HAND_POINTS = 21
#: OpenPose face: the 68 iBUG points plus the right (68) and left (69) pupils.
NUM_FACE_POINTS = 70

# Stroke sizes of the reference, in pixels of its drawing canvas (whose short side is 512 at the default
# detect resolution).
STICK_WIDTH = 4
JOINT_RADIUS = 4
LIMB_OPACITY = 0.6
HAND_LINE_WIDTH = 2
HAND_POINT_RADIUS = 4
HAND_POINT_COLOR = (0, 0, 255)
FACE_POINT_RADIUS = 3
FACE_POINT_COLOR = (255, 255, 255)
REFERENCE_RESOLUTION = 512

#: BODY_25 indices of the COCO-18 parts (BODY_25 adds a mid-hip at 8 and six foot points).
_BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
_PERSON_KEYS = {
    "pose_keypoints_2d": (18, 25),
    "hand_left_keypoints_2d": (NUM_HAND_POINTS,),
    "hand_right_keypoints_2d": (NUM_HAND_POINTS,),
    "face_keypoints_2d": (NUM_FACE_POINTS,),
}


def hand_edge_colors() -> list[tuple[float, float, float]]:
    """RGB colour of each hand edge: hue i/20 at full saturation and value, as floats in 0..255 (OpenCV rounds)."""
    return [tuple(channel * 255.0 for channel in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))
            for i in range(len(HAND_EDGES))]


def empty_pose(width: int, height: int) -> dict[str, Any]:
    """An OpenPose JSON dict with no people for a `width` x `height` canvas."""
    return {"version": 1.3, "people": [], "canvas_width": int(width), "canvas_height": int(height)}


def flatten_keypoints(points: np.ndarray | None) -> list[float]:
    """(N, 3) array of x, y, confidence to OpenPose's flat [x0, y0, c0, x1, ...] list; None gives []."""
    if points is None:
        return []
    return [float(value) for value in np.asarray(points, dtype=np.float64).reshape(-1)]


def draw_openpose(
    pose: dict[str, Any],
    size: tuple[int, int] | None = None,
    *,
    reference_resolution: int | None = REFERENCE_RESOLUTION,
    body: bool = True,
    hands: bool = True,
    face: bool = True,
) -> np.ndarray:
    """Draw an OpenPose JSON dict as a ControlNet pose map.

    Args:
        pose: OpenPose JSON dict (see the module docstring) with `canvas_width` and `canvas_height`.
        size: (width, height) of the map; default the canvas size. Keypoints are scaled to it.
        reference_resolution: the short side at which strokes have the reference's pixel sizes (limbs 4,
            joints 4, hand lines 2, face points 3); at other sizes they scale with the short side, so the map
            looks like the reference's map resized to that size. None keeps the reference sizes at any size.
        body, hands, face: which parts to draw.

    Returns:
        (H, W, 3) uint8 RGB map, black where nothing is drawn.

    Example:
        >>> pose = load_openpose_json("person.json")
        >>> pose_map = draw_openpose(pose, (512, 768))
    """
    import cv2

    canvas_width, canvas_height = _canvas_size(pose)
    width, height = size or (canvas_width, canvas_height)
    scale = 1.0 if reference_resolution is None else min(width, height) / float(reference_resolution)
    people = [_person_arrays(person) for person in pose.get("people", [])]
    to_pixels = np.array([width / canvas_width, height / canvas_height])
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    if body:
        positions = [person["body"][:, :2] * to_pixels for person in people]
        canvas = _draw_bodies(canvas, positions, [person["body"][:, 2] for person in people], scale)
    if hands:
        for person in people:
            for points in (person["hand_left"], person["hand_right"]):
                if points is not None:
                    _draw_hand(canvas, points[:, :2] * to_pixels, points[:, 2] > 0, scale)
    if face:
        radius = _stroke(FACE_POINT_RADIUS, scale)
        for person in people:
            if person["face"] is not None:
                for x, y in (person["face"][:, :2] * to_pixels)[person["face"][:, 2] > 0]:
                    cv2.circle(canvas, (int(x), int(y)), radius, FACE_POINT_COLOR, thickness=-1)
    return canvas


def _draw_bodies(canvas: np.ndarray, positions: list[np.ndarray], confidences: list[np.ndarray], scale: float):
    """Joints of everyone first, then limbs blended one at a time (the reference's order and blending)."""
    import cv2

    radius, stick = _stroke(JOINT_RADIUS, scale), _stroke(STICK_WIDTH, scale)
    for part in range(len(BODY_PARTS)):
        for points, conf in zip(positions, confidences):
            if conf[part] > 0:
                cv2.circle(canvas, (int(points[part, 0]), int(points[part, 1])), radius, COLORS[part], thickness=-1)
    for limb, (start, end) in enumerate(LIMBS):
        for points, conf in zip(positions, confidences):
            if conf[start] <= 0 or conf[end] <= 0:
                continue
            (x0, y0), (x1, y1) = points[start], points[end]
            center = (int((x0 + x1) / 2), int((y0 + y1) / 2))
            half_length = int(math.hypot(x0 - x1, y0 - y1) / 2)
            angle = int(math.degrees(math.atan2(y0 - y1, x0 - x1)))
            polygon = cv2.ellipse2Poly(center, (half_length, stick), angle, 0, 360, 1)
            layer = canvas.copy()
            cv2.fillConvexPoly(layer, polygon, COLORS[limb])
            canvas = cv2.addWeighted(canvas, 1.0 - LIMB_OPACITY, layer, LIMB_OPACITY, 0)
    return canvas


def _draw_hand(canvas: np.ndarray, points: np.ndarray, present: np.ndarray, scale: float) -> None:
    import cv2

    line_width, radius = _stroke(HAND_LINE_WIDTH, scale), _stroke(HAND_POINT_RADIUS, scale)
    for (start, end), color in zip(HAND_EDGES, hand_edge_colors()):
        if present[start] and present[end]:
            start_xy = (int(points[start, 0]), int(points[start, 1]))
            cv2.line(canvas, start_xy, (int(points[end, 0]), int(points[end, 1])), color, thickness=line_width)
    for (x, y), found in zip(points, present):
        if found:
            cv2.circle(canvas, (int(x), int(y)), radius, HAND_POINT_COLOR, thickness=-1)


def _stroke(reference_pixels: int, scale: float) -> int:
    return max(1, int(round(reference_pixels * scale)))


def _canvas_size(pose: dict[str, Any]) -> tuple[int, int]:
    try:
        width, height = int(pose["canvas_width"]), int(pose["canvas_height"])
    except (KeyError, TypeError, ValueError):
        raise ControlkitError(
            "OpenPose JSON has no valid `canvas_width`/`canvas_height`; pass `canvas_size=(width, height)` "
            "(the size of the image the keypoints were measured on)"
        ) from None
    if width <= 0 or height <= 0:
        raise ControlkitError(f"OpenPose JSON canvas size must be positive, got {width}x{height}")
    return width, height


def _person_arrays(person: dict[str, Any]) -> dict[str, np.ndarray | None]:
    """One `people[]` entry as arrays: body (18, 3) (c = 0: missing), hands (21, 3) and face (70, 3) or None."""
    arrays: dict[str, np.ndarray | None] = {}
    for key, counts in _PERSON_KEYS.items():
        values = person.get(key) or []
        try:
            flat = np.asarray(values, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ControlkitError(f"OpenPose JSON `{key}` must be a list of numbers") from None
        if flat.size == 0:
            arrays[key] = None
            continue
        if flat.size % 3 or flat.size // 3 not in counts:
            expected = " or ".join(str(3 * count) for count in counts)
            raise ControlkitError(
                f"OpenPose JSON `{key}` has {flat.size} values; expected {expected} ([x, y, c] per point)"
            )
        points = flat.reshape(-1, 3)
        arrays[key] = points[list(_BODY25_TO_COCO18)] if key == "pose_keypoints_2d" and len(points) == 25 else points
    body = arrays["pose_keypoints_2d"]
    return {
        "body": np.zeros((len(BODY_PARTS), 3)) if body is None else body,
        "hand_left": arrays["hand_left_keypoints_2d"],
        "hand_right": arrays["hand_right_keypoints_2d"],
        "face": arrays["face_keypoints_2d"],
    }


def load_openpose_json(
    source: str | os.PathLike | dict[str, Any], *, canvas_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Read and check an OpenPose JSON file (or dict).

    Args:
        source: a path to a .json file, or an already parsed dict.
        canvas_size: (width, height) of the image the keypoints were measured on, for JSON without
            `canvas_width`/`canvas_height` (OpenPose itself does not write them); it overrides them if given.

    Returns:
        The pose dict, with the canvas size set and every person's keypoint lists checked.

    Raises:
        ControlkitError: unreadable file, not JSON, or keypoint lists of the wrong length.
    """
    if isinstance(source, dict):
        pose = dict(source)
    else:
        path = Path(source)
        try:
            pose = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ControlkitError(f"{path}: cannot read OpenPose JSON ({error.strerror or error})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ControlkitError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(pose, dict) or not isinstance(pose.get("people", []), list):
        raise ControlkitError("OpenPose JSON must be an object with a `people` list")
    if canvas_size is not None:
        pose["canvas_width"], pose["canvas_height"] = int(canvas_size[0]), int(canvas_size[1])
    _canvas_size(pose)
    for person in pose.get("people", []):
        if not isinstance(person, dict):
            raise ControlkitError("OpenPose JSON `people` entries must be objects")
        _person_arrays(person)
    return pose


def write_openpose_json(pose: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write an OpenPose JSON dict (as `PosePreprocessor.keypoints` returns) to `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pose), encoding="utf-8")
    return path


def render_openpose_json(
    source: str | os.PathLike | dict[str, Any],
    size: tuple[int, int] | None = None,
    *,
    canvas_size: tuple[int, int] | None = None,
    reference_resolution: int | None = REFERENCE_RESOLUTION,
    body: bool = True,
    hands: bool = True,
    face: bool = True,
) -> Image.Image:
    """Render an OpenPose JSON file (or dict) to a pose map, a PIL RGB image; arguments as `load_openpose_json`
    and `draw_openpose`.

    Example:
        >>> render_openpose_json("person.json", (512, 512)).save("pose_map.png")
    """
    from controlkit.image import to_pil

    pose = load_openpose_json(source, canvas_size=canvas_size)
    return to_pil(draw_openpose(pose, size, reference_resolution=reference_resolution, body=body, hands=hands,
                                face=face))
