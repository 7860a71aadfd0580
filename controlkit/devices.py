"""Where models run and in which precision, from the names a user types ("cuda", "float16", "auto").

    >>> device_and_dtype()                 # on a machine with a GPU
    (device(type='cuda'), torch.float16)
    >>> device_and_dtype("cpu", "auto"), torch_dtype("bfloat16")
    ((device(type='cpu'), torch.float32), torch.bfloat16)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlkit.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: The floating-point types weights can be loaded or written in.
DTYPE_NAMES = ("float32", "float16", "bfloat16")
#: The dtype name that picks the device's usual precision.
AUTO = "auto"


def torch_dtype(name: str) -> torch.dtype:
    """'float16' -> torch.float16, for the names in `DTYPE_NAMES`; ConfigError naming them otherwise."""
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    import torch

    return getattr(torch, name)


def device_and_dtype(device: str | None = None, dtype: str = AUTO) -> tuple[torch.device, torch.dtype]:
    """The device to run on (given, else cuda when available, else cpu) and the weights' dtype.

    Args:
        device: a torch device string ("cuda", "cuda:1", "cpu", ...) or None to choose.
        dtype: a name of `DTYPE_NAMES`, or "auto": float16 on CUDA (half the memory, the speed of its tensor
            cores), float32 elsewhere (CPU half precision is slow and imprecise).
    """
    import torch

    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == AUTO:
        return chosen, torch.float16 if chosen.type == "cuda" else torch.float32
    return chosen, torch_dtype(dtype)
