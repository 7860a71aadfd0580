"""Controllability: does the generated image follow its condition?

The ControlNet++ protocol (Li et al., ECCV 2024, its `eval/` scripts): re-annotate each generated image with
the condition's own preprocessor and compare the result with the input condition. One table, `METRICS`, says
which comparison each condition uses:

- canny: edge F1 on binary edges (a pixel is an edge above 127). A predicted edge pixel counts as correct when
  a reference edge lies within `tolerance` pixels (Chebyshev distance, i.e. a (2t+1)^2 square), and a
  reference edge pixel counts as recalled when a predicted edge lies that close. Default tolerance 1 pixel,
  since re-detected edges of a faithful image often sit one pixel off; `tolerance=0` is the exact per-pixel
  F1 that ControlNet++ reports (torchmetrics `BinaryF1Score`; its tables print F1 x 100).
- softedge, lineart: SSIM (`skimage.metrics.structural_similarity`, 7x7 window, data range 255) on grey maps.
  ControlNet++ computes multi-scale SSIM (torchmetrics) and prints it as "SSIM"; values are not comparable.
- depth: RMSE of the 0..255 grey maps (both made by the same depth preprocessor, hence normalised alike).
- normal: mean angle in degrees between the decoded normal vectors (RGB / 127.5 - 1); the channel order and
  signs of the encoding do not change angles, so any normal preprocessor's maps work.
- pose: mean distance between matched keypoints of the same body part, divided by the image diagonal, plus
  the fraction of reference keypoints found (`extra["keypoints_found"]`). Reference keypoints come from an
  OpenPose JSON dict/file, or are read back from a drawn OpenPose map by its joint colours; the generated
  image's come from the preprocessor's `keypoints(image)`.
- scribble, mlsd: edge F1 as canny, on the scribble or line-segment re-annotations.
- tile, shuffle, inpaint: their maps are the image itself (downsampled, shuffled, with a hole), so the generated
  image is compared with the reference image, not re-annotated (training/image_metrics.py): SSIM to the truth,
  colour-histogram distance, RMSE inside the mask.

The generated image is resized to the input condition's size before it is re-annotated, so both maps share
one pixel grid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controlkit.errors import ConfigError, ControlkitError
from training.image_metrics import histogram_distance, image_ssim, masked_rmse

#: Edge F1 tolerance in pixels (see the module docstring); 0 reproduces ControlNet++'s exact F1.
DEFAULT_EDGE_TOLERANCE = 1
#: A pixel is an edge above this grey level (the 0.5 threshold of torchmetrics on [0, 1] maps).
EDGE_THRESHOLD = 127
#: Normal vectors shorter than this (after decoding) are not normals (a grey 127 pixel decodes to ~0).
MIN_NORMAL_LENGTH = 0.5
#: Joint colour match tolerance when reading keypoints back from a drawn OpenPose map.
JOINT_COLOR_TOLERANCE = 8


@dataclass(frozen=True)
class MetricResult:
    """A controllability score over a set of images.

    Attributes:
        name: the metric ("edge_f1", "ssim", "rmse", "angular_error", "keypoint_distance").
        value: the mean over images (images without a defined score, e.g. no reference keypoints, left out).
        higher_is_better: the direction of `value`.
        per_image: the score of each image, in input order (NaN where undefined).
        extra: further means, e.g. {"keypoints_found": 0.9} for pose.
    """

    name: str
    value: float
    higher_is_better: bool
    per_image: list[float]
    extra: dict[str, float] = field(default_factory=dict)


def edge_f1(predicted: np.ndarray, reference: np.ndarray, *, tolerance: int = DEFAULT_EDGE_TOLERANCE) -> float:
    """F1 of binary edges with a pixel tolerance.

    Args:
        predicted, reference: edge maps of one size, (H, W) or (H, W, 3) uint8, white edges on black.
        tolerance: how far (pixels, Chebyshev) a match may be; 0 is exact per-pixel F1.

    Returns:
        F1 in [0, 1]: 1 for identical maps (two empty maps included), 0 when one is empty and the other not.
    """
    import cv2

    predicted_edges, reference_edges = _grey(predicted) > EDGE_THRESHOLD, _grey(reference) > EDGE_THRESHOLD
    _check_same_size(predicted_edges, reference_edges)
    predicted_count, reference_count = int(predicted_edges.sum()), int(reference_edges.sum())
    if predicted_count == 0 and reference_count == 0:
        return 1.0
    if predicted_count == 0 or reference_count == 0:
        return 0.0
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    near_reference = cv2.dilate(reference_edges.astype(np.uint8), kernel) > 0
    near_predicted = cv2.dilate(predicted_edges.astype(np.uint8), kernel) > 0
    precision = float((predicted_edges & near_reference).sum()) / predicted_count
    recall = float((reference_edges & near_predicted).sum()) / reference_count
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def ssim(predicted: np.ndarray, reference: np.ndarray) -> float:
    """SSIM of the grey maps (skimage defaults: 7x7 uniform window, data range 255); 1 for identical maps."""
    from skimage.metrics import structural_similarity

    predicted_grey, reference_grey = _grey(predicted), _grey(reference)
    _check_same_size(predicted_grey, reference_grey)
    return float(structural_similarity(predicted_grey, reference_grey, data_range=255))


def rmse(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Root mean square difference of the grey maps in 0..255 grey levels; 0 for identical maps."""
    predicted_grey, reference_grey = _grey(predicted).astype(np.float64), _grey(reference).astype(np.float64)
    _check_same_size(predicted_grey, reference_grey)
    return float(np.sqrt(np.mean((predicted_grey - reference_grey) ** 2)))


def angular_error(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Mean angle (degrees, 0..180) between decoded normals, over pixels that hold a normal in both maps."""
    predicted_vectors, reference_vectors = _normals(predicted), _normals(reference)
    _check_same_size(predicted_vectors, reference_vectors)
    predicted_length = np.linalg.norm(predicted_vectors, axis=2)
    reference_length = np.linalg.norm(reference_vectors, axis=2)
    valid = (predicted_length > MIN_NORMAL_LENGTH) & (reference_length > MIN_NORMAL_LENGTH)
    if not valid.any():
        return 180.0
    cosine = (predicted_vectors * reference_vectors).sum(axis=2)[valid] / (
        predicted_length[valid] * reference_length[valid]
    )
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))).mean())


def keypoint_distance(predicted: dict[str, Any], reference: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """Mean distance of matched same-part body keypoints, over the reference canvas diagonal.

    Args:
        predicted, reference: OpenPose JSON dicts (any number of people); `reference` sets the canvas.

    Returns:
        (distance, {"keypoints_found": fraction}): each reference keypoint is matched one-to-one to the
        nearest unmatched predicted keypoint of the same part; distance is 1.0 (the worst: a whole diagonal)
        when nothing matches, and NaN (with found NaN) when the reference has no keypoints.
    """
    reference_points, (width, height) = body_keypoints(reference)
    predicted_points, _ = body_keypoints(predicted)
    reference_total = sum(len(points) for points in reference_points)
    if reference_total == 0:
        return math.nan, {"keypoints_found": math.nan}
    distances: list[float] = []
    for part_reference, part_predicted in zip(reference_points, predicted_points):
        distances += _match(part_reference, part_predicted)
    diagonal = math.hypot(width, height)
    distance = float(np.mean(distances)) / diagonal if distances else 1.0
    return min(distance, 1.0), {"keypoints_found": len(distances) / reference_total}


def body_keypoints(pose: dict[str, Any]) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Per body part, the (n, 2) pixel positions of everyone's detected points; and the canvas (width, height)."""
    from preprocessors.openpose import BODY_PARTS, load_openpose_json

    pose = load_openpose_json(pose)
    parts: list[list[np.ndarray]] = [[] for _ in BODY_PARTS]
    for person in pose.get("people", []):
        flat = np.asarray(person.get("pose_keypoints_2d") or np.zeros(3 * len(BODY_PARTS)), np.float64)
        points = flat.reshape(-1, 3)[: len(BODY_PARTS)]
        for part, (x, y, confidence) in enumerate(points):
            if confidence > 0:
                parts[part].append(np.array([x, y]))
    canvas = (int(pose["canvas_width"]), int(pose["canvas_height"]))
    return [np.array(points).reshape(-1, 2) for points in parts], canvas


def keypoints_from_pose_map(pose_map: np.ndarray) -> dict[str, Any]:
    """Read body keypoints back from a drawn OpenPose map (OpenPose JSON dict, one person per joint blob).

    Joints are drawn as discs in a fixed colour per part, then limbs are blended over them at 60 %, so a
    joint's disc shows its own colour, or that colour blended under one of the limbs that meet there. Each
    connected blob of those colours is one keypoint, at the blob's centroid. Persons are not separated: the
    n-th blob of every part goes to the n-th `people` entry, which is all `keypoint_distance` needs (it
    matches per part).
    """
    import cv2

    from preprocessors.openpose import BODY_PARTS, COLORS, LIMB_OPACITY, LIMBS, empty_pose

    rgb = _rgb(pose_map).astype(np.float64)
    height, width = rgb.shape[:2]
    tolerance = JOINT_COLOR_TOLERANCE
    limb_colors = LIMB_OPACITY * np.array(COLORS[: len(LIMBS)], np.float64)
    found: list[list[tuple[float, float]]] = []
    for part, color in enumerate(COLORS[: len(BODY_PARTS)]):
        joint = np.array(color, np.float64)
        blends = [
            (1.0 - LIMB_OPACITY) * joint + LIMB_OPACITY * np.array(COLORS[limb], np.float64)
            for limb, ends in enumerate(LIMBS)
            if part in ends
        ]
        # A blend that equals some limb drawn over black (e.g. red under blue = 60 % violet) is ambiguous.
        shades = [joint] + [shade for shade in blends if np.abs(limb_colors - shade).max(axis=1).min() > 2 * tolerance]
        mask = np.zeros((height, width), np.uint8)
        for shade in shades:
            mask |= (np.abs(rgb - shade).max(axis=2) <= tolerance).astype(np.uint8)
        count, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        found.append([tuple(centroids[i]) for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= 3])
    pose = empty_pose(width, height)
    for person in range(max((len(points) for points in found), default=0)):
        flat = []
        for points in found:
            flat += [points[person][0], points[person][1], 1.0] if person < len(points) else [0.0, 0.0, 0.0]
        pose["people"].append({"pose_keypoints_2d": flat})
    return pose


@dataclass(frozen=True)
class MetricSpec:
    """How one condition is scored: the comparison, its direction, and what the preprocessor must produce."""

    name: str
    compare: Callable[[Any, Any], float | tuple[float, dict[str, float]]]
    higher_is_better: bool
    reads_keypoints: bool = False
    #: Compare the generated image itself with the reference image (training/image_metrics.py), no re-annotation.
    compares_image: bool = False


#: Condition name (registry key) -> how its controllability is measured.
METRICS: dict[str, MetricSpec] = {
    "canny": MetricSpec("edge_f1", edge_f1, higher_is_better=True),
    "softedge": MetricSpec("ssim", ssim, higher_is_better=True),
    "lineart": MetricSpec("ssim", ssim, higher_is_better=True),
    "depth": MetricSpec("rmse", rmse, higher_is_better=False),
    "normal": MetricSpec("angular_error", angular_error, higher_is_better=False),
    "pose": MetricSpec("keypoint_distance", keypoint_distance, higher_is_better=False, reads_keypoints=True),
    "scribble": MetricSpec("edge_f1", edge_f1, higher_is_better=True),
    "mlsd": MetricSpec("edge_f1", edge_f1, higher_is_better=True),
    "tile": MetricSpec("ssim_to_truth", image_ssim, higher_is_better=True, compares_image=True),
    "shuffle": MetricSpec("histogram_distance", histogram_distance, higher_is_better=False, compares_image=True),
    "inpaint": MetricSpec("masked_rmse", masked_rmse, higher_is_better=False, compares_image=True),
}


def controllability(
    condition: str,
    generated_images: Sequence[Any],
    input_conditions: Sequence[Any],
    *,
    preprocessor: Any = None,
) -> MetricResult:
    """Score how well generated images follow their input conditions.

    Args:
        condition: the condition name, a key of `METRICS` ("canny", "softedge", "lineart", "depth", "normal",
            "pose").
        generated_images: images (anything `load_image` takes), one per input condition.
        input_conditions: the condition maps they were generated from; for pose also OpenPose JSON dicts or
            `.json` paths.
        preprocessor: re-annotates the generated images (a registry preprocessor instance); default
            `get_preprocessor(condition)` with its default parameters. For pose it must have `keypoints`.

    Example:
        >>> result = controllability("canny", generated, edge_maps)
        >>> result.name, round(result.value, 3), result.higher_is_better
        ('edge_f1', 0.412, True)

    Raises:
        ConfigError: an unknown condition, or lists of different lengths.
    """
    spec = metric_spec(condition)
    if len(generated_images) != len(input_conditions):
        raise ConfigError(
            f"{len(generated_images)} generated images but {len(input_conditions)} input conditions; "
            "give one condition per image"
        )
    if preprocessor is None and not spec.compares_image:
        from preprocessors.registry import get_preprocessor

        preprocessor = get_preprocessor(condition)
    if spec.reads_keypoints and not hasattr(preprocessor, "keypoints"):
        raise ConfigError(f"{condition}: the re-annotating preprocessor must have a keypoints(image) method")
    scores, extras = [], []
    for generated, reference in zip(generated_images, input_conditions):
        score = _score_one(spec, preprocessor, generated, reference)
        value, extra = score if isinstance(score, tuple) else (score, {})
        scores.append(float(value))
        extras.append(extra)
    return MetricResult(
        name=spec.name,
        value=_mean(scores),
        higher_is_better=spec.higher_is_better,
        per_image=scores,
        extra={key: _mean([extra[key] for extra in extras]) for key in (extras[0] if extras else {})},
    )


def _score_one(spec: MetricSpec, preprocessor: Any, generated: Any, reference: Any) -> Any:
    from controlkit.image import load_condition, load_image, resize_to

    if spec.compares_image:  # the reference is an image (inpaint: with its mask), compared as it is
        reference_image = load_condition(reference)
        size = (reference_image.shape[1], reference_image.shape[0])
        return spec.compare(resize_to(load_image(generated), size), reference_image)
    if spec.reads_keypoints:
        reference_pose = _reference_pose(reference)
        size = (int(reference_pose["canvas_width"]), int(reference_pose["canvas_height"]))
        image = resize_to(load_image(generated), size)
        return spec.compare(preprocessor.keypoints(image), reference_pose)
    reference_map = load_image(reference)
    image = resize_to(load_image(generated), (reference_map.shape[1], reference_map.shape[0]))
    return spec.compare(np.asarray(preprocessor(image)), reference_map)


def _reference_pose(reference: Any) -> dict[str, Any]:
    if isinstance(reference, dict):
        return reference
    if isinstance(reference, (str, os.PathLike)) and Path(reference).suffix.lower() == ".json":
        from preprocessors.openpose import load_openpose_json

        return load_openpose_json(reference)
    from controlkit.image import load_image

    return keypoints_from_pose_map(load_image(reference))


def metric_spec(condition: str) -> MetricSpec:
    """The `METRICS` entry of a condition; ConfigError naming the known ones otherwise."""
    if condition not in METRICS:
        raise ConfigError(
            f"no controllability metric for condition {condition!r}; known: {', '.join(sorted(METRICS))}"
        )
    return METRICS[condition]


def _mean(values: Sequence[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else math.nan


def _match(reference: np.ndarray, predicted: np.ndarray) -> list[float]:
    """Greedy one-to-one matching of two point sets by ascending distance; the matched distances."""
    if len(reference) == 0 or len(predicted) == 0:
        return []
    distances = np.linalg.norm(reference[:, None, :] - predicted[None, :, :], axis=2)
    matched: list[float] = []
    for flat in np.argsort(distances, axis=None):
        if len(matched) == min(distances.shape):
            break
        row, column = divmod(int(flat), distances.shape[1])
        if np.isfinite(distances[row, column]):
            matched.append(float(distances[row, column]))
            distances[row, :] = np.inf
            distances[:, column] = np.inf
    return matched


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _grey(image: np.ndarray) -> np.ndarray:
    import cv2

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ControlkitError(f"condition maps must be uint8, got {image.dtype}")
    return image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)


def _normals(image: np.ndarray) -> np.ndarray:
    return _rgb(image).astype(np.float64) / 127.5 - 1.0


def _check_same_size(first: np.ndarray, second: np.ndarray) -> None:
    if first.shape[:2] != second.shape[:2]:
        raise ControlkitError(
            f"maps of different sizes: {first.shape[1]}x{first.shape[0]} and {second.shape[1]}x{second.shape[0]}"
        )
