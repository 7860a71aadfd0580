"""A ControlNet's forward pass from a condition embedding computed beforehand, reading the model only.

diffusers' `ControlNetModel.forward` runs the conditioning encoder on the condition map at every call, although
the map is the same at every step. Generation computes the embedding once (`controlkit.control.prepare_control`)
and runs the rest of the network here, from the ControlNet's own sub-modules, in diffusers' order: time (and
added) embedding, input convolution plus the embedding, down blocks, middle block, zero convolutions, scales,
global pooling. The residuals equal diffusers' bit for bit (tests/test_controlnet_forward.py), and nothing of the
model is replaced or moved, so one ControlNet can serve several generations at the same time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from controlkit.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from diffusers import ControlNetModel


def controlnet_residuals(
    controlnet: ControlNetModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float,
    encoder_hidden_states: torch.Tensor,
    embedding: torch.Tensor,
    scales: Sequence[float],
    *,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The ControlNet's scaled residuals for the U-Net's skip connections and middle block.

    Args:
        controlnet: a diffusers `ControlNetModel` (or a `torch.compile` wrapper of one; its sub-modules run eagerly).
        sample: scaled latents (B, 4, h, w), as the U-Net gets them.
        timestep: the scheduler's timestep: a 0-d tensor, a (B,) tensor, or a number.
        encoder_hidden_states: prompt embeddings (B, 77, D).
        embedding: the conditioning encoder's output for the condition map, (1 or B, C, h, w) at latent size, in
            RGB channel order already (a "bgr" ControlNet's flip is done before the encoder).
        scales: one multiplier per output (skip outputs high to low resolution, then the middle block); diffusers'
            `conditioning_scale` is the flat case and its guess mode the `torch.logspace(-1, 0, N)` profile.
        added_cond_kwargs: SDXL's "text_embeds" and "time_ids" for a ControlNet with `addition_embed_type`
            "text_time", as diffusers takes them.

    Returns:
        (down residuals, middle residual): diffusers' `down_block_res_samples` / `mid_block_res_sample`.
    """
    outputs = raw_residuals(controlnet, sample, timestep, encoder_hidden_states, embedding, added_cond_kwargs)
    return _scaled_and_pooled(controlnet, outputs, scales)


def raw_residuals(
    controlnet: ControlNetModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float,
    encoder_hidden_states: torch.Tensor,
    embedding: torch.Tensor,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The ControlNet's outputs before scales and pooling: the zero convolutions' outputs, skips high to low
    resolution, then the middle block (arguments as `controlnet_residuals`)."""
    emb = _step_embedding(controlnet, sample, timestep, encoder_hidden_states, added_cond_kwargs)
    hidden = controlnet.conv_in(sample) + embedding
    skips = [hidden]
    for block in controlnet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, outputs = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, outputs = block(hidden_states=hidden, temb=emb)
        skips.extend(outputs)
    middle = controlnet.mid_block
    if middle is not None:
        if getattr(middle, "has_cross_attention", False):
            hidden = middle(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden = middle(hidden, emb)
    residuals = [conv(skip) for skip, conv in zip(skips, controlnet.controlnet_down_blocks)]
    residuals.append(controlnet.controlnet_mid_block(hidden))
    return residuals


def _step_embedding(
    controlnet: Any, sample: torch.Tensor, timestep: Any, text: torch.Tensor,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    """The (B, time_embed_dim) embedding the ResNet blocks take: timestep, plus SDXL's text/size embedding."""
    import torch

    if getattr(controlnet, "class_embedding", None) is not None:
        raise ConfigError("ControlNets with class embeddings (`class_embed_type`) are not supported")
    timesteps = _timestep_batch(timestep, sample)
    # time_proj returns float32 whatever the model's dtype; the embedding MLP runs in the sample's dtype
    emb = controlnet.time_embedding(controlnet.time_proj(timesteps).to(dtype=sample.dtype))
    kind = controlnet.config.addition_embed_type
    if kind == "text":
        emb = emb + controlnet.add_embedding(text)
    elif kind == "text_time":
        missing = [key for key in ("text_embeds", "time_ids") if key not in (added_cond_kwargs or {})]
        if missing:
            raise ConfigError(
                f"this ControlNet (addition_embed_type 'text_time', SDXL) needs {' and '.join(missing)} in "
                "`added_cond_kwargs`"
            )
        pooled, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        sizes = controlnet.add_time_proj(time_ids.flatten()).reshape((pooled.shape[0], -1))
        emb = emb + controlnet.add_embedding(torch.concat([pooled, sizes], dim=-1).to(emb.dtype))
    return emb


def _timestep_batch(timestep: Any, sample: torch.Tensor) -> torch.Tensor:
    """The timestep as a (B,) tensor on the sample's device; numbers become float64/int64 as in diffusers
    (float32/int32 on Apple's mps, which has no 64-bit types)."""
    import torch

    if torch.is_tensor(timestep):
        timesteps = timestep[None].to(sample.device) if timestep.ndim == 0 else timestep
    else:
        wide = isinstance(timestep, float)
        if sample.device.type == "mps":
            dtype = torch.float32 if wide else torch.int32
        else:
            dtype = torch.float64 if wide else torch.int64
        timesteps = torch.tensor([timestep], dtype=dtype, device=sample.device)
    return timesteps.expand(sample.shape[0])


def _scaled_and_pooled(
    controlnet: Any, residuals: list[torch.Tensor], scales: Sequence[float]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each output times its scale, then (1.1 shuffle: `global_pool_conditions`) averaged over space, in
    diffusers' order. A scale of exactly 1 is skipped: x * 1.0 == x in floating point."""
    import torch

    if len(scales) != len(residuals):
        raise ConfigError(f"{len(scales)} scales for a ControlNet with {len(residuals)} outputs")
    scaled = [r if s == 1.0 else r * s for r, s in zip(residuals, scales)]
    if controlnet.config.global_pool_conditions:
        scaled = [torch.mean(r, dim=(2, 3), keepdim=True) for r in scaled]
    return scaled[:-1], scaled[-1]
