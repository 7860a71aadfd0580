"""Condition maps computed from the training images: registry preprocessors, random parameters, a disk cache.

A condition function is any callable `fn(image, rng) -> map` on RGB uint8 (H, W, 3) arrays, returning an RGB
uint8 map of the same size; `rng` is a `numpy.random.Generator` seeded per (seed, epoch, index) by the
dataset, so a resumed run draws the same parameters. A condition function may carry `cache_key` (a string
naming the preprocessor and its parameters): only then are its maps cached on disk.

Cache policy: fixed-parameter maps are cached, keyed by (source identity, cache_key, resolution), one PNG
each, written atomically. Randomised maps (`make_condition_fn(..., randomize=...)`) are NOT cached: every
(epoch, index) draws new parameters and is used once per run, so a cache would grow by a dataset's worth of
maps per epoch without a hit; their determinism comes from the seeded generator instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.errors import ConfigError, ControlkitError, ImageError
from controlkit.files import write_bytes_atomic

if TYPE_CHECKING:
    import numpy as np

#: Preprocessor instances kept per condition function; a randomised function builds one per distinct draw.
_MAX_BUILT = 32


class PreprocessorCondition:
    """A registry preprocessor as a condition function, with parameters drawn per call from `randomize`.

    Built by `make_condition_fn`; picklable (for DataLoader workers), preprocessors are rebuilt lazily.
    """

    def __init__(self, preprocessor: str, params: dict[str, Any], randomize: dict[str, tuple[float, float]]):
        self.preprocessor = preprocessor
        self.params = params
        self.randomize = randomize
        self.integer_params = {name for name in randomize if _is_integer_parameter(preprocessor, params, name)}
        self._built: dict[str, Any] = {}

    @property
    def cache_key(self) -> str | None:
        """`name:{params}` for fixed parameters; None (not cached) when parameters are randomised."""
        if self.randomize:
            return None
        return f"{self.preprocessor}:{json.dumps(self.params, sort_keys=True, default=str)}"

    def draw(self, rng: np.random.Generator) -> dict[str, Any]:
        """The parameters for one call: fixed ones plus one draw of each randomised range.

        Integer parameters are drawn from the closed range [low, high]; `low_X`/`high_X` pairs are kept
        ordered (swapped when a draw from overlapping ranges inverts them).
        """
        drawn = dict(self.params)
        for name, (low, high) in sorted(self.randomize.items()):  # sorted: the draw order is part of the seed
            if name in self.integer_params:
                drawn[name] = int(rng.integers(int(low), int(high) + 1))
            else:
                drawn[name] = float(rng.uniform(low, high))
        for low_name in {_low_partner(name) for name in self.randomize}:
            high_name = "high_" + low_name[4:]
            ordered = low_name not in drawn or high_name not in drawn or drawn[low_name] <= drawn[high_name]
            if low_name.startswith("low_") and not ordered:
                drawn[low_name], drawn[high_name] = drawn[high_name], drawn[low_name]
        return drawn

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        import numpy as np

        params = self.draw(rng)
        condition = self.preprocessor_for(params)(image)
        return np.asarray(condition, dtype=np.uint8)

    def preprocessor_for(self, params: dict[str, Any]) -> Any:
        from preprocessors.registry import get_preprocessor

        key = json.dumps(params, sort_keys=True, default=str)
        if key not in self._built:
            if len(self._built) >= _MAX_BUILT:
                self._built.pop(next(iter(self._built)))
            self._built[key] = get_preprocessor(self.preprocessor, **params)
        return self._built[key]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_built"] = {}
        return state

    def __repr__(self) -> str:
        return f"PreprocessorCondition({self.preprocessor!r}, params={self.params}, randomize={self.randomize})"


def _low_partner(name: str) -> str:
    """`high_X` -> `low_X`; other names map to themselves (and have no `high_` partner unless `low_X`)."""
    return "low_" + name[5:] if name.startswith("high_") else name


def make_condition_fn(
    preprocessor: str,
    params: Mapping[str, Any] | None = None,
    randomize: Mapping[str, tuple[float, float]] | None = None,
) -> PreprocessorCondition:
    """A condition function from a registry preprocessor.

    Args:
        preprocessor: registry name, e.g. "canny".
        params: fixed keyword parameters of the preprocessor.
        randomize: parameter name -> (low, high), drawn per call; integer parameters stay integers.
            ControlNet 1.1's canny was trained with random thresholds, e.g.
            `{"low_threshold": (50, 150), "high_threshold": (150, 250)}`.

    Example:
        >>> fn = make_condition_fn("canny", randomize={"low_threshold": (50, 150), "high_threshold": (150, 250)})
        >>> edges = fn(rgb, np.random.default_rng(0))      # (H, W, 3) uint8

    Raises:
        ConfigError: an unknown preprocessor or parameter, a bad range, or parameters the preprocessor rejects.
    """
    from preprocessors.registry import get_spec

    params = dict(params or {})
    ranges = {name: _check_range(name, value) for name, value in (randomize or {}).items()}
    try:
        valid = get_spec(preprocessor).parameters()
    except ValueError as error:
        raise ConfigError(str(error)) from None
    unknown = sorted((set(params) | set(ranges)) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(unknown)} for preprocessor '{preprocessor}'; "
            f"valid: {', '.join(sorted(valid)) or 'none'}"
        )
    both = sorted(set(params) & set(ranges))
    if both:  # a drawn value would silently replace the fixed one
        raise ConfigError(
            f"preprocessor '{preprocessor}': {', '.join(both)} both fixed (preprocessor_params) and randomised "
            "(randomize); keep one"
        )
    function = PreprocessorCondition(preprocessor, params, ranges)
    import numpy as np

    try:  # build once with a draw, so bad values and missing weights fail now, not in a DataLoader worker
        function.preprocessor_for(function.draw(np.random.default_rng(0)))
    except (ValueError, TypeError) as error:
        message = str(error)
        prefix = f"preprocessor '{preprocessor}': "
        raise ConfigError(message if message.startswith(prefix) else prefix + message) from None
    return function


def config_condition_fn(data: Any) -> PreprocessorCondition | None:
    """The condition function a `[data]` config section (`training.config.DataConfig`) names: its
    `preprocessor` with `preprocessor_params` and `randomize`, or None without a preprocessor.

    Raises:
        ConfigError: as `make_condition_fn`.
    """
    if not data.preprocessor:
        return None
    ranges = {name: tuple(bounds) for name, bounds in data.randomize.items()}
    return make_condition_fn(data.preprocessor, data.preprocessor_params, ranges)


def _check_range(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"randomize[{name!r}] must be a (low, high) pair, got {value!r}")
    low, high = value
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
        raise ConfigError(f"randomize[{name!r}] must be numbers with low <= high, got {value!r}")
    return (low, high)


def _is_integer_parameter(preprocessor: str, params: Mapping[str, Any], name: str) -> bool:
    """An int default, an int given in `params`, or a declared int type (`detect_resolution: int | None`, whose
    default is None) makes a randomised parameter integer-valued."""
    import re

    from preprocessors.registry import get_spec

    spec = get_spec(preprocessor)
    default = params.get(name, spec.parameters().get(name))
    if isinstance(default, int) and not isinstance(default, bool):
        return True
    declared = spec.parameter_types().get(name, "")
    return bool(re.fullmatch(r"int( \| None)?|None \| int|Optional\[int\]", declared))


class ConditionCache:
    """Computed condition maps on disk: `root/<function key hash>/<source hash>-<resolution>.png`.

    The source is identified by its path, modification time and size (no extra read of the file), or by
    a hash of the bytes for in-memory sources. Writes go to a temporary file in the same folder and are
    renamed into place, so a run killed mid-write never leaves a truncated map; an unreadable cache file
    counts as a miss and is rewritten.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path_for(self, function_key: str, source_id: str, resolution: int) -> Path:
        folder = hashlib.sha256(function_key.encode()).hexdigest()[:16]
        name = hashlib.sha256(f"{source_id}|{resolution}".encode()).hexdigest()[:32]
        return self.root / folder / f"{name}.png"

    def get(self, path: Path) -> np.ndarray | None:
        from controlkit.image import load_condition

        if not path.is_file():
            self.misses += 1
            return None
        try:
            condition = load_condition(path)
        except ImageError:
            self.misses += 1
            return None
        self.hits += 1
        return condition

    def put(self, path: Path, condition: np.ndarray, function_key: str) -> None:
        """Store one map (uint8 RGB, or RGBA with a masked region). Raises OutputError when the cache cannot be
        written (nothing half-written)."""
        import cv2

        import numpy as np

        order = [2, 1, 0, 3][: condition.shape[2]]  # RGB(A) -> OpenCV's BGR(A) order
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(condition[..., order]))
        if not ok:
            raise ControlkitError(f"{path}: could not encode the condition map as PNG")
        label = path.parent / "key.txt"  # which preprocessor and parameters the folder's maps came from
        if not label.exists():
            write_bytes_atomic(label, (function_key + "\n").encode("utf-8"))
        write_bytes_atomic(path, encoded.tobytes())


def source_identity(reference: Any) -> str | None:
    """What identifies an image source for the cache: path + mtime + size, or a hash of bytes; else None."""
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference)
        try:
            stat = path.stat()
        except OSError:
            return None
        return f"{path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}"
    if isinstance(reference, (bytes, bytearray)):
        return "sha256:" + hashlib.sha256(reference).hexdigest()
    return None
