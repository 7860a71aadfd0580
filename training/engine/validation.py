"""Validation during training: generate on fixed pairs with the generation pipeline, save a grid, measure.

Every `validation.every_steps` the main process generates one image per validation pair with
`controlkit.pipeline.generate` (the same code as `controlkit generate`, over a pipeline of the base's family:
SDXL's for an SDXL base), writes `validation/step-XXXXXXXX.png` (one row per pair: condition | generated |
target), logs the grid to TensorBoard and, for conditions with a controllability metric (training/metrics.py),
re-annotates the generated images and logs the score. The other processes wait at a barrier
(`train.process_timeout_minutes` bounds how long).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.engine.run import ema_weights

if TYPE_CHECKING:
    import numpy as np

    from training.config import TrainConfig
    from training.engine.models import Components
    from training.engine.run import Run

logger = logging.getLogger(__name__)


class Validator:
    """Fixed validation pairs (condition maps, prompts, targets as uint8 RGB at the training resolution)."""

    def __init__(self, config: "TrainConfig", run: "Run", parts: "Components"):
        from training.data.dataset import PairedDataset, image_as_condition, load_pairs, make_condition_fn

        data, validation = config.data, config.validation
        pairs = load_pairs(validation.source or data.source, image_column=data.image_column,
                           conditioning_column=data.conditioning_column, caption_column=data.caption_column)
        condition_fn = make_condition_fn(data.preprocessor, data.preprocessor_params) if data.preprocessor else None
        if config.model.kind == "base":
            condition_fn = image_as_condition
        dataset = PairedDataset(pairs[: validation.count * 2], resolution=data.resolution, condition_fn=condition_fn,
                                seed=config.train.seed)
        items = [item for item in (dataset[i] for i in range(len(dataset))) if item is not None][: validation.count]
        self.conditions = [_to_uint8(item["conditioning_pixel_values"], 0.0, 1.0) for item in items]
        self.targets = [_to_uint8(item["pixel_values"], -1.0, 1.0) for item in items]
        self.prompts = [item["prompt"] for item in items]
        self.config, self.run_ref, self.parts = config, run, parts
        self.folder = Path(config.train.output_dir) / "validation"

    def run(self, step: int, should_stop: Any) -> dict[str, float]:
        """Generate, save and log the validation of `step` (main process); returns the logged values."""
        accelerator = self.run_ref.accelerator
        values: dict[str, float] = {}
        if accelerator.is_main_process and self.prompts:
            with self._eval_weights() as (base, controlnet):
                generated = self._generate(base, controlnet, should_stop)
            if generated:
                grid = _grid(self.conditions[: len(generated)], generated, self.targets[: len(generated)])
                self._save(step, grid)
                values = self._measure(generated)
                accelerator.log(values, step=step)
        accelerator.wait_for_everyone()
        return values

    def _generate(self, base: Any, controlnet: Any, should_stop: Any) -> list["np.ndarray"]:
        import numpy as np

        from controlkit.control import Control
        from controlkit.pipeline import generate

        validation, resolution = self.config.validation, self.config.data.resolution
        images = []
        for condition, prompt in zip(self.conditions, self.prompts):
            if should_stop():
                break
            controls = []
            if controlnet is not None:
                controls = [Control(condition, controlnet, layer_weights=self._layers(controlnet),
                                    every=validation.every)]
            result = generate(base, prompt, controls, steps=validation.num_inference_steps,
                              guidance_scale=validation.guidance_scale, seed=validation.seed, width=resolution,
                              height=resolution, output_type="np")
            images.append((np.clip(result.images[0], 0.0, 1.0) * 255).round().astype(np.uint8))
        return images

    def _layers(self, controlnet: Any) -> list[float] | None:
        """Only the middle block's output for a ControlNet trained with only_mid_control."""
        if not self.config.model.only_mid_control:
            return None
        from controlkit.control import num_control_layers

        count = num_control_layers(controlnet)
        return [0.0] * (count - 1) + [1.0]

    @contextlib.contextmanager
    def _eval_weights(self):
        """The base (a pipeline of the base's family) and ControlNet to generate with: EMA weights when EMA is on,
        in eval mode. Generation runs every module but the VAE in one dtype, so with mixed precision the trained
        modules (float32) take part as copies in the frozen modules' dtype; the trained weights themselves are not
        touched. The VAE is used as it is (float32 where the run keeps it so: generation decodes in its dtype)."""
        from controlkit.sd_pipelines import pipeline_from_components

        run, parts = self.run_ref, self.parts
        modules = list(run.trained.values())
        was_training = [module.training for module in modules]
        with ema_weights(run):
            try:
                for module in modules:
                    module.eval()
                dtype = parts.weight_dtype
                networks = {name: _in_dtype(run.accelerator, module, dtype)
                            for name, module in parts.base_modules().items()
                            if name in ("unet", "text_encoder", "text_encoder_2")}
                base = pipeline_from_components(parts.base_modules(**networks), settings=parts.settings)
                yield base, _in_dtype(run.accelerator, parts.controlnet, dtype)
            finally:
                for module, training in zip(modules, was_training):
                    module.train(training)

    def _save(self, step: int, grid: "np.ndarray") -> None:
        from PIL import Image

        from controlkit.files import atomic_path

        with atomic_path(self.folder / f"step-{step:08d}.png") as temporary:
            Image.fromarray(grid).save(temporary, format="PNG")
        for tracker in self.run_ref.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", grid, step, dataformats="HWC")

    def _measure(self, generated: list["np.ndarray"]) -> dict[str, float]:
        from training.metrics import METRICS, controllability

        condition = self.config.model.condition
        if not self.config.validation.measure or self.config.model.kind != "controlnet" or condition not in METRICS:
            return {}
        preprocessor = None
        if self.config.data.preprocessor == condition and self.config.data.preprocessor_params:
            from preprocessors.registry import get_preprocessor

            preprocessor = get_preprocessor(condition, **self.config.data.preprocessor_params)
        try:
            references = self.conditions[: len(generated)]
            result = controllability(condition, generated, references, preprocessor=preprocessor)
        except Exception as error:  # a metric that cannot run here (e.g. missing weights) must not end training
            logger.warning("validation metric for %s skipped: %s", condition, error)
            return {}
        return {f"validation/{result.name}": result.value}


def _in_dtype(accelerator: Any, module: Any, dtype: Any) -> Any:
    """`module` itself when all its weights are `dtype`, else a copy in `dtype` without the mixed-precision forward
    that `accelerator.prepare` gave the original (it would return float32 outputs)."""
    if module is None or all(parameter.dtype == dtype for parameter in module.parameters()):
        return module
    duplicate = accelerator.unwrap_model(copy.deepcopy(module), keep_fp32_wrapper=False)
    for tensor in list(duplicate.parameters()) + list(duplicate.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    return duplicate


def _to_uint8(tensor: Any, low: float, high: float) -> "np.ndarray":
    """(3, H, W) float in [low, high] -> (H, W, 3) uint8."""
    scaled = (tensor.float().clamp(low, high) - low) / (high - low) * 255.0
    return scaled.round().byte().permute(1, 2, 0).numpy()


def _grid(*columns: list["np.ndarray"]) -> "np.ndarray":
    import numpy as np

    rows = [np.concatenate(row, axis=1) for row in zip(*columns)]
    return np.concatenate(rows, axis=0)

