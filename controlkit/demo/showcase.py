"""The toy world under control: inputs, generation with and without each demo ControlNet, controllability.

What `controlkit demo` runs (`run_demo`) and what the tests measure (one implementation for both):

- `annotate_photo(name, output)`: a bundled photo through every preprocessor that can run here.
- `demo_cases(condition, count)`: held-out toy-world renders (seed `DEMO_SEED`; the demo models were trained on
  seed 0) and their condition maps: canny, lineart and softedge annotated by the preprocessor (and parameters)
  the ControlNet's metadata names; pose, depth and normal drawn from the renderer's ground truth in the reference
  conventions, as the ControlNets were trained.
- `run_condition(...)`: generate every case with the ControlNet and with control off (the base alone, same
  prompt and seed), and score both with the condition's controllability metric (training/metrics.py).
  Re-annotators: the metadata's preprocessor for the edges; for depth, normal and pose the toy-world estimator
  shipped with the demo (controlkit/demo/estimator.py: no depth or normal weights exist offline, and mediapipe misses
  half of the clean 64-pixel figures), whose pose keypoints are compared with the figure's exact ones.
- `contact_sheet(runs, path)`: condition | with control | control off | ground truth, per case;
  `table_rows` and `format_table`: the controllability table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from controlkit.demo.toyworld.world import ToyScene
    from training.metrics import MetricResult

#: Toy-world seed of the demo's held-out scenes (the demo models were trained on seed 0).
DEMO_SEED = 7
#: Generation settings of the demo.
DEMO_STEPS = 20
DEMO_GUIDANCE = 2.0
#: Conditions whose demo inputs are the renderer's ground truth (`exact_map`) and whose generated images the
#: toy-world estimator re-annotates; the others (edges) go through their preprocessor both ways.
EXACT_CONDITIONS = ("pose", "depth", "normal")
#: Conditions whose training drew a parameter of its preprocessor at random per sample: the demo draws case i's
#: map with these values over the metadata's (tile: a 4x downsampled scene; shuffle, inpaint: a seeded flow field
#: and mask per case, seeds the training never drew from its own range's start).
CASE_PARAMETERS: dict[str, Callable[[int], dict[str, Any]]] = {
    "tile": lambda case: {"down_sampling_rate": 4.0},
    "shuffle": lambda case: {"seed": 7000 + case},
    "inpaint": lambda case: {"random_mask": 7000 + case},
}
#: Conditions whose metric compares the generated image with the ground truth (training/image_metrics.py).
TRUTH_REFERENCES = ("tile", "shuffle")


@dataclass
class DemoCase:
    """One input: the ground-truth render, its condition map, what the metric compares with, the caption."""

    truth: np.ndarray  # (64, 64, 3) uint8
    condition_map: np.ndarray  # (64, 64, 3) uint8; inpaint (64, 64, 4), alpha 0 where masked
    reference: Any  # the condition map, the exact OpenPose JSON dict for pose, the truth for tile and shuffle
    prompt: str
    options: dict[str, Any] = field(default_factory=dict)  # more `generate` options (inpaint: init image, mask)


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


def condition_annotator(condition: str, metadata: Any, case: int | None = None) -> Callable[[Any], Any]:
    """The annotator that turns toy-world images into `condition` maps as the demo ControlNet saw them, and that
    re-annotates generated images: the metadata's preprocessor (for `case`, with its `CASE_PARAMETERS`), or the
    toy-world estimator for depth, normal and pose."""
    if condition in EXACT_CONDITIONS:
        from controlkit.demo.estimator import GeometryAnnotator, load_estimator
        from controlkit.demo.models import geometry_path

        return GeometryAnnotator(load_estimator(geometry_path()), condition)
    from preprocessors.registry import checkpoint_preprocessor

    overrides = CASE_PARAMETERS[condition](case) if case is not None and condition in CASE_PARAMETERS else None
    return checkpoint_preprocessor(condition, metadata, overrides)


def held_out_render(condition: str, index: int, *, seed: int = DEMO_SEED) -> ToyScene:
    """Held-out toy render `index` for `condition`: for pose a figure placed anywhere in the frame (as the pose
    ControlNet was trained), a scene otherwise. Its `.image` is (64, 64, 3) uint8, `.caption` its prompt."""
    from controlkit.demo.toyworld.world import render_figure, render_scene

    if condition == "pose":
        return render_figure((seed, index), anywhere=True)
    return render_scene((seed, index))


def exact_map(condition: str, render: ToyScene) -> np.ndarray | None:
    """The renderer's ground truth of `render` drawn as the `condition` ControlNet was trained on it, (64, 64, 3)
    uint8: the OpenPose map of the figure's exact keypoints, the depth map (near bright) or the normal map; None
    for the edge conditions (canny, lineart, softedge), whose maps come from their preprocessor."""
    from controlkit.demo.toyworld.world import depth_map, normal_map, pose_map

    if condition == "pose":
        return pose_map(render)
    if condition == "depth":
        return depth_map(render.depth)
    if condition == "normal":
        return normal_map(render.normals)
    return None


def demo_cases(condition: str, count: int, annotate: Callable[[Any], Any] | None = None, *,
               seed: int = DEMO_SEED, metadata: Any = None) -> list[DemoCase]:
    """`count` held-out toy-world inputs for `condition` (`held_out_render`): pose, depth and normal maps are the
    renderer's ground truth (`exact_map`); the others come from `annotate` (see `condition_annotator`), or for
    the `CASE_PARAMETERS` conditions from the `metadata`'s preprocessor with each case's parameters. Inpaint cases
    repaint their map's masked region of the truth (`DemoCase.options`)."""
    from controlkit.demo.toyworld.world import pose_json
    from controlkit.image import MASK_ALPHA

    if condition not in EXACT_CONDITIONS and condition not in CASE_PARAMETERS and annotate is None:
        raise ValueError(f"{condition} inputs are annotated: pass `annotate` (condition_annotator)")
    cases = []
    for index in range(count):
        render = held_out_render(condition, index, seed=seed)
        drawn = exact_map(condition, render)
        if drawn is None:
            annotator = condition_annotator(condition, metadata, index) if condition in CASE_PARAMETERS else annotate
            drawn = np.asarray(annotator(render.image))
        reference = pose_json(render) if condition == "pose" else render.image if condition in TRUTH_REFERENCES \
            else drawn
        options = {}
        if drawn.shape[2] == 4:  # the inpaint map: its hole is the mask, white where repainted
            mask = np.where(drawn[..., 3] < MASK_ALPHA, 255, 0).astype(np.uint8)
            options = {"init_image": render.image, "mask": mask, "strength": 1.0}
        cases.append(DemoCase(render.image, drawn, reference, render.caption, options))
    return cases


def run_condition(base: Any, condition: str, count: int, *, steps: int = DEMO_STEPS,
                  guidance: float = DEMO_GUIDANCE, seed: int = 0, controlnet: Any = None,
                  metadata: Any = None, generate_options: Mapping[str, Any] | None = None,
                  control_options: Mapping[str, Any] | None = None) -> ConditionRun:
    """Generate `count` held-out cases with the ControlNet of `condition` (default: the demo's) and with control
    off, and score both (case i uses generation seed `seed + i` in both runs). `generate_options` (e.g.
    compile=True) go to every `generate` call and `control_options` (e.g. every=2) to the control: the speed
    benchmark measures what each speed-up costs in control."""
    from controlkit.control import Control
    from controlkit.demo.models import load_demo_controlnet
    from training.metrics import controllability

    start = time.perf_counter()
    if controlnet is None:
        controlnet, metadata = load_demo_controlnet(condition, unet=base.unet)
    annotate = condition_annotator(condition, metadata)
    cases = demo_cases(condition, count, annotate, metadata=metadata)
    controlled, uncontrolled = [], []
    for index, case in enumerate(cases):
        controls = [Control(case.condition_map, controlnet, **(control_options or {}))]
        options = {**(generate_options or {}), **case.options}
        controlled.append(_generate(base, case.prompt, controls, steps, guidance, seed + index, options))
        uncontrolled.append(_generate(base, case.prompt, [], steps, guidance, seed + index, options))
    references = [case.reference for case in cases]
    with_control = _quietly(lambda: controllability(condition, controlled, references, preprocessor=annotate))
    without_control = _quietly(lambda: controllability(condition, uncontrolled, references, preprocessor=annotate))
    return ConditionRun(condition, cases, controlled, uncontrolled, with_control, without_control,
                        time.perf_counter() - start)


def _generate(base: Any, prompt: str, controls: list[Any], steps: int, guidance: float, seed: int,
              options: Mapping[str, Any] | None = None) -> np.ndarray:
    from controlkit.pipeline import generate

    result = generate(base, prompt, controls, steps=steps, guidance_scale=guidance, seed=seed, width=64, height=64,
                      output_type="np", **(options or {}))
    return (np.clip(result.images[0], 0.0, 1.0) * 255).round().astype(np.uint8)


def _quietly(function: Callable[[], Any]) -> Any:
    """Run without the pose annotator's per-image "no person found" warnings (a miss is scored, not an error)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return function()


#: Contact-sheet layout: pixels between cases and between rows, width of the band naming the condition.
SHEET_GAP, SHEET_BAND = 4, 96


def contact_sheet(runs: Sequence[ConditionRun], path: str | Path, *, zoom: int = 2) -> Path:
    """A PNG with one row per condition and, per case, four cells: condition | with control | control off |
    ground truth (control off: the base alone, same prompt and seed, so the two middle cells differ by the
    ControlNet only).

    Cells are the 64 x 64 images enlarged `zoom` times (nearest neighbour), so a row is 64 * zoom high and
    SHEET_BAND + count * (4 * 64 * zoom + SHEET_GAP) wide, with a white SHEET_GAP below it; the band on the left
    names the condition. Rows with fewer cases are padded with white.
    """
    import cv2
    from PIL import Image

    side = 64 * zoom
    rows = []
    for run in runs:
        cells = []
        for case, on, off in zip(run.cases, run.controlled, run.uncontrolled):
            four = np.concatenate([shown_map(case.condition_map), on, off, case.truth], axis=1)
            cells.append(np.kron(four, np.ones((zoom, zoom, 1), np.uint8)))
            cells.append(np.full((side, SHEET_GAP, 3), 255, np.uint8))
        band = np.full((side, SHEET_BAND, 3), 255, np.uint8)
        cv2.putText(band, run.condition, (4, side // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([band, *cells], axis=1))
        rows.append(np.full((SHEET_GAP, rows[-1].shape[1], 3), 255, np.uint8))
    width = max(row.shape[1] for row in rows)
    sheet = np.concatenate([np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255)
                            for row in rows])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path


def shown_map(condition_map: np.ndarray) -> np.ndarray:
    """A condition map as the contact sheet shows it, RGB (H, W, 3): a masked region (inpaint) in black."""
    from controlkit.image import MASK_ALPHA

    if condition_map.shape[2] == 3:
        return condition_map
    return np.where(condition_map[..., 3:] < MASK_ALPHA, 0, condition_map[..., :3]).astype(np.uint8)


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
            **({"extra": {"with_control": on.extra, "control_off": off.extra}} if on.extra else {}),
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


@dataclass
class PhotoMaps:
    """A bundled photo and its maps from every preprocessor that is ready here (PNG files, the photo's size)."""

    photo: Path
    size: tuple[int, int]  # (width, height) in pixels
    maps: dict[str, Path]  # preprocessor name -> its map
    seconds: dict[str, float]  # preprocessor name -> time to annotate, model loading included
    skipped: dict[str, str]  # preprocessor name -> what it needs to run here


def annotate_photo(name: str, output: str | Path, *, log: Callable[[str], None] | None = None) -> PhotoMaps:
    """Annotate the bundled photo `name` (`controlkit.demo.photos.SAMPLES`) with every registry preprocessor
    that can run here, writing OUTPUT/NAME.png and OUTPUT/NAME_<preprocessor>.png; the others are listed with
    what they need. `log` receives one line per preprocessor as it finishes.

    Raises:
        ValueError: an unknown photo name (nothing is written).
    """
    from controlkit.demo.photos import sample_photo
    from controlkit.image import to_pil
    from preprocessors.registry import PREPROCESSORS, get_preprocessor

    say = log or _silent
    photo = sample_photo(name)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    result = PhotoMaps(output / f"{name}.png", (photo.shape[1], photo.shape[0]), {}, {}, {})
    to_pil(photo).save(result.photo)
    say(f"photo: {name} {photo.shape[1]}x{photo.shape[0]} -> {result.photo}")
    for preprocessor, spec in sorted(PREPROCESSORS.items()):
        missing = spec.check_ready()
        if missing is not None:
            result.skipped[preprocessor] = missing
            say(f"  {preprocessor:9s} skipped: {missing}")
            continue
        start = time.perf_counter()
        path = output / f"{name}_{preprocessor}.png"
        get_preprocessor(preprocessor)(photo).save(path)
        result.maps[preprocessor], result.seconds[preprocessor] = path, time.perf_counter() - start
        say(f"  {preprocessor:9s} {result.seconds[preprocessor]:6.2f} s -> {path}")
    return result


@dataclass
class DemoReport:
    """What `run_demo` did and wrote."""

    photo: PhotoMaps | None
    runs: list[ConditionRun]
    rows: list[dict[str, Any]]  # `table_rows(runs)`
    sheet: Path  # the contact sheet PNG
    table: Path  # the rows as JSON
    seconds: float


def run_demo(output: str | Path, conditions: Sequence[str], *, count: int = 4, steps: int = DEMO_STEPS,
             guidance: float = DEMO_GUIDANCE, photo: str | None = "astronaut",
             log: Callable[[str], None] | None = None) -> DemoReport:
    """`controlkit demo`: annotate the bundled `photo` (None: skip) into OUTPUT/photo/, run `count` held-out cases
    of each condition with its demo ControlNet and with control off, and write OUTPUT/contact_sheet.png and the
    controllability table OUTPUT/controllability.json. `log` receives progress lines."""
    import json

    from controlkit.demo.models import load_demo_base

    started, say = time.perf_counter(), log or _silent
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    maps = annotate_photo(photo, output / "photo", log=log) if photo is not None else None
    base = load_demo_base()
    say(f"toy world: {count} held-out scenes per condition, {steps} steps, demo base + ControlNet vs control off "
        "(same seeds)")
    runs = []
    for condition in conditions:
        runs.append(run_condition(base, condition, count, steps=steps, guidance=guidance))
        say(f"  {condition:9s} {2 * count} images in {runs[-1].seconds:5.1f} s")
    sheet = contact_sheet(runs, output / "contact_sheet.png")
    rows = table_rows(runs)
    table = output / "controllability.json"
    table.write_text(json.dumps(rows, indent=2) + "\n")
    return DemoReport(maps, runs, rows, sheet, table, time.perf_counter() - started)


def _silent(line: str) -> None:
    """The default `log`: progress lines go nowhere."""
