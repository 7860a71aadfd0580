"""The residuals all controls feed the U-Net at one denoising step: each ControlNet's forward (or one shared
forward for the controls of one Union model, `controlkit.union`), on the guidance side it acts on, summed.

Step reuse (`Control.every`): a ControlNet that is not due at a step adds the residuals of its last forward
again instead of running (its scales are fixed, so they are the same residuals it would scale), trading a
measured amount of control for its share of the step time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from controlkit.control import PreparedControl

if TYPE_CHECKING:
    import torch


def control_residuals(
    controls: Sequence[PreparedControl],
    model_input: torch.Tensor,
    timestep: torch.Tensor,
    conditioning: Any,
    *,
    step: int,
    num_steps: int,
    guided: bool,
) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """Summed, scaled residuals of the controls active at this step, for the U-Net's skips and middle block.

    Args:
        model_input: scaled latents (2B, 4, h, w) when `guided` ([unconditional; conditional]), else (B, 4, h, w).
        conditioning: a `controlkit.conditioning.Conditioning`: prompt embeddings (and SDXL's pooled/size
            embeddings) in the same batch layout.
        step, num_steps: position in the schedule, for the start/end windows.
        guided: classifier-free guidance is on (the batch holds both halves).

    Returns:
        (down residuals, middle residual) in diffusers' `down_block_additional_residuals` /
        `mid_block_additional_residual` form, or (None, None) when no control acts at this step.
    """
    total: list[torch.Tensor] | None = None
    active = [p for p in controls if p.control.active_at(step, num_steps) and any(p.scales)]
    for group in _forward_groups(active, guided):
        outputs = _reusable(group, step, num_steps)
        if outputs is None:
            outputs = _run_group(group, model_input, timestep, conditioning, guided)
            group[0].reused = (tuple(id(p) for p in group), outputs)
        total = outputs if total is None else [a + b for a, b in zip(total, outputs)]
    if total is None:
        return None, None
    return total[:-1], total[-1]


def _forward_groups(active: Sequence[PreparedControl], guided: bool) -> list[list[PreparedControl]]:
    """The ControlNet forwards of a step, in the controls' order: one per control, except that controls on the
    same Union model with the same guidance side and per-layer profile share one (`controlkit.union`)."""
    from controlkit.union import is_union

    groups: dict[Any, list[PreparedControl]] = {}
    for index, prepared in enumerate(active):
        control = prepared.control
        key: Any = index
        if is_union(control.controlnet):
            key = (id(control.controlnet), guided and control.conditional_side_only, tuple(control.layer_profile()))
        groups.setdefault(key, []).append(prepared)
    return list(groups.values())


def _reusable(group: Sequence[PreparedControl], step: int, num_steps: int) -> list[torch.Tensor] | None:
    """The group's last residuals when no control of it is due to run at `step` (`Control.every`), else None."""
    kept = group[0].reused
    if kept is None or kept[0] != tuple(id(p) for p in group):
        return None
    if any(p.control.runs_at(step, num_steps) for p in group):
        return None
    return kept[1]


def _run_group(
    group: Sequence[PreparedControl], model_input: torch.Tensor, timestep: Any, conditioning: Any, guided: bool
) -> list[torch.Tensor]:
    """One forward's residuals, in the full batch's layout (zeros on the unconditional half when the group acts
    on the conditional side only, as diffusers' guess mode)."""
    import torch

    half = guided and group[0].control.conditional_side_only
    sample = model_input.chunk(2)[1] if half else model_input
    side = conditioning.conditional_half() if half else conditioning
    down, mid = _group_residuals(group, sample, timestep, side)
    outputs = [*down, mid]
    if half:
        outputs = [torch.cat([torch.zeros_like(r), r]) for r in outputs]
    return outputs


def _group_residuals(
    group: Sequence[PreparedControl], sample: torch.Tensor, timestep: Any, side: Any
) -> tuple[list[torch.Tensor], torch.Tensor]:
    from controlkit.controlnet_forward import controlnet_residuals
    from controlkit.union import is_union, union_residuals, union_type_index

    first = group[0]
    controlnet = first.control.controlnet
    if first.compiled is not None:
        return first.compiled(sample, timestep, side.text, first.embedding, first.scale_tensor, side.added)
    if not is_union(controlnet):
        return controlnet_residuals(controlnet, sample, timestep, side.text, first.embedding, first.scales,
                                    added_cond_kwargs=side.added)
    conditions = [(p.embedding, union_type_index(p.control.control_type, controlnet), p.control.scale)
                  for p in group]
    return union_residuals(controlnet, sample, timestep, side.text, side.added, conditions,
                           first.control.layer_profile())
