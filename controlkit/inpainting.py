"""Inpainting under control: `generate(..., init_image=IMAGE, mask=MASK)` repaints the mask's white region.

As diffusers' `StableDiffusionControlNetInpaintPipeline` (and its SDXL sibling) does it, with the pieces of the
family's own inpaint pipeline (`prepare_latents`, `prepare_mask_latents`):
- a base whose U-Net takes the latents plus the mask and the masked image's latents (an inpainting base, 9 input
  channels for SD) gets both concatenated to its input at every step; its ControlNets see the latents only;
- any other base keeps the unmasked region by blending after every step: outside the mask the init image's
  latents noised to the next step's level, inside the denoised latents;
- `keep_unmasked` then puts the init image's own pixels back outside the mask, so they come back exactly
  instead of through the VAE (what diffusers' `apply_overlay` does with a binary mask).
The mask is binarised once (`controlkit.masks`: grey >= 128 is repainted), at the output size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from controlkit.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass
class Masking:
    """What the denoising loop needs to inpaint.

    Attributes:
        mask: (N, 1, h, w) at latent size, 1 where repainted; N = 2B with guidance (negative; positive), else B.
        masked_latents: (N, C, h, w) latents of the init image with the repainted region black.
        image_latents: (B, C, h, w) latents of the init image (bases that blend), else None.
        noise: (B, C, h, w) the starting noise (re-noises `image_latents` for each step's blend).
        timesteps: the steps to run.
        concatenate: the U-Net takes [latents, mask, masked_latents] (an inpainting base).
        keep: (H, W) bool, True where the init image is kept; `init` its RGB uint8 (H, W, 3) at output size.
    """

    mask: torch.Tensor
    masked_latents: torch.Tensor
    image_latents: torch.Tensor | None
    noise: torch.Tensor
    timesteps: Any
    concatenate: bool
    keep: np.ndarray
    init: np.ndarray

    def unet_input(self, model_input: torch.Tensor) -> torch.Tensor:
        """The U-Net's input for this step: the latents, with the mask and masked latents for an inpainting base."""
        import torch

        if not self.concatenate:
            return model_input
        return torch.cat([model_input, self.mask.to(model_input.dtype), self.masked_latents.to(model_input.dtype)],
                         dim=1)

    def blend(self, latents: torch.Tensor, step: int, scheduler: Any) -> torch.Tensor:
        """After step `step`: the kept region set back to the init image at the next step's noise level (bases
        that blend); an inpainting base's latents are returned as they are."""
        import torch

        if self.concatenate:
            return latents
        kept = self.image_latents
        if step < len(self.timesteps) - 1:
            kept = scheduler.add_noise(kept, self.noise, torch.tensor([self.timesteps[step + 1]]))
        mask = self.mask[: latents.shape[0]]  # the negative half's copy, as diffusers takes it
        return (1 - mask) * kept + mask * latents

    def paste(self, images: Any, output_type: str) -> Any:
        """The init image's pixels put back outside the mask, in the images' own type ("latent": unchanged)."""
        import torch
        from PIL import Image

        keep = self.keep[..., None]
        if output_type == "pil":
            return [Image.fromarray(np.where(keep, self.init, np.asarray(image.convert("RGB")))) for image in images]
        if output_type == "np":
            return np.where(keep[None], (self.init / 255.0).astype(images.dtype), images)
        if output_type == "pt":
            init = torch.from_numpy(self.init).permute(2, 0, 1).to(images.dtype).div(255.0)
            return torch.where(torch.from_numpy(self.keep)[None, None], init[None], images)
        return images


def start_inpainting(
    pipe: Any, init: np.ndarray, mask: np.ndarray, steps: int, strength: float, num_images: int,
    text_embeds: torch.Tensor, generator: torch.Generator, guided: bool,
) -> tuple[Any, torch.Tensor, Masking]:
    """Timesteps, starting latents and the `Masking` of one inpainting run, drawn from `generator` in diffusers'
    order (the init image's latents, the noise, the masked image's latents).

    Args:
        pipe: the family's inpaint pipeline over the base's modules (`pipeline_from_components(..., inpaint=True)`).
        init: the image to inpaint, RGB uint8 (H, W, 3) at the output size.
        mask: grey uint8 (H, W) at the output size, white = repaint (`controlkit.masks`).
        text_embeds: the prompt embeddings (their device and dtype are the run's).
    """
    import torch

    from controlkit.control import condition_tensor
    from controlkit.masks import repainted
    from controlkit.sampling import run_timesteps

    device, dtype = text_embeds.device, text_embeds.dtype
    timesteps = run_timesteps(pipe, steps, strength)
    height, width = init.shape[:2]
    channels = pipe.vae.config.latent_channels
    concatenate = check_unet_channels(pipe.unet, channels)
    pixels = condition_tensor(init) * 2.0 - 1.0  # the VAE takes [-1, 1]
    repaint = torch.from_numpy(repainted(mask)).float()[None, None]
    # In the VAE's dtype: SDXL's pipelines would otherwise convert a float32 VAE copy to `dtype` in place.
    vae_dtype = pipe.vae.dtype
    latents, noise, *image_latents = pipe.prepare_latents(
        num_images, channels, height, width, vae_dtype, device, generator, None, image=pixels,
        timestep=timesteps[:1].repeat(num_images), is_strength_max=strength == 1.0, return_noise=True,
        return_image_latents=not concatenate,
    )
    small_mask, masked_latents = pipe.prepare_mask_latents(
        repaint, pixels * (repaint < 0.5), num_images, height, width, vae_dtype, device, generator, guided,
    )
    masking = Masking(
        small_mask.to(dtype), masked_latents.to(dtype), image_latents[0].to(dtype) if image_latents else None,
        noise.to(dtype), timesteps, concatenate, ~repainted(mask), init,
    )
    return timesteps, latents.to(dtype), masking


def check_unet_channels(unet: Any, latent_channels: int) -> bool:
    """True for an inpainting U-Net (latents + mask + masked latents in), False for a plain one; ConfigError for
    any other input width."""
    channels = unet.config.in_channels
    if channels == 2 * latent_channels + 1:
        return True
    if channels == latent_channels:
        return False
    raise ConfigError(f"the base's U-Net takes {channels} input channels; inpainting needs {latent_channels} (a plain "
                      f"base) or {2 * latent_channels + 1} (an inpainting base)")


def check_masking(mask: Any, init_image: Any, keep_unmasked: Any) -> None:
    """The mask options, before anything is loaded: a mask needs the image it repaints."""
    if not isinstance(keep_unmasked, bool):
        raise ConfigError(f"`keep_unmasked` must be True or False, got {keep_unmasked!r}")
    if mask is not None and init_image is None:
        raise ConfigError("`mask` needs `init_image`, the image whose white mask region is repainted "
                          "(--init-image with --mask)")
