"""The final model of a run, in the formats `controlkit generate` loads.

- kind 'controlnet': `OUTPUT/controlnet/` (diffusers folder with the condition metadata, via
  `controlkit.checkpoint.save_controlnet`; its `base` names the base family, "SDXL" for an SDXL base), plus
  `OUTPUT/<name>.safetensors` in the original key format with `checkpoint.save_original`. With
  `model.unlock_decoder` the U-Net's decoder changed too, so `OUTPUT/base/` holds the base with that decoder:
  generate with `--base OUTPUT/base --controlnet NAME=OUTPUT/controlnet`.
- kind 'base': `OUTPUT/model/`, a diffusers Stable Diffusion folder (the trained U-Net, the text encoder trained
  or as it was, the base's VAE, tokenizer and scheduler).

With EMA on and `ema.use_for_output`, the averaged weights are written. Only the main process writes.

Every model folder is written whole or not at all (`model_folder`): into a temporary folder beside it, then
renamed into place, so a full disk or an unwritable folder never leaves `OUTPUT/controlnet` looking like a
model. The run's last checkpoint is written before the export, so a failed export loses no training: the error
says where the weights are and how to export again (the same command with `checkpoint.resume=latest`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.errors import ControlkitError, OutputError, first_line
from controlkit.files import TEMPORARY_PREFIX
from training.engine.run import ema_weights, original_path

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.engine.models import Components
    from training.engine.run import Run


def save_output(run: "Run", parts: "Components") -> Path:
    """Write the final model (see the module docstring) and return its folder."""
    config, accelerator = run.config, run.accelerator
    output = Path(config.train.output_dir)
    folder = output / ("controlnet" if config.model.kind == "controlnet" else "model")
    accelerator.wait_for_everyone()
    try:
        if accelerator.is_main_process:
            with ema_weights(run, when=config.ema.use_for_output), export_errors(run):
                if config.model.kind == "controlnet":
                    _save_controlnet(config, parts, folder)
                    if config.model.unlock_decoder:
                        _save_base(config, parts, output / "base")
                else:
                    _save_base(config, parts, folder)
    finally:
        accelerator.wait_for_everyone()  # the other processes must not wait for a main process that failed
    return folder


@contextlib.contextmanager
def model_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder to write a model into; when the block succeeds it replaces `folder` (whole),
    else it is removed and `folder` is left as it was. Leftovers of a killed export are removed first.

    Raises:
        OSError: the temporary folder could not be made or moved into place (`export_errors` words it).
    """
    temporary = folder.with_name(f"{TEMPORARY_PREFIX}{folder.name}.{os.getpid()}.tmp")
    previous = folder.with_name(f"{TEMPORARY_PREFIX}{folder.name}.{os.getpid()}.old")
    for pattern in (f"{TEMPORARY_PREFIX}{folder.name}.*.tmp", f"{TEMPORARY_PREFIX}{folder.name}.*.old"):
        for leftover in folder.parent.glob(pattern):  # of an export that was killed (one export per folder)
            shutil.rmtree(leftover, ignore_errors=True)
    try:
        temporary.mkdir(parents=True)
        yield temporary
        _swap_in(temporary, folder, previous)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _swap_in(temporary: Path, folder: Path, previous: Path) -> None:
    """Rename `temporary` to `folder`; an earlier folder of that name goes (a folder cannot be renamed over a
    non-empty one, so it is moved aside first, and back if the rename fails)."""
    if not folder.is_dir():
        temporary.replace(folder)
        return
    folder.replace(previous)
    try:
        temporary.replace(folder)
    except OSError:
        previous.replace(folder)
        raise
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def export_errors(run: "Run") -> Iterator[None]:
    """Turn any failure to write the final model into one `OutputError` line saying what is kept and how to
    export again."""
    try:
        yield
    except ControlkitError as error:
        if not isinstance(error, OutputError):
            raise
        raise OutputError(_failed_export(run, str(error))) from None
    except Exception as error:  # a full disk surfaces as OSError, or as the serializer's own error type
        raise OutputError(_failed_export(run, f"{type(error).__name__}: {first_line(error)}")) from None


def _failed_export(run: "Run", reason: str) -> str:
    message = f"writing the final model in {run.output_dir} failed ({reason}); no partial model was left"
    if run.last_checkpoint is None:
        return message
    return (f"{message}; the trained weights are safe in {run.last_checkpoint}: free space (or fix the folder) and "
            "run the same command with checkpoint.resume=latest to export again")


def condition_metadata(config: "TrainConfig", parts: "Components") -> Any:
    """ConditionMetadata of the trained ControlNet: its condition, the preprocessor (and fixed parameters) its
    maps came from, and the base family (`recorded_base`)."""
    from controlkit.controlnet import ConditionMetadata
    from preprocessors.registry import PREPROCESSORS

    known = config.model.condition in PREPROCESSORS
    preprocessor = config.data.preprocessor or (config.model.condition if known else None)
    params = dict(config.data.preprocessor_params) if config.data.preprocessor else {}
    return ConditionMetadata(condition=config.model.condition, preprocessor=preprocessor, preprocessor_params=params,
                             base=recorded_base(parts))


def recorded_base(parts: "Components") -> str:
    """The base family a ControlNet records: a family known by its layout (SDXL: the pooled prompt and size/crop
    embedding) by its name ("SDXL"), whatever its width; SD1.x and SD2.x share one layout and differ in width only,
    so for them the U-Net's width decides (`controlkit.controlnet.base_family`: "SD1.x", "SD2.x" or "custom
    (cross-attention N)")."""
    from controlkit.controlnet import base_family

    return parts.family.name if parts.family.pooled else base_family(parts.unet.config)


def _save_controlnet(config: "TrainConfig", parts: "Components", folder: Path) -> None:
    from controlkit.checkpoint import save_controlnet

    metadata = condition_metadata(config, parts)
    with model_folder(folder) as temporary:
        save_controlnet(parts.controlnet, temporary, metadata)
    if config.checkpoint.save_original:
        save_controlnet(parts.controlnet, original_path(config), metadata, original=True)


def _save_base(config: "TrainConfig", parts: "Components", folder: Path) -> None:
    """A diffusers folder: the base read from disk in float32, with the trained weights put in."""
    from controlkit.errors import CheckpointError
    from controlkit.sd_pipelines import load_pipeline_folder
    from training.engine.checkpoints import trained_state

    options: dict[str, Any] = {}
    if config.model.kind == "base":
        options["unet"] = parts.unet  # trained from scratch: the folder may hold only its config
    pipeline = load_pipeline_folder(parts.base_path, **options)
    weights = trained_state(parts.trained)
    for name, module in (("unet", pipeline.unet), ("text_encoder", pipeline.text_encoder)):
        if name in parts.trained and module is not parts.trained[name]:
            part = {key[len(name) + 1 :]: value for key, value in weights.items() if key.startswith(f"{name}.")}
            result = module.load_state_dict(part, strict=False)
            if result.unexpected_keys:
                raise CheckpointError(f"trained {name} weights do not fit the base: {result.unexpected_keys[:3]}")
    if config.model.prediction_type:
        scheduler = pipeline.scheduler
        prediction_type = config.model.prediction_type
        pipeline.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    with model_folder(folder) as temporary:
        pipeline.save_pretrained(temporary, safe_serialization=True)
