"""Networks of the learned preprocessors, and how their weight files are read into them.

Importing the network modules (`hed`, `pidinet`, `lineart_nets`) imports torch, so the preprocessors import
them inside the functions that need them. Files are read by `controlkit.safe_load` (recognised by content;
pickles only through `torch.load(weights_only=True)`), then checked key by key against the network.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from controlkit.errors import CheckpointError

if TYPE_CHECKING:
    import torch

_SHOWN_KEYS = 6


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weight file as a flat state dict on the CPU.

    Accepts safetensors or a PyTorch file holding a state dict, plain or wrapped as {"state_dict": ...}; the
    `module.` prefix that DataParallel training leaves on every name is removed.

    Raises:
        UnsafeCheckpointError: a pickle that `weights_only=True` refuses (it would run code).
        CheckpointError: anything that is not a readable state dict of tensors.
    """
    from controlkit.safe_load import read_tensors

    return {key.removeprefix("module."): value for key, value in read_tensors(path).tensors.items()}


def load_state_dict_into(network: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str,
                         path: str | os.PathLike) -> None:
    """Load `state` with strict key and shape checks (missing BatchNorm step counters are zeros); a mismatch
    raises one line that lists the keys.

    Raises:
        CheckpointError: missing keys, unexpected keys or shape mismatches, with the first few of each.
    """
    import torch

    expected = network.state_dict()
    # BatchNorm step counters play no part in inference: files without them (written before PyTorch 0.4.1, or
    # saved without buffers) are still complete.
    state = {**{key: torch.zeros_like(value) for key, value in expected.items()
                if key.endswith(".num_batches_tracked") and key not in state}, **state}
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


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN_KEYS])
    return f"{shown} (+{len(items) - _SHOWN_KEYS} more)" if len(items) > _SHOWN_KEYS else shown
