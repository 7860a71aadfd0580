"""Preprocessors on the page: which are offered, with which parameters, and the maps they make.

Offered: every registry entry that runs here with its defaults (`spec.check_ready()`), plus "none" for an
uploaded image that already is the condition map. Each entry's page parameters are its keyword parameters of
the types a form can hold (true/false, numbers, text); path and model parameters are left to the command line,
so a page never names files on the server.
"""

from __future__ import annotations

import os
import shutil
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlkit.errors import ConfigError

#: The Preprocessor choice for an image that already is the condition map.
NONE = "none"
#: Declared types the page offers -> the kind of field that holds them.
KINDS = {"bool": "bool", "int": "int", "float": "float", "int | None": "optional int", "str": "text"}
#: Preprocessors kept built (HED and pose load a network when built), per name and parameters.
CACHED = 8


@dataclass(frozen=True)
class Parameter:
    """One page parameter of a preprocessor: its keyword, the kind of field ("bool", "int", "float",
    "optional int", "text") and its default."""

    name: str
    kind: str
    default: Any


def ready_preprocessors() -> dict[str, list[Parameter]]:
    """Registry name -> its page parameters, for every entry that is ready here, in registry order."""
    from preprocessors.registry import PREPROCESSORS

    offered = {}
    for name, spec in PREPROCESSORS.items():
        if spec.check_ready() is None:
            types, defaults = spec.parameter_types(), spec.parameters()
            offered[name] = [Parameter(key, KINDS[kind], defaults[key])
                             for key, kind in types.items() if kind in KINDS]
    return offered


def page_values(parameters: Sequence[Parameter], values: Sequence[Any]) -> dict[str, Any]:
    """Form values -> keyword parameters. An emptied number field means the default. An optional number
    (`int | None`) is a text field read as `--set` reads it ("none", "512"), since a number field cannot be empty
    in every browser; the registry then checks its type."""
    from preprocessors.registry import parse_param_value

    chosen = {}
    for parameter, value in zip(parameters, values, strict=True):
        if value is None and parameter.kind in ("int", "float"):
            continue
        if parameter.kind == "optional int" and isinstance(value, str):
            value = parse_param_value(value) if value.strip() else None
        if parameter.kind in ("int", "optional int") and isinstance(value, float) and value.is_integer():
            value = int(value)  # a number field sends 512.0 for 512
        chosen[parameter.name] = value
    return chosen


def field_value(parameter: Parameter, value: Any) -> Any:
    """A parameter value as its page field shows it: an optional number as text ("none", "512")."""
    if parameter.kind == "optional int":
        return "none" if value is None else str(value)
    return value


class Preprocessors:
    """Builds preprocessors once per name and parameters and runs them one call at a time each (the learned ones
    hold network state that two threads must not share mid-call)."""

    def __init__(self) -> None:
        self._built: OrderedDict[tuple, tuple[Any, threading.Lock]] = OrderedDict()
        self._guard = threading.Lock()

    def condition_map(self, name: str, params: dict[str, Any], image: Any) -> Any:
        """The condition map (RGB uint8 (H, W, 3)) of an RGB uint8 image: the image itself for "none"."""
        from controlkit.image import load_image

        if name == NONE:
            return image
        preprocessor, lock = self._get(name, params)
        with lock:
            return load_image(preprocessor(image))

    def _get(self, name: str, params: dict[str, Any]) -> tuple[Any, threading.Lock]:
        from preprocessors.registry import get_preprocessor

        key = (name, tuple(sorted(params.items())))
        with self._guard:
            if key in self._built:
                self._built.move_to_end(key)
                return self._built[key]
        built = (get_preprocessor(name, **params), threading.Lock())  # outside the guard: HED takes a second
        with self._guard:
            self._built[key] = built
            while len(self._built) > CACHED:
                self._built.popitem(last=False)
        return built


@dataclass(frozen=True)
class Annotation:
    """What the Annotate tab gives back: the zip of maps, each map, and one summary line."""

    archive: Path
    maps: list[Path]
    summary: str


def annotate_uploads(paths: Sequence[str], name: str, params: dict[str, Any], folder: Path,
                     progress: Callable[[int, int], None] | None = None) -> Annotation:
    """Annotate uploaded images with `preprocessors.batch.annotate_paths` into `folder` and zip the maps.

    The uploads are copied under their own names first, so the maps are named after them (not after the upload
    folders); a bad upload is one failure in the summary and the others are annotated.
    """
    from preprocessors.batch import annotate_paths

    if not paths:
        raise ConfigError("Annotate: upload one image or more")
    inputs, maps = folder / "inputs", folder / "maps"
    for path in paths:
        shutil.copyfile(path, _unique(inputs, Path(path).name))
    report = annotate_paths([inputs], name, maps, params=params, workers=1,
                            progress=None if progress is None else lambda results, total: _count(results, total,
                                                                                                  progress))
    failures = [message.replace(str(inputs) + os.sep, "") for _, message in report.failed]
    if not report.written:
        raise ConfigError(failures[0] if failures else "Annotate: no image was annotated")
    archive = folder / f"{name}-maps.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(report.written):
            bundle.write(path, path.relative_to(maps).as_posix())
    return Annotation(archive, sorted(report.written), _summary(name, report, failures))


def _unique(folder: Path, name: str) -> Path:
    """folder/name, or folder/name-1, -2, ... when two uploads share a name."""
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix, candidate, count = Path(name).stem, Path(name).suffix, folder / name, 0
    while candidate.exists():
        count += 1
        candidate = folder / f"{stem}-{count}{suffix}"
    return candidate


def _count(results: Iterable[Any], total: int, progress: Callable[[int, int], None]) -> Iterator[Any]:
    for done, result in enumerate(results, start=1):
        progress(done, total)
        yield result


def _summary(name: str, report: Any, failures: list[str]) -> str:
    text = f"{len(report.written)} {name} map(s)"
    if report.empty:
        text += f", {len(report.empty)} with nothing found ({report.empty[0][1]})"
    if failures:
        text += f"; {len(failures)} failed: {failures[0]}" + (" (and more)" if len(failures) > 1 else "")
    return text
