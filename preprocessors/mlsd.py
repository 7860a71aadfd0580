"""Straight line segments, drawn as ControlNet's MLSD maps are: white lines of width 1 on black.

Both models draw as the reference (`annotator/mlsd`) does: `cv2.line(map, (int(x1), int(y1)), (int(x2),
int(y2)), 255, 1)` on a black map at the detect resolution (reference 512), resized back bilinearly (ControlNet 1.1).

**model="mlsd"**: the reference network, M-LSD large (`mlsd_large_512_fp32.pth` from lllyasviel/Annotators,
`preprocessors.nets.mlsd`), run as `pred_lines(image, model, [h, w], thr_v, thr_d)` on the detect-resolution
image itself (its sides are multiples of 64; with `detect_resolution=None` they are resized to multiples of 16
and the segments scaled back): RGB plus a ones channel, x / 127.5 - 1; centres of the tp map by 3x3 max-pool
suppression, the top 200 kept when their score > `value_threshold` (thr_v, 0.1) and their length on the
half-resolution grid > `distance_threshold` (thr_d, 0.1; slider 0.01..20), coordinates doubled.

**model="opencv"** (default, weight-free): OpenCV's line segment detector (`cv2.createLineSegmentDetector`, on
the greyscale image; `cv2.ximgproc.createFastLineDetector` where an OpenCV build lacks it). Its counterparts of
the reference thresholds: `min_length` is 2 * thr_d at the detect resolution (default 0.2, which keeps every
segment, as the reference default nearly does); thr_v has none (the detector's own a-contrario test decides what
is a segment); `max_lines` keeps the 200 longest segments. Expect more short segments on texture and fewer on
faint long edges than the network finds.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from preprocessors.base import Preprocessor, check_detect_resolution

if TYPE_CHECKING:
    import torch

MODELS = ("opencv", "mlsd")
#: The released M-LSD file, looked for in the models folder (and fetched from a hub id when one is given).
WEIGHT_NAME = "mlsd_large_512_fp32.pth"
_WEIGHTS_HINT = (f"Pass weights='path/to/{WEIGHT_NAME}' (--set weights=PATH; from lllyasviel/Annotators) or put "
                 "it in the models folder")


class MlsdPreprocessor(Preprocessor):
    """White straight lines, 1 px wide, on black.

    Args:
        model: "opencv" (weight-free) or "mlsd" (the M-LSD network; load it with
            `MlsdPreprocessor.create(model="mlsd", weights=...)`).
        network: model="mlsd": a ready `MLSDLarge` (or any module with its (1, 9, h/2, w/2) output).
        value_threshold: model="mlsd": keep segment centres scoring above this (reference thr_v 0.1).
        distance_threshold: model="mlsd": keep segments longer than this on the network's half-resolution grid
            (reference thr_d 0.1).
        min_length: model="opencv": drop segments shorter than this, in pixels at the detect resolution
            (reference 2 * thr_d).
        max_lines: model="opencv": keep at most this many segments, the longest (the reference decodes the top 200).
        detect_resolution: run at this short side, sides rounded to 64 (reference 512); None runs at input size.
    """

    name = "mlsd"

    def __init__(self, *, model: str = "opencv", network: torch.nn.Module | None = None,
                 value_threshold: float = 0.1, distance_threshold: float = 0.1, min_length: float = 0.2,
                 max_lines: int = 200, detect_resolution: int | None = 512) -> None:
        _check_model(model)
        if model == "opencv" and network is not None:
            raise ValueError("the 'opencv' detector has no network; pass `network` only with model='mlsd'")
        if model == "mlsd" and network is None:
            raise ValueError(f"model 'mlsd' needs its network: use MlsdPreprocessor.create(model='mlsd', "
                             f"weights='path/to/{WEIGHT_NAME}')")
        for key, value in (("value_threshold", value_threshold), ("distance_threshold", distance_threshold),
                           ("min_length", min_length)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"`{key}` must be a number >= 0, got {value!r}")
        if max_lines < 1:
            raise ValueError(f"`max_lines` must be >= 1, got {max_lines!r}")
        self.model = model
        self.network = network
        self.value_threshold = float(value_threshold)
        self.distance_threshold = float(distance_threshold)
        self.min_length = float(min_length)
        self.max_lines = int(max_lines)
        self.detect_resolution = check_detect_resolution(detect_resolution)

    @classmethod
    def create(cls, *, model: str = "opencv", weights: str | os.PathLike | None = None,
               value_threshold: float = 0.1, distance_threshold: float = 0.1, min_length: float = 0.2,
               max_lines: int = 200, detect_resolution: int | None = 512) -> MlsdPreprocessor:
        """Build from parameters, loading the network of model="mlsd".

        Args:
            weights: model="mlsd": `mlsd_large_512_fp32.pth` (read with weights_only) or the same state dict as
                safetensors, a folder holding it, or a hub id (fetched only when given); default: that file in
                the models folder ($CONTROLKIT_MODELS). model="opencv" takes none.
            The other arguments are those of the class.

        Raises:
            WeightsNotFoundError: model="mlsd" and no weights found offline; the message says what to pass.
            CheckpointError: the file does not hold M-LSD large (the message lists the keys).
        """
        _check_model(model)
        if model == "opencv" and weights is not None:
            raise ValueError("the 'opencv' detector takes no `weights`; set model='mlsd' for the M-LSD network")
        network = load_mlsd_network(weights) if model == "mlsd" else None
        return cls(model=model, network=network, value_threshold=value_threshold,
                   distance_threshold=distance_threshold, min_length=min_length, max_lines=max_lines,
                   detect_resolution=detect_resolution)

    @classmethod
    def check_ready(cls) -> str | None:
        """None when this OpenCV build has a line segment detector (the default model), else what to install."""
        return None if _line_detector() is not None else (
            "this OpenCV build has no line segment detector: install opencv-python-headless>=4.5.1 "
            "(or opencv-contrib-python-headless for cv2.ximgproc), or --set model=mlsd --set weights=PATH/"
            f"{WEIGHT_NAME}")

    def to(self, device: Any) -> MlsdPreprocessor:
        if self.network is not None:
            self.network.to(device)
        return self

    def detect(self, image: np.ndarray) -> np.ndarray:
        import cv2

        image = self.at_detect_resolution(image)
        line_map = np.zeros(image.shape[:2], dtype=np.uint8)
        for x1, y1, x2, y2 in self.segments(image):
            cv2.line(line_map, (int(x1), int(y1)), (int(x2), int(y2)), 255, 1)
        return line_map

    def segments(self, image: np.ndarray) -> np.ndarray:
        """The kept segments of RGB uint8 (H, W, 3), as given, as (N, 4) rows x1, y1, x2, y2 in its pixels:
        the network's in score order (float64), or OpenCV's longest first (float32)."""
        if self.model == "mlsd":
            from preprocessors.nets.mlsd import predict_segments

            found = predict_segments(self.network, image, score_threshold=self.value_threshold,
                                     distance_threshold=self.distance_threshold)
            # An untrained or foreign module can give non-finite ends, which cannot be drawn.
            return found[np.isfinite(found).all(axis=1)]
        return self._opencv_segments(image)

    def _opencv_segments(self, image: np.ndarray) -> np.ndarray:
        import cv2

        detector = _line_detector()
        if detector is None:
            raise RuntimeError(self.check_ready())
        found = detector.detect(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
        lines = found[0] if isinstance(found, tuple) else found  # LSD returns (lines, widths, prec, nfa)
        if lines is None or len(lines) == 0:
            return np.zeros((0, 4), dtype=np.float32)
        lines = lines.reshape(-1, 4).astype(np.float32)
        lengths = np.hypot(lines[:, 2] - lines[:, 0], lines[:, 3] - lines[:, 1])
        # Stable sort: ties keep the detector's order, so the map is deterministic.
        order = np.argsort(-lengths, kind="stable")
        order = order[lengths[order] > self.min_length][: self.max_lines]
        return lines[order]


def load_mlsd_network(weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """M-LSD large with weights resolved offline first (explicit file or folder, the models folder, or a hub id
    given explicitly), strict keys, eval mode, on the CPU.

    Raises:
        WeightsNotFoundError: nothing found; the message says what to pass.
        CheckpointError, UnsafeCheckpointError: not an M-LSD large state dict, or a pickle that would run code.
    """
    from controlkit.errors import WeightsNotFoundError
    from controlkit.weights import resolve_weights
    from preprocessors.nets.mlsd import load_mlsd

    path = resolve_weights("M-LSD", weights, local_names=(WEIGHT_NAME,), hub_filename=WEIGHT_NAME,
                           hint=_WEIGHTS_HINT)
    if path.is_dir():
        if not (path / WEIGHT_NAME).is_file():
            raise WeightsNotFoundError(f"M-LSD weights: {path} has no {WEIGHT_NAME}")
        path = path / WEIGHT_NAME
    return load_mlsd(path)


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"Unknown mlsd `model` {model!r}; use one of {', '.join(MODELS)}")


def _line_detector() -> Any:
    """OpenCV's LSD, else ximgproc's fast line detector, else None. Some 4.1..4.5.0 builds have the LSD
    factory but raise when it is called (it was withdrawn for its licence then), so it is tried."""
    import cv2

    try:
        return cv2.createLineSegmentDetector()
    except (AttributeError, cv2.error):
        pass
    ximgproc = getattr(cv2, "ximgproc", None)
    if ximgproc is not None and hasattr(ximgproc, "createFastLineDetector"):
        return ximgproc.createFastLineDetector()
    return None
