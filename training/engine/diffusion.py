"""The recipe of diffusion runs: a ControlNet on a frozen base (`model.kind = "controlnet"`), or the base model's
U-Net (and optionally its text encoder) itself (`model.kind = "base"`, the embedded demo's base).

One optimizer step (`DiffusionRecipe.step`): draw the step's randomness once for its whole global batch, then for
each micro-batch encode it (cached or per step), compute the loss of training/engine/step.py and backpropagate
it when it is finite everywhere; then the shared end of step (clip, update, schedule, EMA; or skip and count).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.engine.batch_encoder import BatchEncoder, draw_step
from training.engine.loop import backward_if_finite, finish_step
from training.engine.models import load_components
from training.engine.run import step_positions
from training.engine.step import training_loss

if TYPE_CHECKING:
    import torch

    from training.config import TrainConfig
    from training.engine.models import Components
    from training.engine.run import LoopState, Run
    from training.engine.validation import Validator


class DiffusionRecipe:
    """Attributes, set while the run is built: `parts` (every model, training/engine/models.py), `encoder`
    (batches to step inputs), `validator` (None when `validation.every_steps` is 0)."""

    parts: "Components"
    encoder: BatchEncoder
    validator: "Validator | None" = None

    def load_models(self, config: "TrainConfig", device: Any, weight_dtype: "torch.dtype") -> dict[str, Any]:
        self.parts = load_components(config, device, weight_dtype)
        return self.parts.trained

    def load_data(self, run: "Run") -> tuple[Any, list[int] | None]:
        from training.data.conditions import config_condition_fn
        from training.data.dataset import image_as_condition
        from training.data.loading import is_stream, training_data

        config, data = run.config, run.config.data
        condition_fn = image_as_condition if config.model.kind == "base" else None  # a base model uses none
        if data.preprocessor:
            condition_fn = config_condition_fn(data)
        dataset = training_data(config, condition_fn)
        self.encoder = BatchEncoder(config, self.parts, run.accelerator.device, run.prepared.get("text_encoder"))
        usable = None
        if data.cache_encodings and is_stream(dataset) and run.accelerator.is_main_process:
            print("note: data.cache_encodings: shards are streamed, so their images and captions are encoded "
                  "every step (set data.cache_encodings=false to silence this)", file=sys.stderr)
        elif data.cache_encodings:
            cache_root = Path(data.cache_dir) if data.cache_dir else run.output_dir / "cache"
            usable = self.encoder.build_caches(run.accelerator, dataset, cache_root)
        if config.validation.every_steps:
            from training.engine.validation import Validator

            self.validator = Validator(config, run, self.parts)
        return dataset, usable

    def step(self, run: "Run", step: int, micro_batches: Iterator[Any], state: "LoopState") -> float | None:
        """Accumulate the micro-batches of one optimizer step and apply the update; the mean loss, or None when
        the step was skipped."""
        accelerator, parts = run.accelerator, self.parts
        draws = draw_step(run.generator, run.layout.global_batch,
                          self.encoder.latent_shape_for(run.sampler.step_size(step)),
                          parts.noise_scheduler.config.num_train_timesteps, run.config.data.proportion_empty_prompts)
        positions = step_positions(run, step)
        unet, controlnet = run.prepared.get("unet", parts.unet), run.prepared.get("controlnet")
        losses, finite = [], True
        for _ in range(run.layout.accumulation):
            batch = next(micro_batches)
            state.skipped_pairs += batch["skipped"]
            with accelerator.accumulate(*run.prepared.values()):
                if not finite:
                    continue  # consume the step's batches so the data position stays exact
                inputs = self.encoder.inputs(batch, draws, positions)
                with accelerator.autocast():
                    loss = training_loss(unet, controlnet, parts.noise_scheduler, inputs,
                                         only_mid_control=run.config.model.only_mid_control,
                                         unet_dtype=parts.unet.dtype)
                finite = backward_if_finite(accelerator, loss, losses)
        return finish_step(run, state, step, finite, losses)

    def validate(self, run: "Run", step: int, should_stop: Callable[[], bool]) -> None:
        if self.validator is not None:
            self.validator.run(step, should_stop)

    def export(self, run: "Run") -> Path:
        from training.engine.export import save_output

        return save_output(run, self.parts)
