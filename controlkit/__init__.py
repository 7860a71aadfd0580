"""controlkit: spatial control of Stable Diffusion with ControlNet.

    >>> import controlkit
    >>> base = controlkit.load_base("demo")               # the shipped demo base; or a folder / single file
    >>> canny = controlkit.Control.from_pretrained("demo:canny", image="photo.jpg", unet=base.unet,
    ...                                           preprocessor=controlkit.get_preprocessor("canny"))
    >>> controlkit.generate(base, "a red cube", [canny], seed=1).images[0].save("cube.png")

Importing this package is cheap and has no side effects: the public names below are looked up in their modules
the first time they are used, and torch, diffusers and the preprocessor models are imported only then.
"""

from __future__ import annotations

import importlib
from typing import Any

from controlkit.errors import (
    CheckpointError,
    ConfigError,
    ControlkitError,
    ImageError,
    MissingDependencyError,
    OutputError,
    UnsafeCheckpointError,
    WeightsNotFoundError,
)

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first use).
PUBLIC_API = {
    "load_base": "controlkit.pipeline",
    "generate": "controlkit.pipeline",
    "Control": "controlkit.control",
    "load_controlnet": "controlkit.checkpoint",
    "new_controlnet": "controlkit.controlnet",
    "get_preprocessor": "preprocessors.registry",
    "train": "training.engine.trainer",
}

__all__ = [
    *PUBLIC_API,
    "CheckpointError",
    "ConfigError",
    "ControlkitError",
    "ImageError",
    "MissingDependencyError",
    "OutputError",
    "UnsafeCheckpointError",
    "WeightsNotFoundError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name not in PUBLIC_API:
        raise AttributeError(f"module 'controlkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(PUBLIC_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC_API))
