"""The final model of a run, in the formats `controlkit generate` loads.

- kind 'controlnet': `OUTPUT/controlnet/` (diffusers folder with the condition metadata, via
  `controlkit.checkpoint.save_controlnet`), plus `OUTPUT/<name>.safetensors` in the original key format with
  `checkpoint.save_original`. With `model.unlock_decoder` the U-Net's decoder changed too, so `OUTPUT/base/` holds
  the base with that decoder: generate with `--base OUTPUT/base --controlnet NAME=OUTPUT/controlnet`.
- kind 'base': `OUTPUT/model/`, a diffusers Stable Diffusion folder (the trained U-Net, the text encoder trained
  or as it was, the base's VAE, tokenizer and scheduler).

With EMA on and `ema.use_for_output`, the averaged weights are written. Only the main process writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.engine.run import ema_weights

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
    if accelerator.is_main_process:
        with ema_weights(run, when=config.ema.use_for_output):
            if config.model.kind == "controlnet":
                _save_controlnet(config, parts, folder)
                if config.model.unlock_decoder:
                    _save_base(config, parts, output / "base")
            else:
                _save_base(config, parts, folder)
    accelerator.wait_for_everyone()
    return folder


def condition_metadata(config: "TrainConfig", parts: "Components") -> Any:
    """ConditionMetadata of the trained ControlNet: its condition, the preprocessor (and fixed parameters) its
    maps came from, and the base family."""
    from controlkit.controlnet import ConditionMetadata, base_family
    from preprocessors.registry import PREPROCESSORS

    known = config.model.condition in PREPROCESSORS
    preprocessor = config.data.preprocessor or (config.model.condition if known else None)
    params = dict(config.data.preprocessor_params) if config.data.preprocessor else {}
    return ConditionMetadata(condition=config.model.condition, preprocessor=preprocessor, preprocessor_params=params,
                             base=base_family(parts.unet.config))


def _save_controlnet(config: "TrainConfig", parts: "Components", folder: Path) -> None:
    from controlkit.checkpoint import save_controlnet

    metadata = condition_metadata(config, parts)
    save_controlnet(parts.controlnet, folder, metadata)
    if config.checkpoint.save_original:
        output = Path(config.train.output_dir)
        save_controlnet(parts.controlnet, output / f"{output.resolve().name}.safetensors", metadata, original=True)


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
    pipeline.save_pretrained(folder, safe_serialization=True)
