"""Networks of the learned preprocessors, and the one way their weight files are read.

Importing the network modules (`hed`, `pidinet`, `lineart_nets`) imports torch, so the preprocessors import
them inside the functions that need them. Weight files are recognised by content, not by extension:
safetensors, or a PyTorch pickle (zip or legacy format) that is read only with `torch.load(weights_only=True)`;
a pickle that needs code execution is refused.
"""

from __future__ import annotations

import os
import pickle
from typing import TYPE_CHECKING

from controlkit.errors import CheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:
    import torch

_ZIP_MAGIC = b"PK\x03\x04"
_SHOWN_KEYS = 6


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weight file as a flat state dict on the CPU.

    Accepts safetensors, a plain state dict, or one wrapped as {"state_dict": ...}; a `module.` prefix left by
    DataParallel training is removed.

    Raises:
        UnsafeCheckpointError: a pickle that `weights_only=True` refuses (it would run code).
        CheckpointError: anything else that is not a state dict of tensors.
    """
    import torch

    with open(path, "rb") as file:
        head = file.read(9)
    if _is_safetensors(head):
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80":
        state = _torch_load(path)
    else:
        raise CheckpointError(f"{path}: not a safetensors or PyTorch weight file")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_state_dict_into(network: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str,
                         path: str | os.PathLike) -> None:
    """Load `state` with strict key and shape checks; a mismatch raises one line that lists the keys.

    Raises:
        CheckpointError: missing keys, unexpected keys or shape mismatches, with the first few of each.
    """
    expected = network.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(key for key in set(expected) & set(state) if expected[key].shape != state[key].shape)
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)}")
    if mismatched:
        shapes = [f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}" for key in mismatched]
        problems.append(f"wrong shapes {_some(shapes)}")
    if problems:
        raise CheckpointError(f"{path} is not a {what} checkpoint: {'; '.join(problems)}")
    network.load_state_dict(state, strict=True)


def _torch_load(path: str | os.PathLike) -> object:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeCheckpointError(
            f"{path}: this pickle needs code execution to load and was not loaded; convert it to safetensors "
            "where it came from, or use a file that holds tensors only"
        ) from None
    except (RuntimeError, EOFError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: unreadable PyTorch file ({first_line})") from None


def _is_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN_KEYS])
    return f"{shown} (+{len(items) - _SHOWN_KEYS} more)" if len(items) > _SHOWN_KEYS else shown
