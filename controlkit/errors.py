"""User-facing errors.

Every error a user can cause (a bad image, a missing model, a wrong checkpoint, a bad config key) is a
`ControlkitError`. Its message is one line that names the input and the fix; the command line prints it
without a traceback and exits with status 1.
"""

from __future__ import annotations


class ControlkitError(Exception):
    """Base class of the errors a user can fix; the message is a single actionable line."""


class ImageError(ControlkitError, ValueError):
    """An input image that cannot be read or is out of bounds."""


class WeightsNotFoundError(ControlkitError, FileNotFoundError):
    """Model weights that are not available offline; the message says what to pass or install."""


class CheckpointError(ControlkitError, ValueError):
    """A checkpoint file that is not what it claims to be, or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint that would need code execution to load; it is never loaded."""


class ConfigError(ControlkitError, ValueError):
    """A configuration with bad keys or values; the message lists every problem."""


class OutputError(ControlkitError, OSError):
    """An output that cannot be written (a read-only or full disk, a path under a file); nothing half-written
    is left under its name."""


class MissingDependencyError(ControlkitError, ImportError):
    """An optional package that a feature needs is not installed; the message gives the install command."""


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (its class name when it has none), for a one-line report."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def preview(items: list[str], count: int = 3) -> str:
    """The first `count` items, comma-separated, then how many more there are ('none' for no item)."""
    if not items:
        return "none"
    return ", ".join(items[:count]) + (f", ... ({len(items) - count} more)" if len(items) > count else "")
