"""The one way controlkit builds and reads diffusers' Stable Diffusion pipeline objects: `load_base` and the
folder reader behind it, `pipeline_from_components`, and the settings a base folder records for generation.

Every pipeline is built without a safety checker or its feature extractor: the bases controlkit loads (diffusers
folders, single files, the tiny and demo models) often ship none, and a checker decides nothing about control.
Every component is loaded in one dtype (float32 unless asked): transformers keeps a text encoder in its stored
dtype, and a float16 text encoder beside a float32 U-Net cannot run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.base_families import SD, BaseFamily, family_of, family_of_class
from controlkit.control import check_integer, check_number
from controlkit.errors import CheckpointError, ConfigError, ControlkitError, WeightsNotFoundError, first_line
from controlkit.sampling import MAX_STEPS

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

#: The options of every SD1.x/SD2.x pipeline controlkit builds (`controlkit.base_families` has each family's).
PIPELINE_OPTIONS: Mapping[str, Any] = SD.options
#: The components of an SD1.x/SD2.x base (an SDXL base adds text_encoder_2 and tokenizer_2: `SDXL.components`).
BASE_COMPONENTS = SD.components
#: The file beside a base's model_index.json that records the settings it was made for:
#: {"generation": {"steps": 20, "guidance_scale": 2.0}}; `load_base` keeps them on the pipeline it returns (in
#: `SETTINGS_ATTRIBUTE`) and `controlkit.pipeline.generate` takes its defaults from them.
SETTINGS_FILE = "controlkit.json"
SETTINGS_ATTRIBUTE = "controlkit_settings"
SETTINGS_KEYS = ("steps", "guidance_scale")


def pipeline_from_components(
    components: Mapping[str, Any], *, img2img: bool = False, inpaint: bool = False,
    settings: Mapping[str, Any] | None = None,
) -> Any:
    """A text-to-image (img2img, inpaint) pipeline of the components' family (`controlkit.base_families.family_of`)
    over ready modules (the family's `components`; other keys are ignored). Cheap: the modules are shared, not
    copied. `settings`: the family's pipeline config values (`BaseFamily.config_keys`) to keep from a base."""
    import diffusers

    family = family_of(components)
    cls = getattr(diffusers, family.inpaint if inpaint else family.img2img if img2img else family.text2img)
    return cls(**{name: components[name] for name in family.components}, **family.options, **(settings or {}))


def load_pipeline_folder(folder: str | os.PathLike, **options: Any) -> Any:
    """A diffusers Stable Diffusion (XL) folder read offline (safetensors only), every component it reads in one
    dtype (float32 unless `options` give `dtype`); `options` go to `from_pretrained` (components to use instead
    of the folder's, which are taken as they are). The family comes from its model_index.json."""
    import torch

    if "dtype" not in options and "torch_dtype" not in options:
        options.update(_dtype_option(torch.float32))
    family = folder_family(folder)
    return _pipeline_class(family).from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                   **family.options, **options)


def folder_family(folder: str | os.PathLike) -> BaseFamily:
    """The family a diffusers folder's model_index.json names (SD when it names another pipeline)."""
    from controlkit.json_files import read_json_file

    index = read_json_file(Path(folder) / "model_index.json")
    return family_of_class(index.get("_class_name"))


def _pipeline_class(family: BaseFamily) -> Any:
    import diffusers

    return getattr(diffusers, family.text2img)


def recorded_settings(folder: str | os.PathLike) -> dict[str, Any]:
    """The generation settings a base folder records in its `SETTINGS_FILE` ({} when it has none), checked:
    {"steps": an integer in 1..999, "guidance_scale": a finite number >= 0}, either key optional."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        block = json.loads(path.read_text(encoding="utf-8")).get("generation", {})
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: not a JSON object ({first_line(error)}); fix or delete it") from None
    if not isinstance(block, dict) or set(block) - set(SETTINGS_KEYS):
        raise ConfigError(f"{path}: \"generation\" may hold only {', '.join(SETTINGS_KEYS)}, got {block!r}")
    if "steps" in block:
        check_integer(block["steps"], f"{path}: `steps`", 1, MAX_STEPS)
    if "guidance_scale" in block:
        check_number(block["guidance_scale"], f"{path}: `guidance_scale`", 0.0)
    return dict(block)


def write_recorded_settings(folder: str | os.PathLike, **settings: Any) -> Path:
    """Record `settings` (`SETTINGS_KEYS`) in FOLDER/`SETTINGS_FILE`, atomically; returns the file's path."""
    from controlkit.files import write_bytes_atomic

    path = Path(folder) / SETTINGS_FILE
    write_bytes_atomic(path, (json.dumps({"generation": settings}, indent=2, sort_keys=True) + "\n").encode())
    recorded_settings(folder)  # what was written reads back in range
    return path


def quiet_loading() -> None:
    """No per-component progress bars while loading (the command prints one summary line instead), and no
    transformers notices about optional image processors that Stable Diffusion's safety checker would use."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def load_base(
    source: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    config: str | os.PathLike | None = None,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion base (SD1.x, SD2.x or SDXL) offline, every component in one dtype.

    Args:
        source: "demo" (the shipped demo base, `controlkit.weights.resolve_model_name`), a diffusers folder
            (model_index.json, safetensors weights), a single-file checkpoint (.safetensors, or .ckpt read with
            torch's weights-only loader), or a hub id that is in the local cache. The family comes from the
            folder's model_index.json (a `StableDiffusionXLPipeline` is SDXL), from `config`'s for a single file,
            else from the file's keys (SDXL's second text encoder).
        torch_dtype: weights dtype of every component (default float32, whatever the files store: transformers
            would keep a float16 text encoder in float16 beside a float32 U-Net, which cannot run together).
        device: where to put it (default: stays on the CPU); checked to exist before anything is loaded.
        config: for a single file, a local diffusers folder of the same architecture whose config files
            diffusers uses (needed offline unless the hub cache already has the model's config).

    A folder's `SETTINGS_FILE` (the steps and guidance it was made for) is kept on the pipeline, and `generate`
    uses it as its defaults.

    Raises:
        WeightsNotFoundError: nothing at `source`, or its weights are missing.
        CheckpointError: the files are there but are not a loadable Stable Diffusion base.
        ConfigError: `device` does not exist here, or the folder's settings file is out of range.
    """
    import torch

    from controlkit.devices import usable_device
    from controlkit.weights import looks_like_hub_id, resolve_model_name

    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"`torch_dtype` must be a torch dtype such as torch.float16, got {torch_dtype!r}")
    source = resolve_model_name(source, "base")
    target = None if device is None else usable_device(device)
    dtype_option = _dtype_option(torch.float32 if torch_dtype is None else torch_dtype)
    path = Path(source).expanduser()
    settings: dict[str, Any] = {}
    try:
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise WeightsNotFoundError(
                    f"base model {source}: not a diffusers folder (no model_index.json); pass a folder written by "
                    "save_pretrained, or a single .safetensors checkpoint"
                )
            settings = recorded_settings(path)
            base = load_pipeline_folder(path, **dtype_option)
        elif path.is_file():
            base = _load_single_file(path, config, dtype_option)
        elif looks_like_hub_id(str(source)):
            from diffusers import DiffusionPipeline

            family = family_of_class(DiffusionPipeline.load_config(str(source)).get("_class_name"))
            base = _pipeline_class(family).from_pretrained(str(source), use_safetensors=True, **family.options,
                                                           **dtype_option)
        else:
            raise WeightsNotFoundError(
                f"base model {source}: no such file or folder; pass \"demo\", a diffusers folder or a single-file "
                "checkpoint"
            )
    except ControlkitError:
        raise
    except OSError as error:
        raise WeightsNotFoundError(f"base model {source}: weights missing ({first_line(error)})") from None
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"base model {source}: not a loadable Stable Diffusion base ({first_line(error)})"
        ) from None
    setattr(base, SETTINGS_ATTRIBUTE, settings)
    return base.to(target) if target is not None else base


def _dtype_option(dtype: torch.dtype | None) -> dict[str, Any]:
    """diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name now warns); older releases know only the old."""
    if dtype is None:
        return {}
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def _load_single_file(path: Path, config: str | os.PathLike | None, options: dict[str, Any]) -> Any:
    from controlkit.safe_load import SAFETENSORS, sniff_format

    kind = sniff_format(path)  # refuses LFS pointers, HTML pages, empty files by content
    if (kind == SAFETENSORS) != (path.suffix.lower() == ".safetensors"):
        raise CheckpointError(f"base model {path}: the file is {kind} but named {path.name}; fix its extension")
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise WeightsNotFoundError(f"`config` {config}: not a diffusers folder (no model_index.json)")
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    family = folder_family(config) if config is not None else _single_file_family(path, kind)
    try:
        base = _pipeline_class(family).from_single_file(
            str(path), config=None if config is None else str(config), local_files_only=True, **family.options,
            **options,
        )
    except OSError as error:
        if config is None:
            raise WeightsNotFoundError(
                f"base model {path}: diffusers needs this model's config files to read a single file offline; "
                f"pass a local diffusers folder of the same architecture ({family.name}) as `config` (--base-config)"
            ) from None
        raise error
    except SingleFileComponentError as error:  # a checkpoint without the text encoder, VAE or U-Net
        raise CheckpointError(f"base model {path}: {first_line(error)}") from None
    # diffusers leaves a component it found no weights for on the meta device, without a word
    empty = [name for name in family.components if hasattr(getattr(base, name, None), "parameters")
             and any(parameter.is_meta for parameter in getattr(base, name).parameters())]
    if empty:
        raise CheckpointError(f"base model {path}: the file has no weights for {', '.join(empty)}; pass a complete "
                              f"{family.name} checkpoint (or one whose config matches `config`)")
    return base


def _single_file_family(path: Path, kind: str) -> BaseFamily:
    """The family of an original single-file checkpoint by its key names (safetensors: the header only); a
    pickle is taken as SD1.x/SD2.x (pass `config` for an SDXL one)."""
    from controlkit.base_families import BASE_FAMILIES
    from controlkit.safe_load import SAFETENSORS

    if kind != SAFETENSORS:
        return SD
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    for family in BASE_FAMILIES:
        if family.single_file_marker and any(key.startswith(family.single_file_marker) for key in keys):
            return family
    return SD
