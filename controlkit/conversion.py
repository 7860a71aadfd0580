"""Converting a ControlNet between formats: any readable checkpoint in, a diffusers folder or one original-format
(A1111/ComfyUI) .safetensors file out, with its condition metadata kept or updated.

An original-format file is written for A1111 and ComfyUI, so it is written the way they read it (see
`controlkit.original_format`): a layout they cannot build is refused unless `force`, a global-pooling (shuffle)
ControlNet gets a name ending in `_shuffle` (the only way they learn it), and a BGR ControlNet's hint encoder is
flipped to the RGB they feed. `Converted.notes` says what was done.

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
    """What `convert_controlnet` wrote: the folder or file, its tensors, their dtype, the metadata stored, whether
    A1111/ComfyUI can read it ('yes (SD1.x layout)' or 'no: custom layout (...)') and notes on what was adapted for
    them (original format only)."""

    path: Path
    tensor_count: int
    dtype: str
    metadata: ConditionMetadata
    clients: str = ""
    notes: tuple[str, ...] = ()


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
    force: bool = False,
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
        force: write an original-format file even for a layout A1111 and ComfyUI cannot load.

    Raises:
        ConfigError: see `conversion_target`; for the original format also a layout the clients cannot load
            (without `force`), a ControlNet-Union (it has no original layout, even with `force`), and a file name
            that would give them the wrong global pooling. Nothing is written.
    """
    from controlkit.checkpoint import load_controlnet, save_controlnet
    from controlkit.original_format import client_support, is_bgr
    from controlkit.union_checkpoint import refuse_original

    target = conversion_target(source, destination, original=original, overwrite=overwrite)  # before loading
    controlnet, metadata = load_controlnet(source, torch_dtype=torch_dtype)
    updates = {"condition": condition, "preprocessor": preprocessor, "base": base}
    metadata = replace(metadata, **{key: value for key, value in updates.items() if value is not None})
    if preprocessor_params:
        metadata = replace(metadata, preprocessor_params={**metadata.preprocessor_params, **preprocessor_params})
    support = client_support(controlnet.config)
    notes: list[str] = []
    if original:
        refuse_original(controlnet, str(source))
        if not support.readable and not force:
            raise ConfigError(f"{source}: readable by A1111/ComfyUI: {support.line}; they cannot load it as an "
                              "original-format file. Pass --force to write it anyway, or use --to diffusers")
        pooled = metadata.global_pooling or bool(controlnet.config.get("global_pool_conditions"))
        target = _client_name(target, pooled, derived=Path(destination).is_dir(), overwrite=overwrite)
        if pooled:
            notes.append("global pooling: on (the name ends in _shuffle, as A1111 and ComfyUI require)")
        if is_bgr(controlnet.config):
            notes.append("hint encoder flipped from BGR to the RGB the clients feed")
    written = save_controlnet(controlnet, target, metadata, original=original)
    dtype = str(next(controlnet.parameters()).dtype).replace("torch.", "")
    return Converted(path=written, tensor_count=len(controlnet.state_dict()), dtype=dtype, metadata=metadata,
                     clients=support.line, notes=tuple(notes))


def _client_name(target: Path, pooled: bool, *, derived: bool, overwrite: bool) -> Path:
    """The original-format file name, such that A1111 and ComfyUI get the global pooling right: a name this module
    chose gets `_shuffle` added for a pooled ControlNet; a name the caller gave that would mislead them is refused."""
    from controlkit.original_format import pooling_name_problem

    problem = pooling_name_problem(target, pooled)
    if problem is None:
        return target
    if not (derived and pooled):
        raise ConfigError(f"{problem} (nothing was written)")
    renamed = target.with_name(f"{target.name.rsplit('.', 1)[0]}_shuffle.safetensors")
    if renamed.exists() and not overwrite:
        raise ConfigError(f"{renamed} already exists; pass --overwrite to replace it")
    return renamed
