"""ControlNet-Union (xinsir's SDXL Union/ProMax, diffusers' `ControlNetUnionModel`): one model, several control
types, each condition naming its type.

A Union model's forward fuses all its conditions with the latents through a small transformer before its encoder
runs, so it has no per-step-free condition embedding to precompute: its forward is diffusers' own, called once
per step for all the controls that share the model, the window and the per-layer profile (diffusers'
single-model, several-conditions call: each control's scale weights its condition inside the fusion). Controls
on one Union model that differ in those run one forward each, their residuals summed (diffusers'
`MultiControlNetUnionModel`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from controlkit.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: Control type names -> the model's type index (ComfyUI's comfy/cldm/control_types.py, xinsir's model card).
#: Several names share an index: the model was trained on one family of maps for each.
UNION_TYPES: Mapping[str, int] = {
    "openpose": 0, "pose": 0,
    "depth": 1,
    "hed": 2, "softedge": 2, "pidi": 2, "scribble": 2, "ted": 2,
    "canny": 3, "lineart": 3, "anime_lineart": 3, "mlsd": 3,
    "normal": 4,
    "segment": 5,
    "tile": 6,
    "repaint": 7, "inpaint": 7,
}


def is_union(controlnet: Any) -> bool:
    """Whether a ControlNet is a Union model (it has the per-type task embedding)."""
    return hasattr(controlnet, "task_embedding") and hasattr(controlnet, "control_type_proj")


def union_type_index(control_type: Any, controlnet: Any, name: str = "control") -> int:
    """The model's index of `control_type` (a name in `UNION_TYPES`); ConfigError when it is missing, unknown or
    beyond the model's `num_control_type`."""
    if not isinstance(control_type, str) or control_type not in UNION_TYPES:
        raise ConfigError(
            f"{name}: a ControlNet-Union needs `control_type`, one of {', '.join(UNION_TYPES)}; got {control_type!r}"
        )
    index = UNION_TYPES[control_type]
    count = int(controlnet.config.num_control_type)
    if index >= count:
        raise ConfigError(f"{name}: control type {control_type!r} is index {index} but this Union model has "
                          f"{count} types (0..{count - 1})")
    return index


def union_residuals(
    controlnet: Any,
    sample: torch.Tensor,
    timestep: Any,
    text: torch.Tensor,
    added: dict[str, torch.Tensor] | None,
    conditions: Sequence[tuple[torch.Tensor, int, float]],
    profile: Sequence[float],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A Union model's scaled residuals for several conditions in one forward.

    Args:
        sample, timestep, text, added: the step's latents (B, 4, h, w), timestep, prompt embeddings and SDXL
            added embeddings, as the U-Net gets them.
        conditions: (pixels (1, 3, H, W) in [0, 1] at output size, type index, scale) per control.
        profile: per-output multipliers (skip outputs high to low resolution, then the middle) without the
            scale: all 1 in balanced mode.

    Returns:
        (down residuals, middle residual), diffusers' `down_block_res_samples` / `mid_block_res_sample`.
    """
    import torch

    batch = sample.shape[0]
    kinds = torch.zeros(int(controlnet.config.num_control_type))
    kinds[[index for _, index, _ in conditions]] = 1.0
    kinds = kinds.reshape(1, -1).to(sample.device, sample.dtype).repeat(batch, 1)
    alone = len(conditions) == 1  # alone, the model scales its outputs; together, each condition inside
    down, mid = controlnet(
        sample, timestep, encoder_hidden_states=text,
        controlnet_cond=[pixels.expand(batch, -1, -1, -1) for pixels, _, _ in conditions],
        control_type=kinds, control_type_idx=[index for _, index, _ in conditions],
        conditioning_scale=[float(scale) for _, _, scale in conditions] if not alone else [1.0],
        added_cond_kwargs=added, return_dict=False,
    )
    weights = [w * conditions[0][2] for w in profile] if alone else list(profile)
    outputs = [r if w == 1.0 else r * w for r, w in zip([*down, mid], weights)]
    if controlnet.config.global_pool_conditions:
        outputs = [torch.mean(r, dim=(2, 3), keepdim=True) for r in outputs]
    return outputs[:-1], outputs[-1]
