"""Compiled U-Net and ControlNet forwards for `generate(..., compile=True)`.

Each loaded model is compiled once (torch.compile, the inductor backend; CUDA graphs on GPU) and the compiled
forward is kept for the process, so later generations pay nothing. What changes between generations never
recompiles: a control's scale and per-layer weights enter the compiled ControlNet as a tensor of per-output
multipliers (not as constants, which would be baked into the graph: stable-fast#82, onediff#899), the window and
step reuse only decide whether it is called, and prompts and seeds are tensor values. Graphs are static, one per
batch layout, each compiled the first time it is met and then kept: the ControlNet has one for both guidance
halves and one for the conditional half alone (the `control` mode; a dynamic batch cannot share them, since
torch specialises batch 1), the U-Net one with residuals (some control active) and one without.

The caller's modules are not changed: torch.compile wraps them. ControlNet-Union models run eagerly.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: id(module) -> (module, its compiled forward). The compiled forward holds the module, so entries live as long as
#: the process (`clear` drops them); keyed by id with the module kept beside it, so an id is never reused while
#: its entry exists.
_COMPILED: dict[int, tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def compile_mode(device: Any) -> str:
    """torch.compile's mode: CUDA graphs on GPU (a step's many small kernels launched as one), default on CPU."""
    return "reduce-overhead" if getattr(device, "type", str(device)) == "cuda" else "default"


def compiled_unet(unet: Any) -> Any:
    """The U-Net's compiled forward (called as the U-Net is)."""
    import torch

    return _cached(unet, lambda: torch.compile(unet, mode=compile_mode(unet.device)))


def compiled_controlnet(controlnet: Any) -> Any:
    """A compiled `(sample, timestep, text, embedding, scales, added) -> (down, mid)` for one ControlNet:
    `controlkit.controlnet_forward.controlnet_residuals` with the scales as a (N,) tensor."""
    import torch

    def build() -> Any:
        return torch.compile(_Residuals(controlnet), mode=compile_mode(controlnet.device))

    forward = _cached(controlnet, build)

    def call(sample: torch.Tensor, timestep: Any, text: torch.Tensor, embedding: torch.Tensor,
             scales: torch.Tensor, added: Mapping[str, torch.Tensor] | None) -> Any:
        return forward(sample, timestep, text, embedding, scales, dict(added) if added else None)

    return call


def clear() -> None:
    """Forget every compiled forward (their memory is freed once no generation uses them)."""
    with _LOCK:
        _COMPILED.clear()


def _cached(module: Any, build: Any) -> Any:
    with _LOCK:
        entry = _COMPILED.get(id(module))
        if entry is None or entry[0] is not module:
            entry = (module, build())
            _COMPILED[id(module)] = entry
        return entry[1]


@functools.lru_cache(maxsize=1)
def _residuals_module() -> type:
    import torch

    from controlkit.controlnet_forward import raw_residuals

    class Residuals(torch.nn.Module):
        """A ControlNet's residuals with per-output scales as a tensor input (a wrapper: the ControlNet itself is
        only read)."""

        def __init__(self, controlnet: Any):
            super().__init__()
            self.controlnet = controlnet

        def forward(self, sample, timestep, text, embedding, scales, added):  # noqa: ANN001 -- torch.compile's
            outputs = raw_residuals(self.controlnet, sample, timestep, text, embedding, added)
            outputs = [residual * scales[index] for index, residual in enumerate(outputs)]
            if self.controlnet.config.global_pool_conditions:
                outputs = [torch.mean(residual, dim=(2, 3), keepdim=True) for residual in outputs]
            return outputs[:-1], outputs[-1]

    return Residuals


def _Residuals(controlnet: Any) -> Any:  # noqa: N802 -- a class made on first use (torch imported late)
    return _residuals_module()(controlnet)
