"""Converting a ControlNet between formats: any readable checkpoint in, a diffusers folder or one original-format
(A1111/ComfyUI) .safetensors file out, with its condition metadata kept or updated.

    >>> from controlkit.conversion import convert_controlnet
    >>> result = convert_controlnet("control_v11p_sd15_canny.pth", "models/", original=True, base="SD1.x")
    >>> result.path, result.tensor_count, result.dtype
    (PosixPath('models/control_v11p_sd15_canny.safetensors'), 340, 'float32')
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from controlkit.controlnet import ConditionMetadata


@dataclass(frozen=True)
class Converted:
    """What `convert_controlnet` wrote: the folder or file, its tensors, their dtype, the metadata stored."""

    path: Path
    tensor_count: int
    dtype: str
    metadata: ConditionMetadata


def conversion_target(
    source: str | os.PathLike, destination: str | os.PathLike, *, original: bool, overwrite: bool = False
) -> Path:
    """Where a conversion writes: an original-format destination that is a folder gets the file
    `<source name>.safetensors` inside it.

    Raises:
        ConfigError: an original-format path not ending in .safetensors, an existing file or non-empty folder
            without `overwrite`, or a diffusers destination that is a file.
    """
    source, target = Path(source), Path(destination)
    if original and target.is_dir():
        target = target / f"{source.name.split('.')[0]}.safetensors"
    if original and target.suffix.lower() != ".safetensors":
        raise ConfigError(f"{target}: the original format is one file; give a path ending in .safetensors")
    exists = target.is_file() or (target.is_dir() and any(target.iterdir()))
    if exists and not overwrite:
        raise ConfigError(f"{target} already exists; pass --overwrite to replace it")
    if not original and target.is_file():
        raise ConfigError(f"{target} is a file; --to diffusers writes a folder")
    return target


def convert_controlnet(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    original: bool = False,
    torch_dtype: torch.dtype | None = None,
    condition: str | None = None,
    preprocessor: str | None = None,
    preprocessor_params: dict[str, Any] | None = None,
    base: str | None = None,
    overwrite: bool = False,
) -> Converted:
    """Read the ControlNet at `source` and write it to `destination` (see `conversion_target`).

    Args:
        source: a diffusers folder or a .safetensors/.pth/.ckpt file (pickles read without running code).
        destination: a folder (diffusers), or a .safetensors file or a folder to put one in (original).
        original: write the original key layout (`control_model.*`) in one file.
        torch_dtype: the tensors' type in the output; None copies them bit for bit.
        condition, preprocessor, base: metadata to record instead of the stored values (None keeps them).
        preprocessor_params: parameters to record over the stored ones.
        overwrite: replace an existing destination.
    """
    from controlkit.checkpoint import load_controlnet, save_controlnet

    target = conversion_target(source, destination, original=original, overwrite=overwrite)  # before loading
    controlnet, metadata = load_controlnet(source, torch_dtype=torch_dtype)
    updates = {"condition": condition, "preprocessor": preprocessor, "base": base}
    metadata = replace(metadata, **{key: value for key, value in updates.items() if value is not None})
    if preprocessor_params:
        metadata = replace(metadata, preprocessor_params={**metadata.preprocessor_params, **preprocessor_params})
    written = save_controlnet(controlnet, target, metadata, original=original)
    dtype = str(next(controlnet.parameters()).dtype).replace("torch.", "")
    return Converted(path=written, tensor_count=len(controlnet.state_dict()), dtype=dtype, metadata=metadata)
