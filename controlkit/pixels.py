"""The pixel side of generation: which VAE encodes and decodes pixels, and latents decoded to images.

A float16 VAE that overflows there (SDXL's, `BaseFamily.upcast_vae`) and a bfloat16 one run as a float32 copy
made once per VAE; the caller's VAE is never converted in place (other threads may be using it).
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from controlkit.base_families import BaseFamily
from controlkit.errors import ControlkitError

if TYPE_CHECKING:
    import torch

#: float32 copies of VAEs (see `pixel_vae`), by VAE, with the versions of its parameters they were copied at (an
#: in-place change of the VAE's weights makes a new copy).
_FLOAT32_VAES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FLOAT32_VAES_LOCK = threading.Lock()


def pixel_vae(vae: Any, family: BaseFamily) -> Any:
    """The VAE to encode and decode pixels with: `vae` itself, or a float32 copy of it (made once per VAE and kept
    while the VAE lives) when it is float16 and the family and its config say it overflows there, or bfloat16,
    whose 8-bit mantissa bands smooth gradients in the decoded image (a bfloat16 base speeds up the U-Net and
    ControlNets; the VAE runs once per image and keeps float32's quality)."""
    import torch

    overflows = family.upcast_vae and vae.dtype == torch.float16 and vae.config.get("force_upcast", True)
    if not (overflows or vae.dtype == torch.bfloat16):
        return vae
    versions = tuple(parameter._version for parameter in vae.parameters())
    with _FLOAT32_VAES_LOCK:
        kept = _FLOAT32_VAES.get(vae)
        if kept is None or kept[0] != versions:
            kept = (versions, float32_copy(vae))
            _FLOAT32_VAES[vae] = kept
    return kept[1]


def float32_copy(vae: Any) -> Any:
    """A float32 copy of a VAE (built from its config and given its weights: `.to(dtype)` on a diffusers model
    with float32-only modules warns)."""
    duplicate = type(vae).from_config(vae.config)
    duplicate.load_state_dict({key: value.float() for key, value in vae.state_dict().items()})
    return duplicate.to(vae.device).eval().requires_grad_(False)


def decode(pipe: Any, latents: torch.Tensor, output_type: str, generator: torch.Generator) -> Any:
    """Final latents -> images of `output_type` ("latent" returns them as they are), through `pipe`'s VAE and
    image processor; NaN/inf latents or pixels are one ControlkitError line saying what to change."""
    import torch

    if not torch.isfinite(latents).all():
        raise ControlkitError(
            f"generation produced NaN/inf latents in {latents.dtype}; run in float32 or bfloat16 instead"
        )
    if output_type == "latent":
        return latents
    vae = pipe.vae
    latents = latents.to(vae.dtype)
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is not None and std is not None:  # VAEs with per-channel latent statistics, as diffusers' SDXL decode
        mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents.device, latents.dtype) for v in (mean, std))
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    decoded = vae.decode(latents, return_dict=False, generator=generator)[0]
    if not torch.isfinite(decoded).all():
        raise ControlkitError(
            f"the VAE produced NaN/inf pixels in {decoded.dtype}; decode in float32 (an fp16 VAE overflows)"
        )
    return pipe.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=[True] * len(decoded))
