"""Loading, saving and inspecting ControlNet checkpoints in every format users have.

Formats read (recognised by content, see `safe_load`):
- a diffusers folder (config.json + diffusion_pytorch_model.safetensors, or a pipeline folder's controlnet/), of a
  `ControlNetModel` or a `ControlNetUnionModel` (see `union_checkpoint`);
- a diffusers single .safetensors file (a Union one recognised by its keys);
- a Control-LoRA file (Stability's SDXL control-lora-*.safetensors), loaded onto the base's U-Net (`control_lora`);
- the original lllyasviel format: ControlNet 1.0 full-model files (`control_model.*` plus the whole SD model)
  and 1.1 control-only files (`control_model.*` or bare keys), as .safetensors or .pth/.ckpt;
- a hub id, only when the caller passes one explicitly.
Formats written: a diffusers folder, or one original-format .safetensors file (what A1111 and ComfyUI load; a
Union model has no original layout, and a Control-LoRA is written as the full ControlNet it loads as).
Condition metadata is written into the safetensors header and into config.json; original files also carry the
diffusers config in their header, so our own exports load back exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit import union_checkpoint as union
from controlkit.control_lora import control_lora_info, is_control_lora, load_control_lora
from controlkit.controlnet import (
    CONFIG_METADATA_KEY,
    METADATA_KEY,
    ConditionMetadata,
    base_family,
    check_fits,
    guess_metadata,
    infer_config,
)
from controlkit.errors import CheckpointError, ConfigError, WeightsNotFoundError, first_line, preview
from controlkit.files import atomic_path, write_bytes_atomic
from controlkit.json_files import parse_json_object, read_json_file
from controlkit.model_config import check_model_config
from controlkit.original_format import (CONTROL_PREFIX, OriginalLayout, client_support, from_original, is_bgr,
                                        to_original)
from controlkit.safe_load import RawCheckpoint, read_sharded, read_tensors

if TYPE_CHECKING:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

DIFFUSERS_FOLDER = "diffusers folder"
DIFFUSERS_FILE = "diffusers single file"
ORIGINAL_FULL = "original ControlNet 1.0 (ControlNet + Stable Diffusion)"
ORIGINAL = "original (ControlNet only)"

#: Header metadata key of the diffusers config inside original-format files written here.
CONFIG_KEY = "controlkit_config"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
#: Weights files of a diffusers folder, in order of preference (pickles go through the weights-only reader).
_FOLDER_WEIGHTS = (WEIGHTS_NAME, "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin",
                   "diffusion_pytorch_model.fp16.bin")
#: Key prefixes of the Stable Diffusion model inside full checkpoints; never loaded as ControlNet weights.
_SD_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.")


@dataclass
class ReadCheckpoint:
    """A checkpoint's tensors under diffusers names, with its config and metadata (nothing instantiated).

    Attributes:
        path: the file or folder read.
        format: DIFFUSERS_FOLDER, DIFFUSERS_FILE, ORIGINAL_FULL or ORIGINAL.
        state_dict: diffusers key -> tensor (CPU, stored dtype).
        config: the model's config (diffusers keys).
        config_stored: True if the config came with the file, False if it was inferred from the weights.
        metadata: the condition metadata (stored, else guessed from the file name, else empty).
        metadata_source: 'stored', 'file name' or 'none'.
        model_class: 'ControlNetModel' or 'ControlNetUnionModel'.
    """

    path: Path
    format: str
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    config_stored: bool
    metadata: ConditionMetadata
    metadata_source: str
    model_class: str = union.CONTROLNET


@dataclass
class CheckpointInfo:
    """What `controlkit info` reports about a checkpoint."""

    path: Path
    format: str
    metadata: ConditionMetadata
    metadata_source: str
    parameter_count: int
    tensor_count: int
    dtype: str
    family: str
    cross_attention_dim: int | None
    conditioning_channels: int
    config_stored: bool
    clients: str


def load_controlnet(
    source: str | os.PathLike,
    *,
    unet: UNet2DConditionModel | None = None,
    torch_dtype: torch.dtype | None = None,
) -> tuple[ControlNetModel, ConditionMetadata]:
    """A ready `ControlNetModel` (or `ControlNetUnionModel`, eval mode) and its condition metadata from any
    supported format.

    With `unet`, the model is on the U-Net's device in its dtype (unless `torch_dtype` says otherwise): ready for
    `controlkit.pipeline.generate`, which never moves a ControlNet itself. Without, it is on the CPU.

    Args:
        source: a diffusers folder, a .safetensors/.pth/.ckpt file, or a hub id 'org/name'.
        unet: the U-Net it will run with. The ControlNet must fit its encoder (same shapes), for files without
            a config the attention settings are taken from it, and its device (unless "meta") is the model's. A
            Control-LoRA needs it: its LoRA pairs are fused into a copy of this U-Net's encoder (not modified).
        torch_dtype: dtype of the returned model; default: the U-Net's dtype if given, else the stored dtype.

    Raises:
        WeightsNotFoundError: nothing at `source`.
        CheckpointError: not a ControlNet, damaged, keys or shapes that do not match, non-finite values, or a
            checkpoint for a different base than `unet`.
        ConfigError: a Control-LoRA without `unet`.
        UnsafeCheckpointError: a pickle that would run code.
    """
    path = _resolve(source)
    raw = None if path.is_dir() else _read_raw(path)
    if raw is not None and is_control_lora(raw.tensors):
        return load_control_lora(path, raw.tensors, raw.metadata, unet=unet, torch_dtype=torch_dtype)
    read = _checked(_read_folder(path) if raw is None else _read_file(path, raw))
    if unet is not None:
        check_fits(read.state_dict, read.config, unet, name=f"{read.path}: checkpoint")
        if not read.config_stored:
            read = replace(read, config=union.config_from_unet(unet, read.config, read.model_class))
    dtype = torch_dtype or (unet.dtype if unet is not None else None)
    device = unet.device if unet is not None and unet.device.type != "meta" else None  # a meta U-Net: shapes only
    # place the tensors, not the model: ModelMixin.to warns about fp32-pinned modules
    read.state_dict = {key: _placed(value, device, dtype) for key, value in read.state_dict.items()}
    return _instantiate(read), read.metadata


def _placed(tensor: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` on `device` (None: where it is), in `dtype` if it is floating point (None: as stored); itself when
    nothing changes."""
    floating = dtype is not None and tensor.is_floating_point()
    return tensor.to(device=device or tensor.device, dtype=dtype if floating else tensor.dtype)


def read_checkpoint(source: str | os.PathLike) -> ReadCheckpoint:
    """Tensors (diffusers names), config and metadata of a ControlNet checkpoint, validated against the config.
    A Control-LoRA has no config of its own (it is read with its U-Net): CheckpointError saying so."""
    path = _resolve(source)
    if path.is_dir():
        return _checked(_read_folder(path))
    raw = _read_raw(path)
    if is_control_lora(raw.tensors):
        raise CheckpointError(f"{path} is a Control-LoRA, a ControlNet stored as changes to its base's U-Net; load "
                              "it with load_controlnet(path, unet=base.unet)")
    return _checked(_read_file(path, raw))


def _resolve(source: str | os.PathLike) -> Path:
    from controlkit.weights import resolve_model_name, resolve_weights

    source = resolve_model_name(source, "controlnet")  # demo:canny and the other short names
    return resolve_weights("ControlNet", source, hint="pass a diffusers folder or a .safetensors/.pth file")


def _read_raw(path: Path) -> RawCheckpoint:
    return read_tensors(path, keep=lambda key: not key.startswith(_SD_PREFIXES))


def _checked(read: ReadCheckpoint) -> ReadCheckpoint:
    if read.config.get("global_pool_conditions") and not read.metadata.global_pooling:
        read.metadata = replace(read.metadata, global_pooling=True, conditional_only=True)
    read.config["global_pool_conditions"] = read.metadata.global_pooling
    _check_against_config(read)
    _check_finite(read)
    return read


def _read_folder(path: Path) -> ReadCheckpoint:
    folder = path / "controlnet" if (path / "controlnet" / "config.json").is_file() else path
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsNotFoundError(f"{path} is a folder without config.json; pass a diffusers ControlNet folder "
                                   "or a weights file")
    config = read_json_file(config_path)
    model_class = union.model_class(config.get("_class_name"), str(config_path))
    check_model_config(config, str(config_path))  # before any tensor is read or any module built
    if model_class == union.UNION:
        union.check_union_config(config, str(config_path))
    state_dict, header = _read_folder_weights(folder)
    stored = config.get(CONFIG_METADATA_KEY) or config.get(METADATA_KEY)
    metadata = ConditionMetadata.from_dict(stored) if stored is not None else ConditionMetadata.from_metadata(header)
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != METADATA_KEY}
    return _with_metadata(folder, DIFFUSERS_FOLDER, state_dict, config, True, metadata, model_class)


def _read_folder_weights(folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        raw = read_sharded(index)
        return raw.tensors, raw.metadata
    for name in _FOLDER_WEIGHTS:
        if (folder / name).is_file():
            raw = read_tensors(folder / name)
            return raw.tensors, raw.metadata
    raise WeightsNotFoundError(
        f"{folder} has config.json but no weights ({WEIGHTS_NAME}); copy the weights file there"
    )


def _read_file(path: Path, raw: RawCheckpoint) -> ReadCheckpoint:
    stored_config = None
    if CONFIG_KEY in raw.metadata:
        stored_config = parse_json_object(raw.metadata[CONFIG_KEY], f"{path}: the stored config")
        check_model_config(stored_config, f"{path}: the stored config")
    keys = raw.tensors.keys()
    model_class = union.UNION if union.is_union_state(keys) else union.CONTROLNET
    if any(key.startswith((CONTROL_PREFIX, "input_hint_block.")) for key in keys):
        layout = OriginalLayout.from_config(stored_config) if stored_config else None
        # original files hold the hint encoder in RGB order, as A1111 and ComfyUI feed it (see original_format)
        state_dict = from_original(raw.tensors, layout, bgr=bool(stored_config) and is_bgr(stored_config))
        kind = ORIGINAL_FULL if raw.skipped else ORIGINAL
    elif "controlnet_cond_embedding.conv_in.weight" in keys:
        state_dict, kind = raw.tensors, DIFFUSERS_FILE
    elif raw.skipped:
        raise CheckpointError(f"{path} is a Stable Diffusion checkpoint without ControlNet weights; pass a "
                              "ControlNet file (control_*.safetensors/.pth or a diffusers ControlNet)")
    else:
        first_keys = ", ".join(key[:60] for key in sorted(keys)[:3])
        raise CheckpointError(f"{path} is not a ControlNet checkpoint (no conditioning encoder; keys start "
                              f"{first_keys})")
    config = stored_config
    if config is None:
        config = union.infer_union_fields(state_dict) if model_class == union.UNION else infer_config(state_dict)
        check_model_config(config, f"{path}: the config its weights imply")
    metadata = ConditionMetadata.from_metadata(raw.metadata)
    return _with_metadata(path, kind, state_dict, config, stored_config is not None, metadata, model_class)


def _with_metadata(path: Path, kind: str, state_dict: dict, config: dict, config_stored: bool,
                   metadata: ConditionMetadata | None, model_class: str) -> ReadCheckpoint:
    if metadata is not None:
        return ReadCheckpoint(path, kind, state_dict, config, config_stored, metadata, "stored", model_class)
    guessed = guess_metadata(path.name)
    source = "file name" if guessed.condition else "none"
    return ReadCheckpoint(path, kind, state_dict, config, config_stored, guessed, source, model_class)


def expected_shapes(config: dict[str, Any], model_class: str = union.CONTROLNET) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a ControlNetModel (or ControlNetUnionModel) with this config, built on the meta device
    (no memory)."""
    model = union.build_empty(config, model_class)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _check_against_config(read: ReadCheckpoint) -> None:
    """Key count, names and every tensor's shape against the model the config describes."""
    expected = expected_shapes(read.config, read.model_class)
    found = read.state_dict
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{read.path}: {len(found)} tensors do not match the {len(expected)} of this ControlNet config: "
            f"{len(missing)} missing ({preview(missing)}), {len(unexpected)} unexpected ({preview(unexpected)})"
        )
    wrong = [key for key in expected if tuple(found[key].shape) != expected[key]]
    if wrong:
        key = wrong[0]
        raise CheckpointError(
            f"{read.path}: {len(wrong)} tensors have the wrong shape, first {key}: "
            f"{tuple(found[key].shape)} in the file, {expected[key]} in the model"
        )


def _check_finite(read: ReadCheckpoint) -> None:
    import torch

    def finite(value: torch.Tensor) -> bool:
        # a float64 sum is one cheap pass and is non-finite whenever any element is; only then look closer
        return bool(torch.isfinite(value.sum(dtype=torch.float64))) or bool(torch.isfinite(value).all())

    bad = [key for key, value in read.state_dict.items() if value.is_floating_point() and not finite(value)]
    if bad:
        raise CheckpointError(f"{read.path}: {len(bad)} tensors hold NaN or Inf values ({preview(bad)}); "
                              "the checkpoint is damaged")


def empty_base_unet(base: str | os.PathLike) -> UNet2DConditionModel:
    """The U-Net of a diffusers pipeline folder (its unet/) or U-Net folder, built from its config.json on the meta
    device: shapes for `controlkit.controlnet.check_fits` without reading any weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    folder = Path(base)
    config_path = next((p for p in (folder / "unet" / "config.json", folder / "config.json") if p.is_file()), None)
    if config_path is None:
        raise WeightsNotFoundError(f"{base}: no unet/config.json or config.json; pass a diffusers pipeline folder")
    config = read_json_file(config_path)
    check_model_config(config, str(config_path), model="U-Net")
    try:
        with init_empty_weights():
            return UNet2DConditionModel.from_config(config)
    except Exception as error:  # diffusers raises many kinds for values it cannot build (within the bounds)
        raise CheckpointError(f"{config_path} is not a U-Net config ({first_line(error)[:200]})") from None


def _instantiate(read: ReadCheckpoint) -> ControlNetModel:
    model = union.build_empty(read.config, read.model_class)
    try:
        model.load_state_dict(read.state_dict, strict=True, assign=True)
    except RuntimeError as error:  # keys and shapes were checked; this is a config/U-Net disagreement
        raise CheckpointError(f"{read.path}: {str(error).splitlines()[0]}") from None
    return model.eval()


def save_controlnet(
    controlnet: ControlNetModel,
    directory: str | os.PathLike,
    metadata: ConditionMetadata,
    *,
    original: bool = False,
) -> Path:
    """Write a ControlNet with its condition metadata; returns the folder or file written.

    Args:
        directory: the diffusers folder to write (config.json + diffusion_pytorch_model.safetensors); with
            `original=True`, the path of the single .safetensors file to write.
        original: write the original key format (`control_model.*`) that A1111 and ComfyUI load (a BGR
            ControlNet's first hint convolution flipped to the RGB they feed; see `original_format`). The name is
            the caller's: `conversion.convert_controlnet` also checks it carries global pooling for them. A
            ControlNet-Union has no original layout: ConfigError.

    Files are written under a temporary name and renamed, so an interrupted save never leaves a partial file.
    """
    if original:
        union.refuse_original(controlnet, str(directory))
    config = {k: v for k, v in controlnet.config.items() if not k.startswith("_")}
    if config.get("global_pool_conditions") or metadata.global_pooling:  # the model's setting wins
        # pooled outputs act on the conditional side only (1.1 shuffle), as reading one records
        metadata = replace(metadata, global_pooling=True, conditional_only=True)
    config["global_pool_conditions"] = metadata.global_pooling
    state_dict = {key: value.detach().contiguous() for key, value in controlnet.state_dict().items()}
    header = {"format": "pt", **metadata.to_metadata()}
    target = Path(directory)
    if original:
        if target.suffix.lower() != ".safetensors":
            raise ConfigError(f"{target}: the original format is one file; give a path ending in .safetensors")
        header[CONFIG_KEY] = json.dumps(config)
        _write_safetensors(to_original(state_dict, config), target, header)
        return target
    target.mkdir(parents=True, exist_ok=True)
    class_name = union.UNION if union.is_union(controlnet) else union.CONTROLNET
    full_config = {"_class_name": class_name, **config, CONFIG_METADATA_KEY: metadata.to_dict()}
    write_bytes_atomic(target / "config.json", json.dumps(full_config, indent=2).encode("utf-8"))
    _write_safetensors(state_dict, target / WEIGHTS_NAME, header)
    return target


def _write_safetensors(tensors: dict[str, Any], path: Path, header: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=header)


def inspect_checkpoint(source: str | os.PathLike, *, unet: UNet2DConditionModel | None = None) -> CheckpointInfo:
    """Format, metadata, size and base family of a checkpoint, after the same validation as loading (including
    the fit to `unet` when one is given, e.g. from `empty_base_unet`)."""
    path = _resolve(source)
    raw = None if path.is_dir() else _read_raw(path)
    if raw is not None and is_control_lora(raw.tensors):
        return CheckpointInfo(path=path, **control_lora_info(path, raw.tensors, raw.metadata, unet))
    read = _checked(_read_folder(path) if raw is None else _read_file(path, raw))
    if unet is not None:
        check_fits(read.state_dict, read.config, unet, name=f"{read.path}: checkpoint")
    dtypes = sorted({str(value.dtype).replace("torch.", "") for value in read.state_dict.values()})
    kind = f"{read.format}, {union.describe(read.config)}" if read.model_class == union.UNION else read.format
    return CheckpointInfo(
        path=read.path,
        format=kind,
        metadata=read.metadata,
        metadata_source=read.metadata_source,
        parameter_count=sum(value.numel() for value in read.state_dict.values()),
        tensor_count=len(read.state_dict),
        dtype="/".join(dtypes),
        family=base_family(read.config),
        cross_attention_dim=read.config.get("cross_attention_dim"),
        conditioning_channels=int(read.config.get("conditioning_channels", 3)),
        config_stored=read.config_stored,
        clients=client_support(read.config).line,
    )
