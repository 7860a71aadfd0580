"""The toy world under control: inputs, generation with and without each demo ControlNet, controllability.

What `controlkit demo` runs and what the tests measure (one implementation for both):

- `demo_cases(condition, count)`: held-out toy-world renders (seed `DEMO_SEED`; the demo models were trained on
  seed 0) and their condition maps: canny, lineart and softedge annotated by the preprocessor (and parameters)
  the ControlNet's metadata names; pose, depth and normal drawn from the renderer's ground truth in the reference
  conventions, as the ControlNets were trained.
- `run_condition(...)`: generate every case with the ControlNet and with control off (the base alone, same
  prompt and seed), and score both with the condition's controllability metric (training/metrics.py).
  Re-annotators: the metadata's preprocessor for the edges; for depth, normal and pose the toy-world estimator
  shipped with the demo (training/demo_geometry.py: no depth or normal weights exist offline, and mediapipe misses
  half of the clean 64-pixel figures), whose pose keypoints are compared with the figure's exact ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from training.metrics import MetricResult

#: Toy-world seed of the demo's held-out scenes (the demo models were trained on seed 0).
DEMO_SEED = 7
#: Generation settings of the demo.
DEMO_STEPS = 20
DEMO_GUIDANCE = 2.0


@dataclass
class DemoCase:
    """One input: the ground-truth render, its condition map, what the metric compares with, the caption."""

    truth: np.ndarray  # (64, 64, 3) uint8
    condition_map: np.ndarray  # (64, 64, 3) uint8
    reference: Any  # the condition map, or the exact OpenPose JSON dict for pose
    prompt: str


@dataclass
class ConditionRun:
    """Generated images and scores of one condition, with the ControlNet and with control off."""

    condition: str
    cases: list[DemoCase]
    controlled: list[np.ndarray]
    uncontrolled: list[np.ndarray]
    with_control: MetricResult
    without_control: MetricResult
    seconds: float


def condition_annotator(condition: str, metadata: Any) -> Callable[[Any], Any]:
    """The annotator that turns toy-world images into `condition` maps as the demo ControlNet saw them, and that
    re-annotates generated images: the metadata's preprocessor, or the toy-world estimator for depth, normal and
    pose."""
    if condition in ("depth", "normal", "pose"):
        from controlkit.demo_models import geometry_path
        from training.demo_geometry import GeometryAnnotator, load_estimator

        return GeometryAnnotator(load_estimator(geometry_path()), condition)
    from controlkit.cli.generate import _preprocessor

    return _preprocessor(condition, metadata)


def demo_cases(condition: str, count: int, annotate: Callable[[Any], Any] | None = None, *,
               seed: int = DEMO_SEED) -> list[DemoCase]:
    """`count` held-out toy-world inputs for `condition` (for pose, figures placed anywhere in the frame, as the
    pose ControlNet was trained; scenes otherwise); canny, lineart and softedge maps come from `annotate` (see
    `condition_annotator`)."""
    from training.toyworld import depth_map, normal_map, pose_json, pose_map, render_figure, render_scene

    cases = []
    if condition == "pose":
        for index in range(count):
            figure = render_figure((seed, index), anywhere=True)
            cases.append(DemoCase(figure.image, pose_map(figure), pose_json(figure), figure.caption))
        return cases
    scenes = [render_scene((seed, index)) for index in range(count)]
    if condition in ("depth", "normal"):
        for scene in scenes:
            drawn = depth_map(scene.depth) if condition == "depth" else normal_map(scene.normals)
            cases.append(DemoCase(scene.image, drawn, drawn, scene.caption))
        return cases
    if annotate is None:
        raise ValueError(f"{condition} inputs are annotated: pass `annotate` (condition_annotator)")
    for scene in scenes:
        annotated = np.asarray(annotate(scene.image))
        cases.append(DemoCase(scene.image, annotated, annotated, scene.caption))
    return cases


def run_condition(base: Any, condition: str, count: int, *, steps: int = DEMO_STEPS,
                  guidance: float = DEMO_GUIDANCE, seed: int = 0, controlnet: Any = None,
                  metadata: Any = None) -> ConditionRun:
    """Generate `count` held-out cases with the ControlNet of `condition` (default: the demo's) and with control
    off, and score both (case i uses generation seed `seed + i` in both runs)."""
    from controlkit.control import Control
    from controlkit.demo_models import load_demo_controlnet
    from training.metrics import controllability

    start = time.perf_counter()
    if controlnet is None:
        controlnet, metadata = load_demo_controlnet(condition, unet=base.unet)
    annotate = condition_annotator(condition, metadata)
    cases = demo_cases(condition, count, annotate)
    controlled, uncontrolled = [], []
    for index, case in enumerate(cases):
        controls = [Control(case.condition_map, controlnet)]
        controlled.append(_generate(base, case.prompt, controls, steps, guidance, seed + index))
        uncontrolled.append(_generate(base, case.prompt, [], steps, guidance, seed + index))
    references = [case.reference for case in cases]
    with_control = _quietly(lambda: controllability(condition, controlled, references, preprocessor=annotate))
    without_control = _quietly(lambda: controllability(condition, uncontrolled, references, preprocessor=annotate))
    return ConditionRun(condition, cases, controlled, uncontrolled, with_control, without_control,
                        time.perf_counter() - start)


def _generate(base: Any, prompt: str, controls: list[Any], steps: int, guidance: float, seed: int) -> np.ndarray:
    from controlkit.pipeline import generate

    result = generate(base, prompt, controls, steps=steps, guidance_scale=guidance, seed=seed, width=64, height=64,
                      output_type="np")
    return (np.clip(result.images[0], 0.0, 1.0) * 255).round().astype(np.uint8)


def _quietly(function: Callable[[], Any]) -> Any:
    """Run without the pose annotator's per-image "no person found" warnings (a miss is scored, not an error)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return function()


def contact_sheet(runs: Sequence[ConditionRun], path: str | Path, *, zoom: int = 2) -> Path:
    """A PNG with one row per condition and, per case, three cells: condition | generated | ground truth.

    Cells are the 64 x 64 images enlarged `zoom` times (nearest neighbour) with a 4-pixel gap between cases; a
    band on the left names the condition.
    """
    import cv2
    from PIL import Image

    side, gap, label = 64 * zoom, 4, 96
    rows = []
    for run in runs:
        cells = []
        for case, generated in zip(run.cases, run.controlled):
            triple = np.concatenate([case.condition_map, generated, case.truth], axis=1)
            cells.append(np.kron(triple, np.ones((zoom, zoom, 1), np.uint8)))
            cells.append(np.full((side, gap, 3), 255, np.uint8))
        band = np.full((side, label, 3), 255, np.uint8)
        cv2.putText(band, run.condition, (4, side // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([band, *cells], axis=1))
        rows.append(np.full((gap, rows[-1].shape[1], 3), 255, np.uint8))
    width = max(row.shape[1] for row in rows)
    sheet = np.concatenate([np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255)
                            for row in rows])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path


def table_rows(runs: Sequence[ConditionRun]) -> list[dict[str, Any]]:
    """One JSON-able row per condition: metric, direction, value with and without control, per-image values."""
    rows = []
    for run in runs:
        on, off = run.with_control, run.without_control
        better = on.value > off.value if on.higher_is_better else on.value < off.value
        rows.append({
            "condition": run.condition, "metric": on.name, "higher_is_better": on.higher_is_better,
            "with_control": round(on.value, 4), "control_off": round(off.value, 4), "control_wins": bool(better),
            "images": len(run.cases), "seconds": round(run.seconds, 1),
            "per_image_with_control": [round(value, 4) for value in on.per_image],
            "per_image_control_off": [round(value, 4) for value in off.per_image],
        })
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The controllability table as aligned text."""
    lines = [f"{'condition':10s} {'metric':26s} {'with control':>12s} {'control off':>12s}  better"]
    for row in rows:
        arrow = "higher" if row["higher_is_better"] else "lower"
        metric = f"{row['metric']} ({arrow})"
        verdict = "control" if row["control_wins"] else "off"
        lines.append(f"{row['condition']:10s} {metric:26s} {row['with_control']:12.3f} {row['control_off']:12.3f}"
                     f"  {verdict}")
    return "\n".join(lines)
