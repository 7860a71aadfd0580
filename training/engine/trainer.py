"""Train a ControlNet (or the demo's base U-Net or VAE) from a `TrainConfig`: `train(config) -> TrainResult`.

    >>> import controlkit
    >>> result = controlkit.train("training/configs/canny_sd15.toml", ["data.source=fill50k/prompt.json"])
    >>> result.output                                   # OUTPUT/controlnet: use with controlkit generate

`model.base` is a diffusers folder of an SD1.x/SD2.x or an SDXL base (the family its model_index.json names,
`controlkit.base_families`; e.g. training/configs/canny_sdxl.toml); the same config and code path train both.

The run is built by `create_run` (training/engine/run.py): an accelerate `Accelerator` (mixed precision, gradient
accumulation, DDP/DeepSpeed/FSDP from `accelerate launch`), the recipe's models and data, optimizer, schedule and
EMA, then a resume if asked. The recipe of `model.kind` (`RECIPES`) says what one optimizer step does
(training/engine/diffusion.py, autoencoder.py); the one loop is training/engine/loop.py, the checkpoints
training/engine/checkpoints.py. Output, in `train.output_dir`:

    controlnet/                 the ControlNet, diffusers format + condition metadata (kind 'controlnet')
    <output name>.safetensors   the same in the original key format (checkpoint.save_original)
    base/                       the base with its trained decoder (model.unlock_decoder)
    model/                      the trained base model, a diffusers folder (kind 'base'; kind 'vae': with the
                                trained VAE, see training/engine/autoencoder.py)
    checkpoints/, logs/, validation/, cache/
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from controlkit.errors import ConfigError
from training.config import TrainConfig, load_config
from training.engine.autoencoder import AutoencoderRecipe
from training.engine.diffusion import DiffusionRecipe
from training.engine.loop import run_loop
from training.engine.run import Recipe, Run, create_run, save_checkpoint

#: `model.kind` -> the recipe of that kind of run.
RECIPES: dict[str, type[Recipe]] = {"controlnet": DiffusionRecipe, "base": DiffusionRecipe, "vae": AutoencoderRecipe}


@dataclass
class TrainResult:
    """What a run ended with: the step reached, the final model folder (None when interrupted), the last
    checkpoint, the signal that stopped it (0: ran to the end), counters, and the mean loss of each optimizer
    step run in this session (NaN for a skipped step)."""

    step: int
    output: Path | None
    checkpoint: Path | None
    stopped_by: int
    nonfinite_steps: int
    skipped_pairs: int
    losses: list[float]


def train(
    config: "TrainConfig | str | os.PathLike", overrides: Sequence[str] = (), *,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run a training job to `train.max_steps` (resuming per `checkpoint.resume`); see the module docstring.

    Args:
        config: a loaded `TrainConfig`, or the path of a TOML config file (`training.config.load_config`).
        overrides: `section.key=value` items over the file's values (only with a path).
        on_step: called on the main thread after every optimizer step with the number of steps done.

    Raises:
        ConfigError: a bad config key or value (every problem in one message), before anything is loaded.
    """
    if not isinstance(config, TrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        raise ConfigError("`overrides` go with a config file path; set the fields of a loaded TrainConfig instead")
    run = build_run(config)
    run.on_step = on_step
    try:
        state = run_loop(run)
        if not state.stopped_by and run.last_saved_step != state.step:
            save_checkpoint(run, state)
        output = None if state.stopped_by else run.recipe.export(run)
        return TrainResult(state.step, output, run.last_checkpoint, state.stopped_by, state.nonfinite_total,
                           state.skipped_pairs, state.losses)
    finally:
        run.accelerator.end_training()


def build_run(config: TrainConfig) -> Run:
    """The run of `config` with the recipe of its `model.kind`, built and resumed, before its first step."""
    return create_run(config, RECIPES[config.model.kind]())
