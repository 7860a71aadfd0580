"""The page: Generate (prompt, settings, three control units, the gallery) and Annotate, and their events.

Every event that does work is also an API endpoint (`generate`, `preview_1..3`, `annotate`) whose parameters are
named after the widgets' keys and default to the page's initial values, so a gradio_client call names only what
it changes. A handler's user errors (`ControlkitError`, the registry's ValueError) are one line in the page
(gr.Error); anything else is one line too, with the traceback in the server's log, and the server goes on.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from controlkit.errors import ControlkitError, ImageError, first_line
from controlkit.ui.generation import GenerationRequest, image_of, run_generation
from controlkit.ui.models import ServedModels
from controlkit.ui.preprocessing import NONE, Parameter, Preprocessors, annotate_uploads, ready_preprocessors
from controlkit.ui.units import ControlUnit, Fields, PreprocessorForm
from controlkit.ui.uploads import image_files

LOG = logging.getLogger("controlkit.ui")
#: Control units on the page.
UNITS = 3


def build_page(models: ServedModels, folder: Path, *, concurrency: int = 2) -> gr.Blocks:
    """The page over `models`; each request writes its files in a new folder under `folder`."""
    offered = ready_preprocessors()
    preprocessors = Preprocessors()
    defaults = models.defaults()
    suggestion = _suggestion(models, offered, models.names[0]) if models.names else (NONE, {})
    with gr.Blocks(title="controlkit", analytics_enabled=False) as page:
        gr.Markdown(_header(models, defaults))
        with gr.Tabs():
            with gr.Tab("Generate"), gr.Row():
                with gr.Column(scale=3):
                    fields = _settings(defaults)
                    with gr.Tabs():
                        units = []
                        for index in range(1, UNITS + 1):
                            with gr.Tab(f"Control {index}"):
                                units.append(ControlUnit(index, offered, models.names, suggestion))
                with gr.Column(scale=2):
                    button = gr.Button("Generate", variant="primary")
                    results = [gr.Gallery(label="Results", columns=2, type="filepath", interactive=False,
                                          buttons=["download", "fullscreen"]),
                               gr.File(label="Downloads", file_count="multiple", interactive=False),
                               gr.Textbox(label="Status", interactive=False)]
            with gr.Tab("Annotate"):
                _annotate_tab(offered, folder, concurrency)
        everything = fields.merged(*(unit.fields for unit in units))
        button.click(api_handler(everything, _generate_run(models, preprocessors, folder, units)),
                     list(everything.widgets.values()), results, api_name="generate", concurrency_limit=concurrency)
        for unit in units:
            _wire_unit(unit, models, offered, preprocessors, concurrency)
    return page


def _settings(defaults: dict[str, Any]) -> Fields:
    """The generation fields above the control units, starting at the base's defaults."""
    from controlkit.sampling import DEFAULT_SCHEDULER, SCHEDULERS

    fields = Fields()
    fields.add("prompt", gr.Textbox(label="Prompt", lines=2))
    fields.add("negative_prompt", gr.Textbox(label="Negative prompt"))
    with gr.Row():
        fields.add("steps", gr.Number(defaults["steps"], label="Steps", precision=0))
        fields.add("guidance", gr.Number(defaults["guidance_scale"], label="Guidance", step=0.5))
        fields.add("seed", gr.Number(-1, label="Seed", precision=0, info="-1: a random seed"))
    with gr.Row():
        for side in ("width", "height"):
            fields.add(side, gr.Number(defaults[side], label=side.capitalize(), precision=0, step=8))
        fields.add("images", gr.Number(1, label="Images", precision=0))
        fields.add("scheduler", gr.Dropdown(sorted(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Scheduler"))
    return fields


def api_handler(fields: Fields, run: Callable[[dict[str, Any], Any], Any]) -> Callable[..., Any]:
    """`run(values by key, progress)` as the positional handler gradio calls, with a signature that names each
    value by its key (gradio's API names its parameters so) and a trailing gr.Progress, which gradio passes last.
    Every parameter defaults to None, which makes it optional in the API: a client that leaves one out sends the
    widget's initial value, or None for a widget without one (an empty prompt or upload)."""
    keys = list(fields.widgets)

    def handler(*values: Any) -> Any:
        *given, progress = values
        return guarded(run, dict(zip(keys, given, strict=True)), progress)

    parameters = [inspect.Parameter(key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for key in keys]
    parameters.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    handler.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return handler


def guarded(run: Callable[..., Any], *args: Any) -> Any:
    """Run a handler; every failure becomes one line in the page (gr.Error), never a traceback."""
    try:
        return run(*args)
    except gr.Error:
        raise
    except (ControlkitError, ValueError) as error:
        raise gr.Error(first_line(error), print_exception=False) from None
    except Exception as error:  # a failure of ours or of a library below: the log keeps the traceback
        LOG.exception("request failed")
        raise gr.Error(f"the request failed ({type(error).__name__}: {first_line(error)}); the server's log has "
                       "the details", print_exception=False) from None


def _generate_run(models: ServedModels, preprocessors: Preprocessors, folder: Path,
                  units: list[ControlUnit]) -> Callable[[dict[str, Any], Any], Any]:
    def run(values: dict[str, Any], progress: Any) -> tuple[list[tuple[str, str]], list[str], str]:
        request = GenerationRequest(
            prompt=values["prompt"] or "", negative_prompt=values["negative_prompt"] or "",
            steps=_whole(values["steps"]), guidance=values["guidance"], seed=_whole(values["seed"]),
            width=_whole(values["width"]), height=_whole(values["height"]),
            num_images=1 if values["images"] is None else _whole(values["images"]), scheduler=values["scheduler"],
            units=tuple(unit.request(values) for unit in units),
        )
        output = run_generation(request, models, preprocessors, _request_folder(folder),
                                progress=lambda done, total: progress((done, total), desc="Denoising", unit="steps"))
        shown = [(str(path), f"image {index + 1}") for index, path in enumerate(output.images)]
        shown += [(str(path), caption) for path, caption in output.maps]
        return shown, [str(path) for path in output.images], output.summary

    return run


def _wire_unit(unit: ControlUnit, models: ServedModels, offered: dict[str, list[Parameter]],
               preprocessors: Preprocessors, concurrency: int) -> None:
    """Preview (an API endpoint per unit) and the preprocessor a chosen ControlNet names."""
    preview_fields = Fields({unit.prefix + "image": unit.image}).merged(unit.form.fields)

    def preview(values: dict[str, Any], progress: Any) -> Any:
        path = values[unit.prefix + "image"]
        if path is None:
            raise ImageError(f"Control {unit.index}: upload a control image first")
        name, params = unit.form.chosen(values)
        try:
            return preprocessors.condition_map(name, params, image_of(path, unit.index))
        except ValueError as error:
            raise ValueError(f"Control {unit.index}: {error}") from None

    unit.preview.click(api_handler(preview_fields, preview), list(preview_fields.widgets.values()), unit.map,
                       api_name=f"preview_{unit.index}", concurrency_limit=concurrency)

    def suggest(name: str | None) -> list[Any]:
        if not name:
            return [gr.update()] * len(unit.form.fields.widgets)
        return unit.form.suggested(*guarded(_suggestion, models, offered, name, True))

    unit.controlnet.select(suggest, unit.controlnet, list(unit.form.fields.widgets.values()), api_visibility="private")


def _suggestion(models: ServedModels, offered: dict[str, list[Parameter]], name: str,
                strict: bool = False) -> tuple[str, dict[str, Any]]:
    """(the preprocessor a ControlNet's metadata names, if offered here, else "none"; its stored parameters).
    Loading the ControlNet here also checks it fits the base; when building the page (`strict` False) a failure
    leaves "none" and the error is said when the ControlNet is used."""
    try:
        _, metadata = models.controlnet(name)
    except ControlkitError:
        if strict:
            raise
        return NONE, {}
    named = getattr(metadata, "preprocessor", None)
    if named not in offered:
        return NONE, {}
    return named, dict(getattr(metadata, "preprocessor_params", None) or {})


def _annotate_tab(offered: dict[str, list[Parameter]], folder: Path, concurrency: int) -> None:
    """The Annotate tab: a preprocessor with its parameters over uploaded images, the maps back as a zip."""
    form = PreprocessorForm("annotate_", offered, next(iter(offered), NONE), with_none=False)
    fields = form.fields.merged(Fields({"annotate_images": image_files("Annotate images")}))
    button = gr.Button("Annotate", variant="primary")
    outputs = [gr.Gallery(label="Maps", columns=4, type="filepath", interactive=False),
               gr.File(label="Maps (zip)", interactive=False), gr.Textbox(label="Annotate status", interactive=False)]

    def run(values: dict[str, Any], progress: Any) -> tuple[list[str], str, str]:
        name, params = form.chosen(values)
        result = annotate_uploads(values["annotate_images"] or [], name, params, _request_folder(folder),
                                  progress=lambda done, total: progress((done, total), desc="Annotating",
                                                                        unit="images"))
        return [str(path) for path in result.maps], str(result.archive), result.summary

    button.click(api_handler(fields, run), list(fields.widgets.values()), outputs, api_name="annotate",
                 concurrency_limit=concurrency)


def _request_folder(folder: Path) -> Path:
    """A new folder for one request's files: users never see or overwrite each other's."""
    path = folder / uuid.uuid4().hex
    path.mkdir(parents=True)
    return path


def _whole(value: Any) -> Any:
    """A number field's value as an int when it is a whole number (an API client may send 4.0); else as sent,
    for the library's check to name."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _header(models: ServedModels, defaults: dict[str, Any]) -> str:
    base = Path(models.base_source).name
    controlnets = ", ".join(models.names) or "none (start with --controlnet NAME=PATH)"
    return (f"**controlkit** - base `{base}` ({defaults['width']} x {defaults['height']}, {defaults['steps']} steps, "
            f"guidance {defaults['guidance_scale']:g}) - ControlNets: {controlnets}")
