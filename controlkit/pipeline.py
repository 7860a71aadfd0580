"""Generation: a frozen Stable Diffusion base plus any number of controls.

The base is a diffusers `StableDiffusionPipeline` (its U-Net, VAE, text encoder, tokenizer and scheduler
config). `generate` uses diffusers' own pieces for everything around the denoising loop (prompt encoding,
initial latents, img2img noising, timesteps, VAE decoding, post-processing) and runs the loop of
`controlkit.sampling`, which adds what diffusers cannot express (see `controlkit.control`).

Example:
    >>> from controlkit.control import Control
    >>> from controlkit.pipeline import generate, load_base
    >>> base = load_base("models/sd15")                                   # a diffusers folder
    >>> edges = Control.from_pretrained("models/controlnet-canny", "edges.png", unet=base.unet)  # base's dtype
    >>> result = generate(base, "a red house", [edges], steps=20, seed=1)
    >>> result.images[0].save("house.png")
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.control import (
    Control,
    PreparedControl,
    check_placement,
    condition_tensor,
    fit_image,
    prepare_control,
)
from controlkit.controlnet import check_fits
from controlkit.errors import CheckpointError, ConfigError, ControlkitError, WeightsNotFoundError, first_line
from controlkit.sd_pipelines import BASE_COMPONENTS, PIPELINE_OPTIONS, load_pipeline_folder, pipeline_from_components

if TYPE_CHECKING:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

#: The base model's parts that generation uses.
#: Output sides must be multiples of this (SD's VAE downsamples by 8).
SIZE_MULTIPLE = 8
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: Held while a prompt is encoded. A tokenizer backed by the `tokenizers` library (transformers 5's CLIPTokenizer)
#: keeps its padding and truncation settings on the shared object and diffusers' `encode_prompt` changes them
#: between its calls (max_length, then longest), so two generations encoding at once could pad each other's prompt.
_PROMPT_LOCK = threading.Lock()


@dataclass
class GenerationResult:
    """What `generate` returns.

    Attributes:
        images: PIL images (output_type "pil"), a float (B, H, W, 3) array in [0, 1] ("np"), a (B, 3, H, W)
            tensor in [0, 1] ("pt"), or the final latents ("latent").
        seed: the seed of the CPU generator (drawn at random when none was given).
        settings: everything that determines the output (for the record and PNG metadata).
    """

    images: Any
    seed: int
    settings: dict[str, Any]


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
    """Load a Stable Diffusion base offline.

    Args:
        source: a diffusers folder (model_index.json, safetensors weights), a single-file checkpoint
            (.safetensors, or .ckpt read with torch's weights-only loader), or a hub id that is in the local cache.
        torch_dtype: weights dtype (default float32).
        device: where to put it (default: stays on the CPU).
        config: for a single file, a local diffusers folder of the same architecture whose config files
            diffusers uses (needed offline unless the hub cache already has the model's config).

    Raises:
        WeightsNotFoundError: nothing at `source`, or its weights are missing.
        CheckpointError: the files are there but are not a loadable Stable Diffusion base.
    """
    from diffusers import StableDiffusionPipeline

    from controlkit.weights import looks_like_hub_id

    path = Path(source).expanduser()
    options = {**PIPELINE_OPTIONS, **_dtype_option(torch_dtype)}
    try:
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise WeightsNotFoundError(
                    f"base model {source}: not a diffusers folder (no model_index.json); pass a folder written by "
                    "save_pretrained, or a single .safetensors checkpoint"
                )
            base = load_pipeline_folder(path, **_dtype_option(torch_dtype))
        elif path.is_file():
            base = _load_single_file(path, config, options)
        elif looks_like_hub_id(str(source)):
            base = StableDiffusionPipeline.from_pretrained(str(source), use_safetensors=True, **options)
        else:
            raise WeightsNotFoundError(
                f"base model {source}: no such file or folder; pass a diffusers folder or a single-file checkpoint"
            )
    except ControlkitError:
        raise
    except OSError as error:
        raise WeightsNotFoundError(f"base model {source}: weights missing ({first_line(error)})") from None
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"base model {source}: not a loadable Stable Diffusion base ({first_line(error)})"
        ) from None
    return base.to(device) if device is not None else base


def _dtype_option(dtype: torch.dtype | None) -> dict[str, Any]:
    """diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name now warns); older releases know only the old."""
    if dtype is None:
        return {}
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def _load_single_file(path: Path, config: str | os.PathLike | None, options: dict[str, Any]) -> Any:
    from diffusers import StableDiffusionPipeline

    from controlkit.safe_load import SAFETENSORS, sniff_format

    kind = sniff_format(path)  # refuses LFS pointers, HTML pages, empty files by content
    if (kind == SAFETENSORS) != (path.suffix.lower() == ".safetensors"):
        raise CheckpointError(f"base model {path}: the file is {kind} but named {path.name}; fix its extension")
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise WeightsNotFoundError(f"`config` {config}: not a diffusers folder (no model_index.json)")
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), config=None if config is None else str(config), local_files_only=True, **options
        )
    except OSError as error:
        if config is None:
            raise WeightsNotFoundError(
                f"base model {path}: diffusers needs this model's config files to read a single file offline; "
                "pass a local diffusers folder of the same architecture as `config` (--base-config)"
            ) from None
        raise error
    except SingleFileComponentError as error:  # a checkpoint without the text encoder, VAE or U-Net
        raise CheckpointError(f"base model {path}: {first_line(error)}") from None


def generate(
    base: StableDiffusionPipeline,
    prompt: str,
    controls: Sequence[Control] = (),
    *,
    negative_prompt: str | None = None,
    steps: int = 20,
    guidance_scale: float = 7.5,
    seed: int | None = None,
    scheduler: str = "unipc",
    num_images: int = 1,
    width: int | None = None,
    height: int | None = None,
    resize_mode: str = "resize",
    init_image: Any = None,
    strength: float = 0.75,
    eta: float = 0.0,
    output_type: str = "pil",
) -> GenerationResult:
    """Generate images from a prompt with zero or more controls, on the base's device and dtype.

    Args:
        base: the frozen base (`load_base`, `controlkit.sd_pipelines.pipeline_from_components`, or any diffusers SD pipeline).
        prompt: the text prompt.
        controls: `Control`s; their residuals are summed. Each ControlNet must be on the base's device and dtype
            (`Control.from_pretrained(..., unet=base.unet)` loads it so); it is never moved or converted here.
        negative_prompt: the unconditional side of guidance (default: the empty prompt).
        steps: scheduler steps (img2img runs the last `strength` fraction of them).
        guidance_scale: classifier-free guidance; 1 or less turns it off.
        seed: seed of a CPU `torch.Generator`, so the same seed gives the same image on every device (within
            floating-point tolerance); None draws one (returned in the result).
        scheduler: a name in `controlkit.sampling.SCHEDULERS` (UniPC by default).
        num_images: images per call (one batch).
        width, height: output size in pixels, multiples of 8; a missing side is taken from the first control
            image (else the init image, else the base's default), rounded to a multiple of 8.
        resize_mode: how control and init images of another size are fitted: "resize", "crop" or "fill".
        init_image: a starting image for img2img; None for text-to-image.
        strength: img2img noise strength in (0, 1]; 1 ignores the init image's content.
        eta: DDIM eta (ignored by other schedulers).
        output_type: "pil", "np", "pt" or "latent".

    Nothing passed in is modified (modules, their scheduler, images), and each call has its own scheduler and
    generator, so several threads may generate with one base and the same ControlNets at the same time.
    """
    import torch

    from controlkit.image import load_image
    from controlkit.sampling import denoise, make_scheduler

    _check_options(steps, guidance_scale, num_images, strength, output_type)
    parts = _components(base)
    unet, device, dtype = parts["unet"], parts["unet"].device, parts["unet"].dtype
    maps = [_condition_map(control) for control in controls]
    init = None if init_image is None else load_image(init_image)
    size = _output_size(width, height, maps[0] if maps else init, unet.config.sample_size * base.vae_scale_factor)
    seed = secrets.randbelow(2**32) if seed is None else int(seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    pipe = pipeline_from_components({**parts, "scheduler": make_scheduler(scheduler, parts["scheduler"].config)},
                                    img2img=init is not None)  # this call's own scheduler over the shared modules
    guided = guidance_scale > 1.0
    with torch.no_grad():
        with _PROMPT_LOCK:
            positive, negative = pipe.encode_prompt(prompt, device, num_images, guided, negative_prompt)
        text_embeds = torch.cat([negative, positive]) if guided else positive
        timesteps, latents = _start(pipe, init, size, resize_mode, steps, strength, num_images, text_embeds, generator)
        prepared = [
            _prepare(control, fit_image(image, size, resize_mode), unet, device, dtype, base.vae_scale_factor, index)
            for index, (control, image) in enumerate(zip(controls, maps))
        ]
        step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
        latents = denoise(
            unet, pipe.scheduler, latents, timesteps, text_embeds, [p for p in prepared if p is not None],
            guidance_scale=guidance_scale, step_kwargs=step_kwargs,
        )
        images = _decode(pipe, latents, output_type, generator)
    settings = {
        "prompt": prompt, "negative_prompt": negative_prompt or "", "steps": steps, "guidance_scale": guidance_scale,
        "seed": seed, "scheduler": scheduler, "width": size[0], "height": size[1], "num_images": num_images,
        "strength": strength if init is not None else None, "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
    }
    return GenerationResult(images, seed, settings)


def _check_options(steps: int, guidance_scale: float, num_images: int, strength: float, output_type: str) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"`steps` must be a positive integer, got {steps!r}")
    if not isinstance(num_images, int) or num_images < 1:
        raise ConfigError(f"`num_images` must be a positive integer, got {num_images!r}")
    if not (0.0 < strength <= 1.0):
        raise ConfigError(f"`strength` must be in (0, 1], got {strength!r}")
    if guidance_scale < 0:
        raise ConfigError(f"`guidance_scale` must be >= 0, got {guidance_scale!r}")
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"`output_type` must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")


def _components(base: Any) -> dict[str, Any]:
    components = getattr(base, "components", None)
    missing = [name for name in BASE_COMPONENTS if not components or components.get(name) is None]
    if missing:
        raise ConfigError(
            f"`base` must be a diffusers Stable Diffusion pipeline with {', '.join(BASE_COMPONENTS)}; "
            f"{type(base).__name__} lacks {', '.join(missing)}"
        )
    return {name: components[name] for name in BASE_COMPONENTS}


def _condition_map(control: Control) -> np.ndarray:
    """The control's condition map as RGB uint8 (H, W, 3): the image itself, or the preprocessor's output."""
    from controlkit.image import load_image

    image = load_image(control.image)
    return image if control.preprocessor is None else load_image(control.preprocessor(image))


def _output_size(
    width: int | None, height: int | None, reference: np.ndarray | None, default: int
) -> tuple[int, int]:
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE):
            lower = max(SIZE_MULTIPLE, (value // SIZE_MULTIPLE) * SIZE_MULTIPLE) if isinstance(value, int) else 512
            raise ConfigError(
                f"`{name}` must be a positive multiple of {SIZE_MULTIPLE}, got {value!r}; "
                f"use {lower} or {lower + SIZE_MULTIPLE}"
            )
    ref_h, ref_w = reference.shape[:2] if reference is not None else (default, default)
    return width or _round_side(ref_w), height or _round_side(ref_h)


def _round_side(pixels: int) -> int:
    return max(SIZE_MULTIPLE, int(round(pixels / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def _start(
    pipe: Any, init: np.ndarray | None, size: tuple[int, int], resize_mode: str, steps: int, strength: float,
    num_images: int, text_embeds: torch.Tensor, generator: torch.Generator,
) -> tuple[Any, torch.Tensor]:
    """Timesteps to run and the starting latents: noise (text-to-image) or the noised init image (img2img)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    device, dtype = text_embeds.device, text_embeds.dtype
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device)
    width, height = size
    if init is None:
        channels = pipe.unet.config.in_channels
        return timesteps, pipe.prepare_latents(num_images, channels, height, width, dtype, device, generator)
    timesteps, remaining = pipe.get_timesteps(steps, strength, device)
    if remaining < 1:
        raise ConfigError(f"`strength` {strength} with {steps} steps leaves no step to run; raise either")
    pixels = condition_tensor(fit_image(init, size, resize_mode)) * 2.0 - 1.0  # the VAE takes [-1, 1]
    pixels = pixels.repeat(num_images, 1, 1, 1)
    start = timesteps[:1].repeat(num_images)
    return timesteps, pipe.prepare_latents(pixels, start, num_images, 1, dtype, device, generator)


def _prepare(
    control: Control, condition: np.ndarray, unet: Any, device: Any, dtype: Any, vae_factor: int, index: int
) -> PreparedControl | None:
    """Check the control's ControlNet, then compute its condition embedding (None if scale is 0)."""
    if not any(control.layer_scales()):
        return None  # scale 0: the control is not run at all
    controlnet = control.controlnet
    check_fits(controlnet.state_dict(), controlnet.config, unet, name=f"the ControlNet of control {index + 1}")
    check_placement(controlnet, device, dtype, name=f"the ControlNet of control {index + 1}")
    prepared = prepare_control(control, condition, device, dtype)
    latent_size = (condition.shape[0] // vae_factor, condition.shape[1] // vae_factor)
    if tuple(prepared.embedding.shape[-2:]) != latent_size:
        factor = condition.shape[0] // prepared.embedding.shape[-2]
        raise CheckpointError(
            f"the ControlNet of control {index + 1} downsamples its condition by {factor} but the base's VAE by "
            f"{vae_factor}; use a ControlNet made for this base"
        )
    return prepared


def _decode(pipe: Any, latents: torch.Tensor, output_type: str, generator: torch.Generator) -> Any:
    import torch

    if not torch.isfinite(latents).all():
        raise ControlkitError(
            f"generation produced NaN/inf latents in {latents.dtype}; run in float32 or bfloat16 instead"
        )
    if output_type == "latent":
        return latents
    vae = pipe.vae
    decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]
    if not torch.isfinite(decoded).all():
        raise ControlkitError(
            f"the VAE produced NaN/inf pixels in {decoded.dtype}; decode in float32 (an fp16 VAE overflows)"
        )
    return pipe.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=[True] * len(decoded))
