"""The widgets of a preprocessor's parameters and of one control unit (a `Control N` tab).

Each widget is registered under a key (`control_1_weight`, `control_1_canny_low_threshold`, ...): the keys are
the names of the page's API parameters, and the handlers read their values by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from controlkit.ui.generation import UnitRequest
from controlkit.ui.preprocessing import NONE, Parameter, field_value, page_values
from controlkit.ui.uploads import IMAGE_CLASS, IMAGE_HEIGHT, control_image

#: The weight slider's range: the reference ControlNet pages offer 0-2 (the library takes up to 10).
MAX_WEIGHT = 2.0


@dataclass
class Fields:
    """Widgets by key, in the order their values reach a handler."""

    widgets: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, widget: Any) -> Any:
        self.widgets[key] = widget
        return widget

    def merged(self, *others: Fields) -> Fields:
        result = Fields(dict(self.widgets))
        for other in others:
            result.widgets.update(other.widgets)
        return result


class PreprocessorForm:
    """A Preprocessor dropdown with one group of parameter fields per preprocessor, the chosen one shown."""

    def __init__(self, prefix: str, offered: dict[str, list[Parameter]], value: str, *, with_none: bool,
                 values: dict[str, Any] | None = None) -> None:
        self.prefix, self.offered = prefix, offered
        self.fields = Fields()
        choices = ([NONE] if with_none else []) + list(offered)
        self.dropdown = self.fields.add(f"{prefix}preprocessor", gr.Dropdown(choices, value=value,
                                                                            label="Preprocessor"))
        self.groups: dict[str, Any] = {}
        given = values or {}  # the chosen preprocessor's starting values (a checkpoint's stored parameters)
        for name, parameters in offered.items():
            with gr.Group(visible=name == value) as group, gr.Row():
                for parameter in parameters:
                    start = given.get(parameter.name, parameter.default) if name == value else parameter.default
                    self.fields.add(self.key(name, parameter), _field(parameter, field_value(parameter, start)))
            self.groups[name] = group
        self.dropdown.change(self._show, self.dropdown, list(self.groups.values()), api_visibility="private",
                             queue=False)

    def key(self, name: str, parameter: Parameter) -> str:
        return f"{self.prefix}{name}_{parameter.name}"

    def chosen(self, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(the preprocessor chosen, its parameters) from a handler's values by key."""
        name = values[f"{self.prefix}preprocessor"]
        parameters = self.offered.get(name, [])
        return name, page_values(parameters, [values[self.key(name, p)] for p in parameters])

    def suggested(self, name: str, stored: dict[str, Any]) -> list[Any]:
        """Updates for the dropdown and every field: `name` chosen, its fields at `stored` (else their defaults)."""
        updates: list[Any] = [gr.update(value=name)]
        for preprocessor, parameters in self.offered.items():
            for parameter in parameters:
                value = field_value(parameter, stored.get(parameter.name, parameter.default))
                updates.append(gr.update(value=value) if preprocessor == name else gr.update())
        return updates

    def _show(self, name: str) -> list[Any]:
        return [gr.update(visible=preprocessor == name) for preprocessor in self.groups]


def _field(parameter: Parameter, value: Any) -> Any:
    label = parameter.name
    if parameter.kind == "bool":
        return gr.Checkbox(value=bool(value), label=label)
    if parameter.kind == "text":
        return gr.Textbox(value=value, label=label)
    if parameter.kind == "optional int":
        return gr.Textbox(value=value, label=label, info="a whole number, or none")
    return gr.Number(value=value, label=label, precision=0 if parameter.kind == "int" else None)


class ControlUnit:
    """The widgets of tab `Control N`: Enable, the image, its preprocessor and Preview, the ControlNet and how
    it acts."""

    def __init__(self, index: int, offered: dict[str, list[Parameter]], controlnets: list[str],
                 suggestion: tuple[str, dict[str, Any]]) -> None:
        from controlkit.control import MODES, RESIZE_MODES

        self.index, self.prefix = index, f"control_{index}_"
        own = Fields()
        self.enable = own.add(self.prefix + "enable", gr.Checkbox(False, label="Enable"))
        with gr.Row():
            self.image = own.add(self.prefix + "image", control_image("Control image"))
            self.map = gr.Image(label="Condition map", interactive=False, format="png", type="numpy",
                                buttons=["download", "fullscreen"], height=IMAGE_HEIGHT, elem_classes=[IMAGE_CLASS])
        first = controlnets[0] if controlnets else None
        self.controlnet = own.add(self.prefix + "controlnet",
                                  gr.Dropdown(controlnets, value=first, label="ControlNet"))
        self.form = PreprocessorForm(self.prefix, offered, suggestion[0], with_none=True, values=suggestion[1])
        self.preview = gr.Button("Preview", variant="secondary")
        self.weight = own.add(self.prefix + "weight",
                              gr.Slider(0.0, MAX_WEIGHT, 1.0, step=0.05, label="Control weight"))
        with gr.Row():
            self.start = own.add(self.prefix + "start", gr.Slider(0.0, 1.0, 0.0, step=0.01,
                                                                  label="Starting control step"))
            self.end = own.add(self.prefix + "end", gr.Slider(0.0, 1.0, 1.0, step=0.01, label="Ending control step"))
        with gr.Row():
            self.mode = own.add(self.prefix + "mode", gr.Radio(list(MODES), value=MODES[0], label="Control mode"))
            self.resize = own.add(self.prefix + "resize_mode", gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0],
                                                                        label="Resize mode"))
        # an upload means the user wants this unit on
        self.image.upload(lambda: True, None, self.enable, api_visibility="private", queue=False)
        self.fields = own.merged(self.form.fields)

    def request(self, values: dict[str, Any]) -> UnitRequest:
        """The unit's request from a handler's values by key."""
        name, params = self.form.chosen(values)
        key = self.prefix
        return UnitRequest(self.index, bool(values[key + "enable"]), values[key + "image"], name, params,
                           values[key + "controlnet"], values[key + "weight"], values[key + "start"],
                           values[key + "end"], values[key + "mode"], values[key + "resize_mode"])
