"""Train the VAE of a latent diffusion model (`model.kind = "vae"`), e.g. the embedded demo's autoencoder.

    controlkit train training/configs/demo_vae.toml model.base=FOLDER data.source=DATA

`model.base` is a diffusers folder whose `vae/config.json` sets the architecture (with `model.from_scratch`, the
default, the weights start random; otherwise from the folder's weights). The loss of one image x is Stable
Diffusion's autoencoder loss without its perceptual and adversarial terms (no LPIPS or discriminator weights ship
offline), divided by the number of pixel values so that it reads as a mean absolute error:

    loss = ( sum |x - decode(z)| + KL_WEIGHT * KL(q(z | x) || N(0, I)) ) / (3 H W),   z = mean + std * eps

with `eps` drawn per optimizer step from the run's generator, so a resumed run matches an uninterrupted one.
Training reuses the engine's setup, data order, checkpoints, resume, signal handling and logging
(training/engine/run.py, loop.py); this recipe adds the model, the step, validation and export. Output: `OUTPUT/model/`, the base folder with the trained VAE, whose
`scaling_factor` is set to 1 / (standard deviation of training latents), as Stable Diffusion chose 0.18215, so the
diffusion model sees latents of unit variance. `OUTPUT/validation/reconstructions.png`: the first
`validation.count` images (top row) and their reconstructions (bottom row).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.files import atomic_path
from training.engine.loop import backward_if_finite, finish_step
from training.engine.run import ema_weights, step_positions

if TYPE_CHECKING:
    import torch

    from training.config import TrainConfig
    from training.engine.run import LoopState, Run


#: Weight of the KL term against the summed absolute error (Stable Diffusion's autoencoder used 1e-6).
KL_WEIGHT = 1e-6
#: Training images whose latents set the scaling factor.
SCALING_SAMPLES = 256


class AutoencoderRecipe:
    """The VAE run. Attributes, set while the run is built: `vae` (the module being trained), `base_path` (the
    base folder), `latent_shape` (C, h, w) of one training image."""

    vae: Any
    base_path: Path
    latent_shape: tuple[int, int, int]

    def load_models(self, config: "TrainConfig", device: Any, weight_dtype: "torch.dtype") -> dict[str, Any]:
        import torch

        from training.data.encodings import latent_shape
        from training.engine.models import resolve_base

        self.base_path = resolve_base(config.model.base)
        vae = load_vae(self.base_path, from_scratch=config.model.from_scratch, seed=config.train.seed)
        if config.model.channels_last:
            vae.to(memory_format=torch.channels_last)
        self.vae = vae.to(device).requires_grad_(True).train()
        self.latent_shape = latent_shape(vae, config.data.resolution)
        return {"vae": vae}

    def load_data(self, run: "Run") -> tuple[Any, None]:
        """The training images (no condition maps), every one read when it is used."""
        from training.data.dataset import PairedDataset, image_as_condition, load_training_pairs

        config, data = run.config, run.config.data
        dataset = PairedDataset(load_training_pairs(data), resolution=data.resolution, center_crop=data.center_crop,
                                condition_fn=image_as_condition, on_bad_pair=data.on_bad_pair, seed=config.train.seed)
        self.dataset = dataset
        return dataset, None

    def step(self, run: "Run", step: int, micro_batches: Iterator[Any], state: "LoopState") -> float | None:
        """One optimizer step over its micro-batches; the mean loss, or None when skipped for a non-finite loss."""
        import torch

        accelerator, layout, vae = run.accelerator, run.layout, run.prepared["vae"]
        eps = torch.randn((layout.global_batch, *self.latent_shape), generator=run.generator,
                          device=run.generator.device)
        positions = step_positions(run, step)
        losses, finite, last = [], True, None
        for _ in range(layout.accumulation):
            batch = next(micro_batches)
            state.skipped_pairs += batch["skipped"]
            with accelerator.accumulate(vae):
                if not finite:
                    continue
                weight = 1.0
                if batch["indices"]:
                    rows = torch.tensor([positions[index] for index in batch["indices"]], device=eps.device)
                    last = (batch["pixel_values"].to(accelerator.device), eps[rows].to(accelerator.device))
                elif last is None:
                    from controlkit.errors import ControlkitError

                    raise ControlkitError("every pair of the first batch is bad; check them: `controlkit dataset check`")
                else:
                    weight = 0.0  # an all-bad batch: run the previous one without effect, as the diffusion recipe does
                pixels, draws = last
                if run.config.model.channels_last:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                with accelerator.autocast():
                    loss = autoencoder_loss(vae, pixels, draws) * weight
                finite = backward_if_finite(accelerator, loss, losses)
        return finish_step(run, state, step, finite, losses)

    def validate(self, run: "Run", step: int, should_stop: Callable[[], bool]) -> None:
        """Reconstruction grids, not generation: no pipeline to build."""
        if run.accelerator.is_main_process:
            save_reconstructions(self.vae, self.first_images(run.config.validation.count),
                                 run.output_dir / "validation" / f"step-{step:08d}.png")
        run.accelerator.wait_for_everyone()

    def export(self, run: "Run") -> Path:
        """OUTPUT/model: the base folder with the trained VAE (EMA weights when `ema.use_for_output`)."""
        from controlkit.sd_pipelines import load_pipeline_folder
        from training.engine.export import export_errors, model_folder

        folder = run.output_dir / "model"
        run.accelerator.wait_for_everyone()
        try:
            if run.accelerator.is_main_process:
                with ema_weights(run, when=run.config.ema.use_for_output), export_errors(run):
                    vae = self.vae.eval()
                    vae.register_to_config(
                        scaling_factor=latent_scaling_factor(vae, self.first_images(SCALING_SAMPLES)))
                    save_reconstructions(vae, self.first_images(run.config.validation.count),
                                         run.output_dir / "validation" / "reconstructions.png")
                    with model_folder(folder) as temporary:
                        load_pipeline_folder(self.base_path, vae=vae).save_pretrained(temporary, safe_serialization=True)
        finally:
            run.accelerator.wait_for_everyone()  # the other processes must not wait for a main process that failed
        return folder

    def first_images(self, count: int) -> "torch.Tensor":
        """(N, 3, R, R) in [-1, 1]: the first `count` readable training images, in dataset order."""
        import torch

        images = []
        for index in range(len(self.dataset)):
            item = self.dataset[index]
            if item is not None:
                images.append(item["pixel_values"])
            if len(images) == count:
                break
        return torch.stack(images)


def load_vae(base: Path, *, from_scratch: bool, seed: int) -> Any:
    """The base folder's VAE: its architecture with seeded random weights, or its trained weights."""
    import torch
    from diffusers import AutoencoderKL

    if from_scratch:
        torch.manual_seed(seed)
        return AutoencoderKL.from_config(AutoencoderKL.load_config(base, subfolder="vae"))
    return AutoencoderKL.from_pretrained(base, subfolder="vae", use_safetensors=True)


def autoencoder_loss(vae: Any, pixels: "torch.Tensor", eps: "torch.Tensor") -> "torch.Tensor":
    """The loss of the module docstring for (B, 3, H, W) images in [-1, 1], as a 0-dim float32 tensor.

    Args:
        eps: (B, C, h, w) standard normal draws of the latent posterior sample.
    """
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
    reconstruction = vae.decode(latents).sample
    absolute = (reconstruction.float() - pixels.float()).abs().sum(dim=(1, 2, 3))
    kl = posterior.kl().float()
    return ((absolute + KL_WEIGHT * kl) / pixels[0].numel()).mean()


def latent_scaling_factor(vae: Any, pixels: "torch.Tensor", batch: int = 32) -> float:
    """1 / the standard deviation of posterior samples of `pixels` (seeded draws), rounded to 5 digits."""
    import torch

    generator = torch.Generator().manual_seed(0)
    samples = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            posterior = vae.encode(pixels[start : start + batch].to(vae.device, vae.dtype)).latent_dist
            samples.append(posterior.sample(generator=generator).float().cpu())
    return round(1.0 / float(torch.cat(samples).std()), 5)


def save_reconstructions(vae: Any, pixels: "torch.Tensor", path: Path) -> None:
    """A PNG of the images (top row) over their reconstructions from the posterior mean (bottom row)."""
    import numpy as np
    import torch
    from PIL import Image

    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        pixels = pixels.to(vae.device, vae.dtype)
        reconstructed = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    vae.train(was_training)
    rows = [torch.cat(list(images.float().clamp(-1, 1)), dim=2) for images in (pixels, reconstructed)]
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as temporary:  # a later run never finds a half-written grid
        Image.fromarray(np.ascontiguousarray(grid)).save(temporary, format="PNG")
