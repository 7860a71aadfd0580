"""The models of a run: the frozen base parts (in the mixed-precision dtype) and the trained ones (in float32).

`load_components(config, device, weight_dtype)` loads the base model's U-Net, VAE, text encoder, tokenizer and
noise scheduler from a diffusers folder, builds (or loads) the ControlNet, marks what trains, and casts only the
frozen weights to `weight_dtype`: the weights the optimizer updates always stay float32 (diffusers'
`train_controlnet.py` refuses anything else; fp16 master weights lose small updates and fail to unscale).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.errors import ConfigError, WeightsNotFoundError

if TYPE_CHECKING:
    import torch

    from training.config import TrainConfig

#: U-Net parts trained with `model.unlock_decoder` (the original `sd_locked=False`: output_blocks and out).
DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")


@dataclass
class Components:
    """Everything the step needs. `trained` maps names ('controlnet', 'unet', 'text_encoder') to the modules
    whose parameters (those with requires_grad) the optimizer updates."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    controlnet: Any
    trained: dict[str, "torch.nn.Module"]
    base_path: Path


def trained_parameters(trained: dict[str, "torch.nn.Module"]) -> list["torch.nn.Parameter"]:
    """The parameters the optimizer updates: those of the trained modules with requires_grad."""
    return [p for module in trained.values() for p in module.parameters() if p.requires_grad]


def resolve_base(base: str) -> Path:
    """`model.base` as a folder: a short name (`demo`), a path, else a folder of that name in $CONTROLKIT_MODELS."""
    from controlkit.weights import models_dir, resolve_model_name, resolve_weights

    named = resolve_model_name(base, "base")
    if isinstance(named, Path):
        return named
    path = Path(base).expanduser()
    source = path if path.exists() else None
    folder = resolve_weights(
        "base model", source, local_names=[base],
        hint=f"set model.base to a diffusers folder, or put one named {base!r} in {models_dir()}",
    )
    if not (folder / "unet" / "config.json").is_file():
        raise WeightsNotFoundError(f"model.base: {folder} is not a diffusers folder (no unet/config.json)")
    return folder


def load_components(config: "TrainConfig", device: Any, weight_dtype: "torch.dtype") -> Components:
    """Load, freeze, cast and place the models of a run (see the module docstring)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = config.model
    base = resolve_base(model.base)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", use_safetensors=True)
    overrides = {"prediction_type": model.prediction_type} if model.prediction_type else {}
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **overrides)
    if model.kind == "base" and model.from_scratch:
        torch.manual_seed(config.train.seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base, subfolder="unet"))
    else:
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", use_safetensors=True)
    for frozen in (vae, text_encoder, unet):
        frozen.requires_grad_(False)
    controlnet = _controlnet(config, unet, vae) if model.kind == "controlnet" else None
    trained = _mark_trained(config, unet, text_encoder, controlnet)
    for module in (unet, vae, text_encoder, controlnet):
        if module is not None:
            _place(module, device, weight_dtype, channels_last=model.channels_last)
    if model.gradient_checkpointing:
        for module in trained.values():
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            else:
                module.gradient_checkpointing_enable()
    vae.eval()
    return Components(unet, vae, text_encoder, tokenizer, noise_scheduler, controlnet, trained, base)


def _controlnet(config: "TrainConfig", unet: Any, vae: Any) -> Any:
    import torch

    from controlkit.checkpoint import load_controlnet
    from controlkit.controlnet import build_controlnet, conditioning_stages

    if config.model.controlnet:
        controlnet, _ = load_controlnet(config.model.controlnet, unet=unet, torch_dtype=torch.float32)
        if controlnet.config.conditioning_channels != config.model.conditioning_channels:
            raise ConfigError(
                f"`model.conditioning_channels` is {config.model.conditioning_channels} but {config.model.controlnet} "
                f"takes {controlnet.config.conditioning_channels}-channel maps; set it to match"
            )
    else:
        torch.manual_seed(config.train.seed)  # the conditioning encoder is the only randomly initialised part
        controlnet = build_controlnet(unet, conditioning_channels=config.model.conditioning_channels,
                                      conditioning_embedding_out_channels=conditioning_stages(vae))
    controlnet.requires_grad_(True)
    return controlnet.train()


def _mark_trained(config: "TrainConfig", unet: Any, text_encoder: Any, controlnet: Any) -> dict[str, Any]:
    model = config.model
    if model.kind == "base":
        unet.requires_grad_(True)
        trained = {"unet": unet.train()}
        if model.train_text_encoder:
            text_encoder.requires_grad_(True)
            trained["text_encoder"] = text_encoder.train()
        return trained
    trained = {"controlnet": controlnet}
    if model.unlock_decoder:
        for name, parameter in unet.named_parameters():
            parameter.requires_grad_(name.startswith(DECODER_PREFIXES))
        trained["unet"] = unet.train()
    return trained


def _place(module: Any, device: Any, weight_dtype: "torch.dtype", *, channels_last: bool) -> None:
    """Move to `device`; frozen tensors to `weight_dtype`, trained ones to float32."""
    import torch

    module.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    for tensor in list(module.parameters()) + list(module.buffers()):
        dtype = torch.float32 if tensor.requires_grad else weight_dtype
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


def build_optimizer(config: "TrainConfig", parameters: list[Any], device: Any) -> Any:
    """AdamW (fused where the device supports it) or bitsandbytes' 8-bit AdamW."""
    import importlib.util

    import torch

    optim = config.optim
    options = dict(
        lr=optim.learning_rate, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay, eps=optim.epsilon,
    )
    if optim.name == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("optim.name = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes (or use 'adamw')")
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, **options)
    fused = optim.fused and torch.device(device).type in _FUSED_DEVICES
    return torch.optim.AdamW(parameters, fused=fused or None, **options)


#: Device types with a fused AdamW kernel in torch >= 2.4.
_FUSED_DEVICES = ("cuda", "cpu", "mps", "xpu")


def build_lr_scheduler(config: "TrainConfig", optimizer: Any) -> Any:
    from diffusers.optimization import get_scheduler

    schedule = config.schedule
    return get_scheduler(
        schedule.name, optimizer, num_warmup_steps=schedule.warmup_steps, num_training_steps=config.train.max_steps,
        num_cycles=schedule.num_cycles, power=schedule.power,
    )


def build_ema(config: "TrainConfig", parameters: list[Any]) -> Any:
    """diffusers' EMAModel over the trained parameters, or None when EMA is off."""
    if not config.ema.enabled:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(parameters, decay=config.ema.decay, update_after_step=config.ema.update_after_step)
