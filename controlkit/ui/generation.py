"""One Generate request of the page: checked, turned into `Control`s, run by `controlkit.pipeline.generate`, and
written as PNGs that carry their settings as the command line writes them (a "controlkit" text chunk).

Each unit's condition map is made here, from its own preprocessor, and fitted to the output size with its own
resize mode (`controlkit.control.fit_image`), so the gallery can show the maps the ControlNets saw; generate then
gets maps of the output size, which it uses as they are. Everything else (checks, sampling) is the library's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlkit.errors import ConfigError, ImageError
from controlkit.ui.models import ServedModels
from controlkit.ui.preprocessing import NONE, Preprocessors

#: How the library's messages name each option: by the page's labels.
LABELS = {"steps": "Steps", "guidance_scale": "Guidance", "seed": "Seed", "num_images": "Images", "width": "Width",
          "height": "Height"}


@dataclass(frozen=True)
class UnitRequest:
    """One control unit as the page sent it (`image`: the uploaded file's path, or None)."""

    index: int
    enabled: bool
    image: str | None
    preprocessor: str
    params: dict[str, Any]
    controlnet: str | None
    weight: float
    start: float
    end: float
    mode: str
    resize_mode: str


@dataclass(frozen=True)
class GenerationRequest:
    """The page's generation fields (a seed of None or below 0 is a random one)."""

    prompt: str
    negative_prompt: str
    steps: int | None
    guidance: float | None
    seed: int | None
    width: int | None
    height: int | None
    num_images: int
    scheduler: str
    units: Sequence[UnitRequest] = field(default_factory=tuple)


@dataclass(frozen=True)
class GenerationOutput:
    """The PNGs written (`images`), each unit's condition map with its caption (`maps`), one summary line."""

    images: list[Path]
    maps: list[tuple[Path, str]]
    summary: str


def image_of(path: str, index: int | None = None) -> Any:
    """An uploaded image through the one normaliser (`controlkit.image.load_image`), its errors naming the file
    as the user called it rather than by its place in the server's upload folder."""
    from controlkit.image import load_image

    try:
        return load_image(path)
    except ImageError as error:
        where = f"Control {index}: " if index else ""
        raise ImageError(where + str(error).replace(str(path), Path(path).name)) from None


def run_generation(request: GenerationRequest, models: ServedModels, preprocessors: Preprocessors, folder: Path,
                   progress: Callable[[int, int], None] | None = None) -> GenerationOutput:
    """Generate the request's images into `folder`; `progress(done, total)` after each denoising step.

    Raises ControlkitError (one line naming the field) for anything the user can fix, before any model runs.
    """
    from controlkit.generation_options import check_generation_options, native_size, size_note
    from controlkit.pipeline import generate, save_images

    seed = None if request.seed is None or request.seed < 0 else request.seed
    defaults = models.defaults()
    width = defaults["width"] if request.width is None else request.width  # an emptied field: the base's size
    height = defaults["height"] if request.height is None else request.height
    check_generation_options(steps=request.steps, guidance_scale=request.guidance, seed=seed,
                             num_images=request.num_images, width=width, height=height, names=LABELS)
    steps = defaults["steps"] if request.steps is None else request.steps
    units = [unit for unit in request.units if unit.enabled]
    controls, maps, described = [], [], []
    for unit in units:
        control, condition, description = _control(unit, models, preprocessors, (width, height))
        controls.append(control)
        maps.append((condition, unit))
        described.append(description)
    folder.mkdir(parents=True, exist_ok=True)
    map_files = [_save_map(condition, unit, folder) for condition, unit in maps]
    started = time.perf_counter()
    result = generate(models.base, request.prompt, controls, negative_prompt=request.negative_prompt or None,
                      steps=steps, guidance_scale=request.guidance, seed=seed, scheduler=request.scheduler,
                      num_images=request.num_images, width=width, height=height, on_step=progress)
    record = {**result.settings, "base": models.base_source, "controls": described}
    stem = f"controlkit-{result.seed}"
    paths = [folder / f"{stem}.png"] if request.num_images == 1 else \
        [folder / f"{stem}-{index}.png" for index in range(request.num_images)]
    written = save_images(result.images, paths, record)
    note = size_note((width, height), native_size(models.base))
    return GenerationOutput(written, map_files, _summary(result.settings, time.perf_counter() - started, note))


def _control(unit: UnitRequest, models: ServedModels, preprocessors: Preprocessors,
             size: tuple[int, int]) -> tuple[Any, Any, dict[str, Any]]:
    """(the unit's Control, its condition map at the output size, how the PNG records it)."""
    from controlkit.control import Control, check_control_options, fit_image

    prefix = f"Control {unit.index}: "
    check_control_options(unit.weight, unit.start, unit.end, unit.mode, prefix=prefix)
    if unit.image is None:
        raise ImageError(f"{prefix}no control image; upload one, or untick Enable")
    if not unit.controlnet:
        raise ConfigError(f"{prefix}no ControlNet chosen; the server serves {', '.join(models.names) or 'none'}")
    try:
        controlnet, metadata = models.controlnet(unit.controlnet)
    except ConfigError as error:
        raise ConfigError(prefix + str(error)) from None
    condition = fit_image(_condition(unit, preprocessors), size, unit.resize_mode)
    control = Control(condition, controlnet, scale=unit.weight, start=unit.start, end=unit.end, mode=unit.mode,
                      metadata=metadata, conditional_only=bool(metadata is not None and metadata.conditional_only))
    description = {"name": unit.controlnet, "image": Path(unit.image).name,
                   "controlnet": models.sources[unit.controlnet],
                   "scale": unit.weight, "mode": unit.mode, "start": unit.start, "end": unit.end,
                   "preprocessor": unit.preprocessor, "resize_mode": unit.resize_mode}
    if unit.preprocessor != NONE:
        description["preprocessor_params"] = dict(unit.params)
    return control, condition, description


def _condition(unit: UnitRequest, preprocessors: Preprocessors) -> Any:
    """The unit's condition map at its image's size, with errors naming the unit."""
    image = image_of(unit.image, unit.index)
    try:
        return preprocessors.condition_map(unit.preprocessor, unit.params, image)
    except ValueError as error:  # the registry's unknown-parameter and wrong-type messages
        raise ConfigError(f"Control {unit.index}: {error}") from None


def _save_map(condition: Any, unit: UnitRequest, folder: Path) -> tuple[Path, str]:
    from controlkit.image import to_pil

    path = folder / f"control-{unit.index}-{unit.preprocessor}.png"
    to_pil(condition).save(path, format="PNG")
    return path, f"Control {unit.index} map ({unit.preprocessor}, {unit.controlnet})"


def _summary(settings: dict[str, Any], seconds: float, note: str | None) -> str:
    count = settings["num_images"]
    text = (f"{count} image{'s' if count > 1 else ''} {settings['width']}x{settings['height']}, seed "
            f"{settings['seed']}, {settings['steps']} steps {settings['scheduler']}, guidance "
            f"{settings['guidance_scale']:g}, {settings['device']} {settings['dtype']}; {seconds:.1f} s")
    return f"{text}; note: {note}" if note else text
