"""One training step's math: noise the latents, predict with the (controlled) U-Net, and score the prediction.

    loss = || unet(x_t, t, text, + controlnet(x_t, t, text, condition)) - target ||^2

where x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise and the target is the noise (epsilon prediction) or the
velocity sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (v-prediction), picked by the noise scheduler's
`prediction_type` as in diffusers' trainers. The ControlNet's 13 outputs (SD1.x) are added to the U-Net's 12
skip connections and its middle block (Zhang, Rao & Agrawala, arXiv 2302.05543, eq. 3); with `only_mid_control`
only the middle one is (the original `only_mid_control`). An SDXL base's U-Net and its ControlNet both also take
the pooled prompt and the sample's size/crop numbers (`added_cond_kwargs`, as in diffusers'
`train_controlnet_sdxl.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class StepInputs:
    """A micro-batch, ready for the networks (B samples, latent side h, width D of the text encoder).

    Attributes:
        latents: (B, 4, h, w) float32 clean latents, already scaled by the VAE's scaling factor.
        text_embeds: (B, 77, D) encoder hidden states.
        condition: (B, C, H, W) float condition maps in [0, 1] (None for the base model).
        noise: (B, 4, h, w) standard normal; timesteps: (B,) int64 in [0, num_train_timesteps).
        weights: (B,) float per-sample loss weights (1; 0 for stand-ins of a skipped batch).
        added: SDXL's added conditioning, None for SD1.x/SD2.x: "text_embeds", the pooled prompt (B, P), and
            "time_ids" (B, 6) float32: original (height, width), crop (top, left), target (height, width) in pixels.
    """

    latents: "torch.Tensor"
    text_embeds: "torch.Tensor"
    condition: "torch.Tensor | None"
    noise: "torch.Tensor"
    timesteps: "torch.Tensor"
    weights: "torch.Tensor"
    added: "dict[str, torch.Tensor] | None" = None


def prediction_target(noise_scheduler: Any, latents: "torch.Tensor", noise: "torch.Tensor", timesteps: "torch.Tensor"):
    """What the U-Net is trained to output, by the scheduler's `prediction_type`.

    Raises:
        ValueError: a prediction type other than 'epsilon' and 'v_prediction'.
    """
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"Unknown prediction type {prediction_type!r} of the noise scheduler; the trainer supports 'epsilon' and "
        "'v_prediction' (set model.prediction_type)"
    )


def predict(
    unet: Any, controlnet: Any, noisy_latents: "torch.Tensor", inputs: StepInputs, *, only_mid_control: bool = False,
    unet_dtype: "torch.dtype | None" = None,
) -> "torch.Tensor":
    """The U-Net's prediction for `noisy_latents`, with the ControlNet's residuals when there is a ControlNet.

    `unet_dtype`: the frozen U-Net's weight dtype (mixed precision); its inputs, the ControlNet's residuals
    included, are cast to it, as in diffusers' train_controlnet.py.
    """
    dtype = unet_dtype or noisy_latents.dtype
    unet_latents, unet_text = noisy_latents.to(dtype), inputs.text_embeds.to(dtype)
    unet_added = _in_dtype(inputs.added, dtype)
    if controlnet is None:
        return unet(unet_latents, inputs.timesteps, encoder_hidden_states=unet_text, added_cond_kwargs=unet_added,
                    return_dict=False)[0]
    # 1. The trainable copy of the encoder sees the noisy latents, the caption (and SDXL's added conditioning) and
    #    the condition map.
    down_residuals, mid_residual = controlnet(
        noisy_latents, inputs.timesteps, encoder_hidden_states=inputs.text_embeds,
        controlnet_cond=inputs.condition, added_cond_kwargs=inputs.added, return_dict=False,
    )
    # 2. only_mid_control keeps the skip residuals out of the U-Net. They are multiplied by zero rather than
    #    dropped so that every parameter stays in the graph (distributed data parallel expects gradients for all).
    if only_mid_control:
        down_residuals = [residual * 0.0 for residual in down_residuals]
    # 3. The frozen U-Net adds them to its skip connections and middle block.
    return unet(
        unet_latents, inputs.timesteps, encoder_hidden_states=unet_text, added_cond_kwargs=unet_added,
        down_block_additional_residuals=[residual.to(dtype) for residual in down_residuals],
        mid_block_additional_residual=mid_residual.to(dtype), return_dict=False,
    )[0]


def _in_dtype(added: "dict[str, torch.Tensor] | None", dtype: "torch.dtype") -> "dict[str, torch.Tensor] | None":
    return None if added is None else {key: value.to(dtype) for key, value in added.items()}


def training_loss(
    unet: Any, controlnet: Any, noise_scheduler: Any, inputs: StepInputs, *, only_mid_control: bool = False,
    unet_dtype: "torch.dtype | None" = None,
) -> "torch.Tensor":
    """Weighted mean squared error of the prediction (a 0-dim float32 tensor)."""
    noisy_latents = noise_scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps)
    target = prediction_target(noise_scheduler, inputs.latents, inputs.noise, inputs.timesteps)
    prediction = predict(unet, controlnet, noisy_latents, inputs, only_mid_control=only_mid_control,
                         unet_dtype=unet_dtype)
    per_sample = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * inputs.weights).sum() / inputs.weights.sum().clamp(min=1.0)
