"""Straight line segments, drawn as ControlNet's MLSD maps are: white lines of width 1 on black.

The reference (`annotator/mlsd`, `pred_lines`) runs the M-LSD network `mlsd_large_512_fp32.pth`, which is not
included here. This entry finds the segments with OpenCV's weight-free line segment detector
(`cv2.createLineSegmentDetector`, on the greyscale image; `cv2.ximgproc.createFastLineDetector` where an OpenCV
build lacks it) and draws them as the reference does: `cv2.line(map, (int(x1), int(y1)), (int(x2), int(y2)),
255, 1)` on a black map at the detect resolution (reference 512), resized back bilinearly (ControlNet 1.1).
The reference's thresholds map as follows:
- `distance_threshold` (thr_d, default 0.1, slider 0.01..20) is a minimum segment length on the network's
  half-resolution grid; its coordinates are doubled, so here the minimum length is 2 * thr_d at the detect
  resolution, `min_length` (default 0.2, which keeps every segment, as the reference default nearly does).
- `score_threshold` (thr_v, 0.1) filters the network's centre scores and has no counterpart: the detector's
  own a-contrario test decides what is a segment. The reference keeps at most the top 200 centre candidates;
  `max_lines` keeps the 200 longest segments.
The segments are not the network's: expect more short segments on texture and fewer on faint long edges.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from preprocessors.base import Preprocessor, check_detect_resolution


class MlsdPreprocessor(Preprocessor):
    """White straight lines, 1 px wide, on black.

    Args:
        min_length: drop segments shorter than this, in pixels at the detect resolution (reference 2 * 0.1).
        max_lines: keep at most this many segments, the longest (the reference decodes the top 200).
        detect_resolution: run at this short side, sides rounded to 64 (reference 512); None runs at input size.
    """

    name = "mlsd"

    def __init__(self, *, min_length: float = 0.2, max_lines: int = 200, detect_resolution: int | None = 512) -> None:
        if not min_length >= 0:
            raise ValueError(f"`min_length` must be >= 0, got {min_length!r}")
        if max_lines < 1:
            raise ValueError(f"`max_lines` must be >= 1, got {max_lines!r}")
        self.min_length = float(min_length)
        self.max_lines = int(max_lines)
        self.detect_resolution = check_detect_resolution(detect_resolution)

    @classmethod
    def check_ready(cls) -> str | None:
        """None when this OpenCV build has a line segment detector, else what to install."""
        return None if _line_detector() is not None else (
            "this OpenCV build has no line segment detector: install opencv-python-headless>=4.5.1 "
            "(or opencv-contrib-python-headless for cv2.ximgproc)")

    def detect(self, image: np.ndarray) -> np.ndarray:
        import cv2

        image = self.at_detect_resolution(image)
        line_map = np.zeros(image.shape[:2], dtype=np.uint8)
        for x1, y1, x2, y2 in self.segments(image):
            cv2.line(line_map, (int(x1), int(y1)), (int(x2), int(y2)), 255, 1)
        return line_map

    def segments(self, image: np.ndarray) -> np.ndarray:
        """The kept segments of RGB uint8 (H, W, 3) as (N, 4) float32 rows x1, y1, x2, y2, longest first."""
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
