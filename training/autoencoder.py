"""Train the VAE of a latent diffusion model (`model.kind = "vae"`), e.g. the embedded demo's autoencoder.

    controlkit train training/configs/demo_vae.toml model.base=FOLDER data.source=DATA

`model.base` is a diffusers folder whose `vae/config.json` sets the architecture (with `model.from_scratch`, the
default, the weights start random; otherwise from the folder's weights). The loss of one image x is Stable
Diffusion's autoencoder loss without its perceptual and adversarial terms (no LPIPS or discriminator weights ship
offline), divided by the number of pixel values so that it reads as a mean absolute error:

    loss = ( sum |x - decode(z)| + KL_WEIGHT * KL(q(z | x) || N(0, I)) ) / (3 H W),   z = mean + std * eps

with `eps` drawn per optimizer step from the run's generator, so a resumed run matches an uninterrupted one.
Training reuses the trainer's setup, data order, checkpoints, resume, signal handling and logging
(training/trainer.py); only the step differs. Output: `OUTPUT/model/`, the base folder with the trained VAE, whose
`scaling_factor` is set to 1 / (standard deviation of training latents), as Stable Diffusion chose 0.18215, so the
diffusion model sees latents of unit variance. `OUTPUT/validation/reconstructions.png`: the first
`validation.count` images (top row) and their reconstructions (bottom row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.loop import LoopState, backward_if_finite, finish_step
from training.trainer import Run, image_as_condition

if TYPE_CHECKING:
    import torch


#: Weight of the KL term against the summed absolute error (Stable Diffusion's autoencoder used 1e-6).
KL_WEIGHT = 1e-6
#: Training images whose latents set the scaling factor.
SCALING_SAMPLES = 256


@dataclass
class AutoencoderParts:
    """The models of a VAE run, shaped like `training.components.Components` where the trainer reads them."""

    vae: Any
    trained: dict[str, "torch.nn.Module"]
    base_path: Path


class AutoencoderRun(Run):
    """A `Run` whose trained module is the VAE; checkpoints, resume and logging are the trainer's."""

    def optimizer_step(self, step: int, micro_batches: Any, state: LoopState) -> float | None:
        """One optimizer step of the VAE (`autoencoder_step`)."""
        return autoencoder_step(self, step, micro_batches, state)

    def _setup_validation(self) -> None:
        """Validation here is reconstruction grids (`validate`), not generation: no pipeline to build."""

    def _setup_models(self) -> None:
        import torch

        from training.components import build_ema, build_lr_scheduler, build_optimizer, resolve_base
        from training.features import latent_shape

        config, accelerator = self.config, self.accelerator
        base = resolve_base(config.model.base)
        vae = load_vae(base, from_scratch=config.model.from_scratch, seed=config.train.seed)
        if config.model.channels_last:
            vae.to(memory_format=torch.channels_last)
        vae.to(accelerator.device).requires_grad_(True).train()
        self.parts = AutoencoderParts(vae, {"vae": vae}, base)
        self.parameters = list(vae.parameters())
        self.optimizer = build_optimizer(config, self.parameters, accelerator.device)
        self.lr_scheduler = build_lr_scheduler(config, self.optimizer)
        self.ema = build_ema(config, self.parameters)
        self.vae_forward, self.optimizer = accelerator.prepare(vae, self.optimizer)
        self.forward_modules = {"vae": self.vae_forward}
        self.generator = torch.Generator(accelerator.device).manual_seed(config.train.seed)
        self.latent_shape = latent_shape(vae, config.data.resolution)

    def _setup_data(self) -> None:
        from training.data import PairedDataset, load_training_pairs
        from training.sampler import BatchLayout, StepSampler

        config, data = self.config, self.config.data
        pairs = load_training_pairs(data)
        self.dataset = PairedDataset(pairs, resolution=data.resolution, center_crop=data.center_crop,
                                     condition_fn=image_as_condition, on_bad_pair=data.on_bad_pair,
                                     seed=config.train.seed)
        self.layout = BatchLayout(config.train.batch_size, self.accelerator.num_processes,
                                  config.train.gradient_accumulation_steps)
        self.sampler = StepSampler(range(len(self.dataset)), self.layout, config.train.seed)

    def validate(self, step: int, should_stop: Any) -> None:
        if self.accelerator.is_main_process:
            save_reconstructions(self.parts.vae, self._first_images(self.config.validation.count),
                                 self.output_dir / "validation" / f"step-{step:08d}.png")
        self.accelerator.wait_for_everyone()

    def save_output(self) -> Path:
        """OUTPUT/model: the base folder with the trained VAE (EMA weights when `ema.use_for_output`)."""
        from diffusers import StableDiffusionPipeline

        from training.output import _final_weights

        folder = self.output_dir / "model"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with _final_weights(self):
                vae = self.parts.vae.eval()
                vae.register_to_config(scaling_factor=latent_scaling_factor(vae, self._first_images(SCALING_SAMPLES)))
                save_reconstructions(vae, self._first_images(self.config.validation.count),
                                     self.output_dir / "validation" / "reconstructions.png")
                pipeline = StableDiffusionPipeline.from_pretrained(
                    self.parts.base_path, vae=vae, use_safetensors=True, local_files_only=True, safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False,
                )
                pipeline.save_pretrained(folder, safe_serialization=True)
        self.accelerator.wait_for_everyone()
        return folder

    def _first_images(self, count: int) -> "torch.Tensor":
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
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(grid)).save(path)


def autoencoder_step(run: AutoencoderRun, step: int, micro_batches: Any, state: LoopState) -> float | None:
    """One optimizer step over its micro-batches; the mean loss, or None when skipped for a non-finite loss."""
    import torch

    accelerator, layout = run.accelerator, run.layout
    eps = torch.randn((layout.global_batch, *run.latent_shape), generator=run.generator, device=run.generator.device)
    positions = {index: position for position, index in enumerate(run.sampler.step_indices(step))}
    losses, finite, last = [], True, None
    for _ in range(layout.accumulation):
        batch = next(micro_batches)
        state.skipped_pairs += batch["skipped"]
        with accelerator.accumulate(run.vae_forward):
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
                weight = 0.0  # an all-bad batch: run the previous one without effect, as the diffusion trainer does
            pixels, draws = last
            if run.config.model.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            with accelerator.autocast():
                loss = autoencoder_loss(run.vae_forward, pixels, draws) * weight
            finite = backward_if_finite(accelerator, loss, losses)
    return finish_step(run, state, step, finite, losses)
