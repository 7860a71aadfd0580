"""controlkit: spatial control of Stable Diffusion with ControlNet.

Importing this package is cheap and has no side effects: torch, diffusers and the preprocessor models are
imported inside the functions that use them.
"""

from controlkit.errors import (
    CheckpointError,
    ConfigError,
    ControlkitError,
    ImageError,
    MissingDependencyError,
    UnsafeCheckpointError,
    WeightsNotFoundError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ControlkitError",
    "ImageError",
    "MissingDependencyError",
    "UnsafeCheckpointError",
    "WeightsNotFoundError",
    "__version__",
]
