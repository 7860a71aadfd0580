"""The denoising loop and the schedulers it can use by name.

The loop is the one piece of diffusers' `StableDiffusionControlNetPipeline.__call__` that cannot be composed:
controls with different modes, per-layer scales, skipped windows and a once-per-generation condition embedding
all change what happens inside a step. Everything around it (prompt encoding, latents, timesteps, decoding) is
diffusers' own code, called from `controlkit.pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from controlkit.control import PreparedControl
from controlkit.residuals import control_residuals
from controlkit.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DConditionModel

    from controlkit.conditioning import Conditioning

#: Scheduler names -> (diffusers class, config overrides). Each is built with `from_config` from the base's
#: scheduler config, so the base's noise schedule (betas, prediction type) is kept.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}
DEFAULT_SCHEDULER = "unipc"
#: Most denoising steps: one less than SD's 1000 training timesteps. With as many steps as training timesteps,
#: UniPC, DDIM and DPM++ step past the end of their schedules (an IndexError or assertion deep in diffusers), and
#: more would repeat timesteps; a base trained with fewer timesteps lowers the bound to its count less one.
MAX_STEPS = 999
#: Largest seed: `torch.Generator.manual_seed` takes 64-bit unsigned values (negative ones wrap around to them).
MAX_SEED = 2**64 - 1
#: What generation uses when neither the caller nor the base (the settings its folder records) says otherwise.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5  # SD1.x/SD2.x; each base family has its own (`controlkit.base_families`)


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler `name` (see `SCHEDULERS`) with the base model's noise schedule.

    A new object per generation: schedulers keep per-run state (timesteps, step index), and the base's own
    scheduler is never modified.
    """
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; available: {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


def run_timesteps(pipe: Any, steps: int, strength: float | None = None) -> Any:
    """The timesteps a run goes through: all `steps` of `pipe.scheduler` (set on it), or with `strength` (img2img,
    inpainting) the last `strength` fraction of them, as diffusers' pipelines take them; ConfigError when that
    leaves none."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    device = pipe.unet.device
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device)
    if strength is None:
        return timesteps
    timesteps, remaining = pipe.get_timesteps(steps, strength, device)
    if remaining < 1:
        raise ConfigError(f"`strength` {strength} with {steps} steps leaves no step to run; raise either")
    return timesteps


def denoise(
    unet: UNet2DConditionModel,
    scheduler: Any,
    latents: torch.Tensor,
    timesteps: Sequence[Any],
    conditioning: Conditioning,
    controls: Sequence[PreparedControl],
    *,
    guidance_scale: float,
    step_kwargs: dict[str, Any],
    on_step: Callable[[int, int], None] | None = None,
    masking: Any = None,
) -> torch.Tensor:
    """Run the denoising steps and return the final latents.

    Args:
        latents: (B, 4, h, w) starting latents (already scaled by the scheduler's initial sigma).
        timesteps: the scheduler's timesteps to run (all of them, or the tail for img2img).
        conditioning: the prompt embeddings (2B, 77, D) [negative; positive] when guidance_scale > 1, else
            (B, 77, D), and SDXL's pooled/size embeddings in the same layout (`controlkit.conditioning`).
        controls: prepared controls (their residuals are summed into the U-Net's skips).
        step_kwargs: extra `scheduler.step` arguments (eta, generator) from diffusers' `prepare_extra_step_kwargs`.
        on_step: called as on_step(steps done, steps in all) after each step (a progress bar).
        masking: inpainting (a `controlkit.inpainting.Masking`, which imports this module): the mask and masked
            latents join an inpainting U-Net's input, and a plain base's kept region is blended back after each step.
    """
    import torch

    guided = guidance_scale > 1.0
    for step, timestep in enumerate(timesteps):
        # 1. both guidance halves in one batch, scaled as the scheduler wants its input
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, timestep)
        # 2. the controls' residuals (None when no control acts at this step: then the U-Net runs plain)
        down, mid = control_residuals(
            controls, model_input, timestep, conditioning, step=step, num_steps=len(timesteps), guided=guided
        )
        # 3. the frozen U-Net with the residuals added to its skip connections and middle block
        noise = unet(
            model_input if masking is None else masking.unet_input(model_input), timestep, encoder_hidden_states=conditioning.text, added_cond_kwargs=conditioning.added,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
        )[0]
        # 4. classifier-free guidance
        if guided:
            unconditional, conditional = noise.chunk(2)
            noise = unconditional + guidance_scale * (conditional - unconditional)
        # 5. one scheduler step x_t -> x_{t-1}
        latents = scheduler.step(noise, timestep, latents, **step_kwargs, return_dict=False)[0]
        if masking is not None:
            latents = masking.blend(latents, step, scheduler)
        if on_step is not None:
            on_step(step + 1, len(timesteps))
    return latents
