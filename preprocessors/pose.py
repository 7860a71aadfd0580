"""Pose maps from mediapipe, in OpenPose's layout: what the OpenPose ControlNets were trained on.

The OpenPose body network itself is not redistributable for commercial use and not available offline; mediapipe
0.10.21 bundles its legacy pose, hand and face-mesh models, so they run anywhere with no download. Their
landmarks are converted to OpenPose's keypoints and drawn with OpenPose's colours and stroke sizes
(`preprocessors.openpose`):

- body: mediapipe's 33 pose landmarks give the 18 COCO keypoints; the neck is the midpoint of the shoulders.
  mediapipe's "left" is the person's left, as OpenPose's is. Points whose visibility is below `min_visibility`,
  or that fall outside the image, are dropped (OpenPose cannot see them either).
- hands: mediapipe's 21 hand landmarks are OpenPose's 21 hand points in the same order.
- face: 70 OpenPose face points (the 68 iBUG points and the two pupils) picked from the 478-point face mesh.

Like the reference annotator, it draws one body (the legacy mediapipe pose model finds the most prominent
person), and finds hands and a face only when it found a body. A photo with no person gives a black map and an
`EmptyMapWarning` naming the image (folder annotation lists those files), never an error.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from controlkit.errors import MissingDependencyError
from controlkit.image import ImageInput, image_name, to_pil
from preprocessors.base import EmptyMapWarning, Preprocessor, check_detect_resolution
from preprocessors.openpose import draw_openpose, empty_pose, flatten_keypoints

#: mediapipe pose landmark index of each OpenPose body part (None: the neck, from both shoulders).
MEDIAPIPE_BODY = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
_LEFT_SHOULDER, _RIGHT_SHOULDER = 11, 12
#: Face-mesh landmark of each OpenPose face point: the 68 iBUG points, then the right and left iris centres.
#: Jaw 0-16 runs from the person's right temple round the chin; brows 17-26; nose bridge 27-30, nostrils
#: 31-35; eyes 36-47 (corners and lids); outer lips 48-59; inner lips 60-67.
MEDIAPIPE_FACE = (
    127, 234, 93, 132, 58, 172, 136, 176, 152, 400, 365, 397, 288, 361, 323, 454, 356,
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    168, 197, 5, 1, 98, 97, 2, 326, 327,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91,
    78, 81, 13, 311, 308, 402, 14, 178,
    468, 473,
)
#: The mediapipe release whose wheel bundles the legacy pose model (newer ones download it at run time).
MEDIAPIPE_VERSION = "0.10.21"
_INSTALL = f"pip install mediapipe=={MEDIAPIPE_VERSION}"
#: The reason of the `EmptyMapWarning` of an image with no person.
NO_PERSON = "no person found (black map)"
_BUNDLED_MODEL = "modules/pose_landmark/pose_landmark_full.tflite"


class PosePreprocessor(Preprocessor):
    """OpenPose-style pose maps (body; hands and face optional) and their keypoints as OpenPose JSON.

    Args:
        hands: also find and draw hands ("openpose_hand"/"openpose_full" in ControlNet 1.1).
        face: also find and draw the face points ("openpose_face"/"openpose_full").
        min_visibility: drop body points whose mediapipe visibility is below this (0..1). 0.5 is mediapipe's
            own drawing threshold; lower it to keep more guessed (occluded or cut-off) limbs.
        min_detection_confidence: mediapipe's person (and hand, face) detection threshold, 0..1.
        detect_resolution: mediapipe runs on the image resized as the reference annotator resizes it, and
            strokes are as wide as the reference's at this short side (its maps were drawn at 512 and resized);
            None runs on the image as given and draws the reference's pixel sizes at any size.

    The map is drawn at the output size from the keypoints (never drawn small and resized). One instance keeps
    its mediapipe graphs, so reuse it; it is not thread-safe (use one per thread or process).

    Example:
        >>> pose = PosePreprocessor(hands=True)
        >>> pose_map = pose("person.jpg")                 # PIL RGB, black background
        >>> write_openpose_json(pose.keypoints("person.jpg"), "person.json")
    """

    name = "pose"

    def __init__(
        self,
        *,
        hands: bool = False,
        face: bool = False,
        min_visibility: float = 0.5,
        min_detection_confidence: float = 0.5,
        detect_resolution: int | None = 512,
    ):
        thresholds = {"min_visibility": min_visibility, "min_detection_confidence": min_detection_confidence}
        for label, value in thresholds.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"`{label}` must be a number in [0, 1], got {value!r}")
        self.hands = bool(hands)
        self.face = bool(face)
        self.min_visibility = float(min_visibility)
        self.min_detection_confidence = float(min_detection_confidence)
        self.detect_resolution = check_detect_resolution(detect_resolution)
        self._solutions: dict[str, Any] = {}
        self._last: tuple[bytes, dict[str, Any]] | None = None

    @classmethod
    def check_ready(cls) -> str | None:
        message = f"mediapipe {MEDIAPIPE_VERSION}, which bundles the pose model: {_INSTALL}"
        try:
            import mediapipe
            from mediapipe.python.solutions import pose  # noqa: F401
        except ImportError:
            return message
        from controlkit.weights import package_file

        if package_file("mediapipe", _BUNDLED_MODEL) is None:
            return f"mediapipe {getattr(mediapipe, '__version__', '?')} has no bundled pose model; {message}"
        return None

    def __call__(
        self, image: ImageInput | Sequence[ImageInput], *, output_size: tuple[int, int] | None = None
    ) -> Image.Image | list[Image.Image]:
        """Pose map(s) of the same size as the input (or `output_size` = (width, height)), PIL RGB."""
        if isinstance(image, (list, tuple)):
            return [self(item, output_size=output_size) for item in image]
        rgb = self.load_input(image, output_size)
        size = output_size or (rgb.shape[1], rgb.shape[0])
        return to_pil(self.draw(self._keypoints(rgb, image_name(image)), size))

    def detect(self, image: np.ndarray) -> np.ndarray:
        return self.draw(self._keypoints(image), (image.shape[1], image.shape[0]))

    def draw(self, pose: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
        """Draw keypoints (an OpenPose JSON dict) at `size` = (width, height) with this instance's settings."""
        reference = None
        if self.detect_resolution is not None:
            # The reference draws on the detect-resolution image, whose short side `resize_image` rounds to 64.
            reference = max(64, int(np.round(self.detect_resolution / 64.0)) * 64)
        return draw_openpose(pose, size, reference_resolution=reference, hands=self.hands, face=self.face)

    def keypoints(self, image: ImageInput) -> dict[str, Any]:
        """OpenPose JSON dict of the image: `people` (zero or one person) with `pose_keypoints_2d` (18 points),
        `hand_left/right_keypoints_2d`, `face_keypoints_2d` ([] when not requested or not found), in pixels of
        the image (`canvas_width` x `canvas_height`). Confidence 0 marks a missing point."""
        return self._keypoints(self.load_input(image), image_name(image))

    def _keypoints(self, rgb: np.ndarray, name: str = "the image") -> dict[str, Any]:
        # `annotate --json` asks for the map and the keypoints of the same image: detect once.
        hasher = hashlib.blake2b(str(rgb.shape).encode(), digest_size=16)
        hasher.update(memoryview(np.ascontiguousarray(rgb)).cast("B"))
        digest = hasher.digest()
        if self._last is not None and self._last[0] == digest:
            return copy.deepcopy(self._last[1])
        height, width = rgb.shape[:2]
        small = self.at_detect_resolution(rgb)
        pose = empty_pose(width, height)
        body = self._body(small, width, height)
        if body is None:
            warnings.warn(EmptyMapWarning(f"pose: no person found in {name}; the pose map is black", NO_PERSON),
                          stacklevel=3)
        else:
            hands = self._hands(small, width, height) if self.hands else {}
            pose["people"].append({
                "pose_keypoints_2d": flatten_keypoints(body),
                "face_keypoints_2d": flatten_keypoints(self._face(small, width, height) if self.face else None),
                "hand_left_keypoints_2d": hands.get("hand_left_keypoints_2d", []),
                "hand_right_keypoints_2d": hands.get("hand_right_keypoints_2d", []),
            })
        self._last = (digest, pose)
        return copy.deepcopy(pose)

    def _solution(self, kind: str) -> Any:
        """The mediapipe graph of `kind`, built once per instance (static-image mode: deterministic per image)."""
        if kind not in self._solutions:
            self._solutions[kind] = _build_solution(kind, self.min_detection_confidence)
        return self._solutions[kind]

    def _body(self, rgb: np.ndarray, width: int, height: int) -> np.ndarray | None:
        result = self._solution("pose").process(rgb)
        if result.pose_landmarks is None:
            return None
        landmarks = _landmark_array(result.pose_landmarks, width, height, visibility=True)
        return openpose_body(landmarks, width, height, min_visibility=self.min_visibility)

    def _hands(self, rgb: np.ndarray, width: int, height: int) -> dict[str, list[float]]:
        result = self._solution("hands").process(rgb)
        found: dict[str, tuple[float, np.ndarray]] = {}
        for landmarks, handedness in zip(result.multi_hand_landmarks or [], result.multi_handedness or []):
            label, score = handedness.classification[0].label, float(handedness.classification[0].score)
            # mediapipe labels hands as seen in a mirrored (selfie) image; in a photo its "Left" is the
            # person's right hand.
            key = "hand_right_keypoints_2d" if label == "Left" else "hand_left_keypoints_2d"
            points = _landmark_array(landmarks, width, height)
            points[:, 2] = np.where(_inside(points, width, height), score, 0.0)
            points[points[:, 2] <= 0] = 0.0
            if key not in found or score > found[key][0]:
                found[key] = (score, points)
        return {
            key: flatten_keypoints(found[key][1]) if key in found else []
            for key in ("hand_left_keypoints_2d", "hand_right_keypoints_2d")
        }

    def _face(self, rgb: np.ndarray, width: int, height: int) -> np.ndarray | None:
        result = self._solution("face").process(rgb)
        if not result.multi_face_landmarks:
            return None
        mesh = _landmark_array(result.multi_face_landmarks[0], width, height)
        points = mesh[list(MEDIAPIPE_FACE)]
        points[:, 2] = _inside(points, width, height).astype(np.float64)  # the face mesh has no per-point score
        points[points[:, 2] <= 0] = 0.0
        return points

    def __getstate__(self) -> dict[str, Any]:
        # mediapipe graphs cannot be pickled (worker processes rebuild them on first use).
        return {**self.__dict__, "_solutions": {}, "_last": None}

    def close(self) -> None:
        """Release the mediapipe graphs now (they are also released when the instance is garbage collected)."""
        for solution in self._solutions.values():
            solution.close()
        self._solutions = {}


def openpose_body(
    landmarks: np.ndarray, width: int, height: int, *, min_visibility: float = 0.5
) -> np.ndarray | None:
    """mediapipe's 33 pose landmarks to OpenPose's 18 body keypoints.

    Args:
        landmarks: (33, 3) x, y in pixels of a `width` x `height` image, and visibility (0..1).
        min_visibility: points below it, or outside the image, are dropped.

    Returns:
        (18, 3) x, y, confidence (the visibility; the neck gets the lower of the shoulders'), rows of zeros for
        missing points; None when no point is left.
    """
    landmarks = np.array(landmarks, dtype=np.float64)
    landmarks[~_inside(landmarks, width, height) | (landmarks[:, 2] < min_visibility), 2] = 0.0
    body = np.zeros((len(MEDIAPIPE_BODY), 3))
    for part, index in enumerate(MEDIAPIPE_BODY):
        if index is not None:
            body[part] = landmarks[index]
    left, right = landmarks[_LEFT_SHOULDER], landmarks[_RIGHT_SHOULDER]
    if left[2] > 0 and right[2] > 0:
        body[1] = [(left[0] + right[0]) / 2, (left[1] + right[1]) / 2, min(left[2], right[2])]
    body[body[:, 2] <= 0] = 0.0
    return body if (body[:, 2] > 0).any() else None


def _build_solution(kind: str, min_detection_confidence: float) -> Any:
    try:
        from mediapipe.python.solutions import face_mesh, hands, pose
    except ImportError:
        raise MissingDependencyError(f"the pose preprocessor needs mediapipe: {_INSTALL}") from None
    if kind == "pose":
        # model_complexity=1 is the only pose model the wheel bundles (0 and 2 are downloaded at run time).
        return pose.Pose(static_image_mode=True, model_complexity=1, enable_segmentation=False,
                         min_detection_confidence=min_detection_confidence)
    if kind == "hands":
        return hands.Hands(static_image_mode=True, max_num_hands=2, model_complexity=1,
                           min_detection_confidence=min_detection_confidence)
    return face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                              min_detection_confidence=min_detection_confidence)


def _landmark_array(landmarks: Any, width: int, height: int, *, visibility: bool = False) -> np.ndarray:
    """mediapipe normalised landmarks to (N, 3) pixels of a `width` x `height` image, third column visibility or 1."""
    return np.array(
        [[point.x * width, point.y * height, point.visibility if visibility else 1.0] for point in landmarks.landmark],
        dtype=np.float64,
    )


def _inside(points: np.ndarray, width: int, height: int) -> np.ndarray:
    return (points[:, 0] >= 0) & (points[:, 0] < width) & (points[:, 1] >= 0) & (points[:, 1] < height)
