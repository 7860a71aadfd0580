"""Generation: a frozen Stable Diffusion base (SD1.x, SD2.x or SDXL) plus any number of controls.

The base is a diffusers `StableDiffusionPipeline` or `StableDiffusionXLPipeline` (its U-Net, VAE, text
encoder(s), tokenizer(s) and scheduler config; `controlkit.base_families` says which family has which).
`generate` uses diffusers' own pieces for everything around the denoising loop (prompt encoding, initial
latents, img2img noising, timesteps, VAE decoding, post-processing) and runs the loop of `controlkit.sampling`,
which adds what diffusers cannot express (see `controlkit.control`). SDXL's extra inputs (the pooled prompt and
the size/crop micro-conditioning) travel with the prompt embeddings (`controlkit.conditioning`).

Example:
    >>> from controlkit.control import Control
    >>> from controlkit.pipeline import generate, load_base
    >>> base = load_base("models/sd15")                                   # a diffusers folder
    >>> edges = Control.from_pretrained("models/controlnet-canny", "edges.png", unet=base.unet)  # base's dtype
    >>> result = generate(base, "a red house", [edges], steps=20, seed=1)
    >>> result.images[0].save("house.png")
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.base_families import base_components, family_of, pipeline_settings
from controlkit.conditioning import SizeConditioning, encode_conditioning
from controlkit.control import (
    Control,
    PreparedControl,
    check_integer,
    check_placement,
    condition_tensor,
    fit_image,
    prepare_control,
)
from controlkit.controlnet import check_fits
from controlkit.errors import CheckpointError, ConfigError
from controlkit.generation_options import (
    GenerationWarning,
    check_generation_options,
    check_inputs,
    check_working_size,
    generation_defaults,
    native_size,
    output_size,
    size_note,
)
from controlkit.inpainting import check_masking, start_inpainting
from controlkit.pixels import decode, pixel_vae
from controlkit.sampling import MAX_STEPS, run_timesteps
from controlkit.sd_pipelines import pipeline_from_components
from controlkit.sd_pipelines import load_base, quiet_loading  # noqa: F401  public here too (controlkit.load_base)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

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


def generate(
    base: StableDiffusionPipeline,
    prompt: str,
    controls: Sequence[Control] = (),
    *,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    scheduler: str = "unipc",
    num_images: int = 1,
    width: int | None = None,
    height: int | None = None,
    resize_mode: str = "resize",
    init_image: Any = None,
    mask: Any = None,
    keep_unmasked: bool = True,
    strength: float = 0.75,
    eta: float = 0.0,
    output_type: str = "pil",
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    negative_original_size: tuple[int, int] | None = None,
    negative_crops_coords_top_left: tuple[int, int] | None = None,
    negative_target_size: tuple[int, int] | None = None,
    compile: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Generate images from a prompt with zero or more controls, on the base's device and dtype.

    Args:
        base: the frozen base (`load_base`, `controlkit.sd_pipelines.pipeline_from_components`, or any diffusers
            SD or SDXL pipeline).
        prompt: the text prompt.
        controls: `Control`s; their residuals are summed. Each ControlNet must be on the base's device and dtype
            (`Control.from_pretrained(..., unet=base.unet)` loads it so); it is never moved or converted here.
        negative_prompt: the unconditional side of guidance (default: the empty prompt).
        steps: scheduler steps, 1..999 (img2img runs the last `strength` fraction of them); default: what the
            base records (`SETTINGS_FILE`; the demo base: 20), else 20.
        guidance_scale: classifier-free guidance, finite and >= 0; 1 or less turns it off; default: what the base
            records (the demo base: 2), else the family's (7.5 for SD1.x/SD2.x, 5 for SDXL).
        seed: seed of a CPU `torch.Generator`, an integer in 0..2**64-1, so the same seed gives the same image on
            every device (within floating-point tolerance); None draws one (returned in the result).
        scheduler: a name in `controlkit.sampling.SCHEDULERS` (UniPC by default).
        num_images: images per call (one batch); num_images x width x height is at most `MAX_BATCH_PIXELS`.
        width, height: output size in pixels, multiples of 8, at most `MAX_IMAGE_PIXELS` together; a missing side
            is taken from the first control image (else the init image, else the base's native size), rounded to
            a multiple of 8. A size far from the base's native one (over 2x the area, or under half) warns
            (`GenerationWarning`).
        resize_mode: how control and init images of another size are fitted: "resize", "crop" or "fill".
        init_image: a starting image for img2img; None for text-to-image.
        mask: inpainting (`controlkit.inpainting`): an image, white where `init_image` is repainted and black
            where it is kept (grey >= 128 repaints), fitted to the output size as the init image is. Controls
            whose preprocessor takes a mask (the "inpaint" entry) get it too. With strength 1 (diffusers'
            inpaint default) the masked region starts from pure noise.
        keep_unmasked: with a mask, put the init image's own pixels back outside it (default); False returns
            the decoded image everywhere, as diffusers' inpaint pipelines do.
        strength: img2img noise strength in (0, 1]; 1 ignores the init image's content.
        eta: DDIM eta in [0, 1] (ignored by other schedulers).
        output_type: "pil", "np", "pt" or "latent".
        original_size, crops_coords_top_left, target_size: SDXL's micro-conditioning, as diffusers takes it:
            (height, width) the image is said to have had and to be made at (default: the output size), and the
            (top, left) of the crop it is said to be (default (0, 0)); integers, sizes 1..16384. SDXL only.
        negative_original_size, negative_crops_coords_top_left, negative_target_size: the same for the
            unconditional side of guidance (default: the positive side's values). SDXL only.
        compile: run the U-Net and ControlNets compiled (`controlkit.compiled`: torch.compile once per loaded
            model, then reused; the first call pays the compilation). Equal to eager within float rounding.
        on_step: called as on_step(steps done, steps in all) after each denoising step, on the calling thread
            (a progress bar); img2img counts the steps it runs.

    Every option is checked (`check_generation_options`) before any model runs or any latent is allocated.
    Nothing passed in is modified (modules, their scheduler, images), and each call has its own scheduler and
    generator, so several threads may generate with one base and the same ControlNets at the same time.
    """
    import torch

    from controlkit.image import load_image
    from controlkit.sampling import denoise, make_scheduler

    if not isinstance(compile, bool):
        raise ConfigError(f"`compile` must be True or False, got {compile!r}")
    check_masking(mask, init_image, keep_unmasked)
    defaults = generation_defaults(base)
    steps = defaults["steps"] if steps is None else steps
    guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    check_generation_options(steps=steps, guidance_scale=guidance_scale, seed=seed, num_images=num_images,
                             width=width, height=height, strength=strength, eta=eta, output_type=output_type,
                             resize_mode=resize_mode)
    sizes = SizeConditioning(original_size, crops_coords_top_left, target_size, negative_original_size,
                             negative_crops_coords_top_left, negative_target_size)
    family = family_of(base)
    parts = base_components(base, family)
    unet, device, dtype = parts["unet"], parts["unet"].device, parts["unet"].dtype
    train_steps = int(parts["scheduler"].config.get("num_train_timesteps", MAX_STEPS + 1))
    check_integer(steps, "`steps`", 1, min(MAX_STEPS, train_steps - 1), " (fewer than the base's training timesteps)")
    scheduler_object = make_scheduler(scheduler, parts["scheduler"].config)
    controls = check_inputs(prompt, negative_prompt, controls)
    pictures = [_read_control_image(control) for control in controls]
    init = None if init_image is None else load_image(init_image)
    native = native_size(base)
    reference, origin = (pictures[0], "the first control image's") if pictures else (init, "the init image's")
    size = output_size(width, height, None if reference is None else reference.shape[:2], native)
    if width and height:
        origin = ""
    elif reference is None:
        origin = "the base's native"
    check_working_size(size, num_images, origin=origin)  # before a preprocessor runs on a huge image
    mask_grey = None if mask is None else _fitted_mask(mask, size, resize_mode)
    maps = [_condition_map(control, picture, mask) for control, picture in zip(controls, pictures)]
    note = size_note(size, native)
    if note:
        warnings.warn(note, GenerationWarning, stacklevel=2)
    seed = secrets.randbelow(2**32) if seed is None else int(seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    # this call's own scheduler over the shared modules (and a float32 VAE where the family needs one)
    pipe = pipeline_from_components({**parts, "scheduler": scheduler_object, "vae": pixel_vae(parts["vae"], family)},
                                    img2img=init is not None, inpaint=mask is not None,
                                    settings=pipeline_settings(base, family))
    guided = guidance_scale > 1.0
    with torch.no_grad():
        with _PROMPT_LOCK:
            conditioning = encode_conditioning(pipe, family, prompt, negative_prompt, num_images, guided, size, sizes)
        masking = None
        if mask_grey is None:
            timesteps, latents = _start(pipe, init, size, resize_mode, steps, strength, num_images,
                                        conditioning.text, generator)
        else:
            timesteps, latents, masking = start_inpainting(pipe, fit_image(init, size, resize_mode), mask_grey, steps,
                                                           strength, num_images, conditioning.text, generator, guided)
        prepared = [
            _prepare(control, fit_image(image, size, resize_mode), unet, device, dtype, base.vae_scale_factor, index,
                     num_images * (2 if guided and not control.conditional_side_only else 1))
            for index, (control, image) in enumerate(zip(controls, maps))
        ]
        step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
        running = [p for p in prepared if p is not None]  # scale 0: not run at all
        if compile:
            _use_compiled(running, device)
        latents = denoise(
            _compiled_unet(unet) if compile else unet, pipe.scheduler, latents, timesteps, conditioning, running,
            guidance_scale=guidance_scale, step_kwargs=step_kwargs, on_step=on_step, masking=masking,
        )
        images = decode(pipe, latents, output_type, generator)
        if masking is not None and keep_unmasked:
            images = masking.paste(images, output_type)
    settings = {
        "prompt": prompt, "negative_prompt": negative_prompt or "", "steps": steps, "guidance_scale": guidance_scale,
        "seed": seed, "scheduler": scheduler, "width": size[0], "height": size[1], "num_images": num_images,
        "strength": strength if init is not None else None, "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
    }
    if family.pooled:
        settings.update({key: list(value) if value is not None else None for key, value in vars(sizes).items()})
    if compile:
        settings["compile"] = True
    if mask is not None:
        settings.update(mask=True, keep_unmasked=keep_unmasked)
    return GenerationResult(images, seed, settings)


def _compiled_unet(unet: Any) -> Any:
    from controlkit.compiled import compiled_unet

    return compiled_unet(unet)


def _use_compiled(prepared: list[PreparedControl], device: Any) -> None:
    """Give each prepared control its ControlNet's compiled forward and its scales as a tensor (Union: eager)."""
    import torch

    from controlkit.compiled import compiled_controlnet
    from controlkit.union import is_union

    for item in prepared:
        if not is_union(item.control.controlnet):
            item.compiled = compiled_controlnet(item.control.controlnet)
            item.scale_tensor = torch.tensor(item.scales, dtype=torch.float32, device=device)


def _read_control_image(control: Control) -> np.ndarray:
    """A control's image: a condition map keeps its masked region (`load_condition`), as does the photo of a
    preprocessor that reads masks; other photos are read as photos (`load_image`)."""
    from controlkit.image import load_condition, load_image

    takes_mask = control.preprocessor is None or getattr(control.preprocessor, "takes_mask", False)
    return (load_condition if takes_mask else load_image)(control.image)


def _condition_map(control: Control, image: np.ndarray, mask: Any) -> np.ndarray:
    """The control's condition map, uint8 (H, W, 3), or (H, W, 4) with a masked region: the image itself, or the
    preprocessor's output (given the generation's `mask` when it takes one)."""
    from controlkit.image import load_condition

    if control.preprocessor is None:
        return image
    if mask is not None and getattr(control.preprocessor, "takes_mask", False):
        return load_condition(control.preprocessor(image, mask=mask))
    return load_condition(control.preprocessor(image))


def _fitted_mask(mask: Any, size: tuple[int, int], resize_mode: str) -> np.ndarray:
    """The mask as grey uint8 (H, W) at the output size, fitted as the init image is; ConfigError if it repaints
    nothing."""
    from controlkit.masks import check_repaints, load_mask

    grey = fit_image(load_mask(mask)[..., None], size, resize_mode)[..., 0]
    check_repaints(grey)
    return grey


def _start(
    pipe: Any, init: np.ndarray | None, size: tuple[int, int], resize_mode: str, steps: int, strength: float,
    num_images: int, text_embeds: torch.Tensor, generator: torch.Generator,
) -> tuple[Any, torch.Tensor]:
    """Timesteps to run and the starting latents: noise (text-to-image) or the noised init image (img2img)."""
    device, dtype = text_embeds.device, text_embeds.dtype
    timesteps = run_timesteps(pipe, steps, None if init is None else strength)
    width, height = size
    if init is None:
        channels = pipe.unet.config.in_channels
        return timesteps, pipe.prepare_latents(num_images, channels, height, width, dtype, device, generator)
    pixels = condition_tensor(fit_image(init, size, resize_mode)) * 2.0 - 1.0  # the VAE takes [-1, 1]
    pixels = pixels.expand(num_images, -1, -1, -1)  # a view: one image keeps diffusers' memory layout (and bits)
    start = timesteps[:1].repeat(num_images)
    # in the VAE's dtype: SDXL's prepare_latents would otherwise convert a float32 VAE to `dtype` in place
    latents = pipe.prepare_latents(pixels, start, num_images, 1, pipe.vae.dtype, device, generator)
    return timesteps, latents.to(dtype)


def _prepare(
    control: Control, condition: np.ndarray, unet: Any, device: Any, dtype: Any, vae_factor: int, index: int,
    batch: int,
) -> PreparedControl | None:
    """Check the control's ControlNet, then compute its condition embedding (None if scale is 0)."""
    if not any(control.layer_scales()):
        return None  # scale 0: the control is not run at all
    controlnet = control.controlnet
    check_fits(controlnet.state_dict(), controlnet.config, unet, name=f"the ControlNet of control {index + 1}")
    check_placement(controlnet, device, dtype, name=f"the ControlNet of control {index + 1}")
    factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)  # one stride-2 conv a stage
    if factor != vae_factor:
        raise CheckpointError(
            f"the ControlNet of control {index + 1} downsamples its condition by {factor} but the base's VAE by "
            f"{vae_factor}; use a ControlNet made for this base"
        )
    return prepare_control(control, condition, device, dtype, batch)


def output_paths(output: str | os.PathLike, num_images: int, what: str = "output") -> list[Path]:
    """OUT.png for one image, OUT-0.png, OUT-1.png, ... for several, each checked writable before any work
    (OutputError naming `what`, e.g. "-o", otherwise)."""
    from controlkit.files import check_output_file

    target = check_output_file(output, what, suffix=".png")
    if num_images == 1:
        return [target]
    paths = [target.with_name(f"{target.stem}-{index}.png") for index in range(num_images)]
    for path in paths:
        check_output_file(path, what, suffix=".png")
    return paths


def save_images(images: list[Any], paths: list[Path], record: dict[str, Any]) -> list[Path]:
    """Write each PIL image to its path as PNG, whole or not at all (`record`, e.g. the settings, goes into a
    "controlkit" text chunk as JSON); returns the paths written. A failed write (a full disk) does not stop the
    others: those written are kept, and one OutputError line says which were written and why the others failed."""
    from PIL.PngImagePlugin import PngInfo

    from controlkit.errors import OutputError
    from controlkit.files import atomic_path

    info = PngInfo()
    info.add_text("controlkit", json.dumps(record, sort_keys=True))
    written, failed = [], []
    for image, path in zip(images, paths):
        try:
            with atomic_path(path) as temporary:
                image.save(temporary, format="PNG", pnginfo=info)
            written.append(path)
        except OutputError as error:
            failed.append(str(error))
    if failed:
        kept = f"{len(written)} of {len(paths)} written ({', '.join(str(p) for p in written)})" if written else \
            "no image written"
        raise OutputError(f"{kept}; {failed[0]}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
    return written
