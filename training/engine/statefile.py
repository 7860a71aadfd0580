"""Nested training state (optimizer, EMA, scheduler, RNG) as safetensors + JSON, never pickle.

`write_state(path_stem, obj)` splits any nesting of dicts, lists, tuples, tensors, numpy arrays and plain values into
`<stem>.safetensors` (every tensor, under its path in the nesting) and `<stem>.json` (the structure, with
placeholders for the tensors). `read_state(path_stem)` puts it back together with the same types, so
`optimizer.load_state_dict(read_state(...))` restores an optimizer bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_TENSOR, _ARRAY, _TUPLE, _PAIRS = "__tensor__", "__ndarray__", "__tuple__", "__pairs__"


def split_state(obj: Any, tensors: dict[str, Any], path: str = "s") -> Any:
    """The JSON-able structure of `obj`; its tensors are moved into `tensors` (keyed by their path)."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {_TENSOR: path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind == "u" else obj.copy())
        return {_ARRAY: path, "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {_TUPLE: [split_state(item, tensors, f"{path}.{index}") for index, item in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_state(item, tensors, f"{path}.{index}") for index, item in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in obj):
            return {key: split_state(value, tensors, f"{path}.{key}") for key, value in obj.items()}
        return {_PAIRS: [[key, split_state(value, tensors, f"{path}.{key}")] for key, value in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a training state file")


def join_state(structure: Any, tensors: dict[str, Any]) -> Any:
    """The inverse of `split_state`."""
    import numpy as np

    if isinstance(structure, list):
        return [join_state(item, tensors) for item in structure]
    if isinstance(structure, dict):
        if _TENSOR in structure:
            return tensors[structure[_TENSOR]]
        if _ARRAY in structure:
            return tensors[structure[_ARRAY]].numpy().astype(np.dtype(structure["dtype"]))
        if _TUPLE in structure:
            return tuple(join_state(item, tensors) for item in structure[_TUPLE])
        if _PAIRS in structure:
            return {key: join_state(value, tensors) for key, value in structure[_PAIRS]}
        return {key: join_state(value, tensors) for key, value in structure.items()}
    return structure


def write_state(stem: str | Path, obj: Any) -> list[Path]:
    """Write `obj` as `<stem>.json` (+ `<stem>.safetensors` when it holds tensors), flushed to disk.

    Returns the written files. Raises whatever the file system raises (OSError, safetensors' error).
    """
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    structure = split_state(obj, tensors)
    stem = Path(stem)
    written = []
    if tensors:
        tensor_path = stem.with_name(stem.name + ".safetensors")
        save_file(tensors, str(tensor_path))
        written.append(tensor_path)
    json_path = stem.with_name(stem.name + ".json")
    json_path.write_text(json.dumps(structure, allow_nan=True))
    written.append(json_path)
    for path in written:
        fsync_file(path)
    return written


def read_state(stem: str | Path) -> Any:
    """Read what `write_state(stem, obj)` wrote."""
    from safetensors.torch import load_file

    stem = Path(stem)
    structure = json.loads(stem.with_name(stem.name + ".json").read_text())
    tensor_path = stem.with_name(stem.name + ".safetensors")
    tensors = load_file(str(tensor_path)) if tensor_path.exists() else {}
    return join_state(structure, tensors)


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the device (a rename alone does not order data before metadata)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (new files, renames) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
