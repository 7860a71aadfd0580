"""The models of a run: the frozen base parts (in the mixed-precision dtype) and the trained ones (in float32).

`load_components(config, device, weight_dtype)` loads the base model's modules from a diffusers folder (those of
its family, `controlkit.base_families`, named by its model_index.json: U-Net, VAE, text encoder and tokenizer, and
for SDXL the second text encoder and tokenizer) and the noise scheduler, builds (or loads) the ControlNet, marks
what trains, and casts only the frozen weights to `weight_dtype`: the weights the optimizer updates always stay
float32 (diffusers' `train_controlnet.py` refuses anything else; fp16 master weights lose small updates and fail
to unscale). A family's VAE that overflows in float16 (`BaseFamily.upcast_vae`, SDXL's) stays float32 with fp16,
as in diffusers' `train_controlnet_sdxl.py`, so its latents are never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.base_families import SD, BaseFamily
from controlkit.errors import ConfigError, WeightsNotFoundError, first_line

if TYPE_CHECKING:
    import torch

    from training.config import TrainConfig

#: U-Net parts trained with `model.unlock_decoder` (the original `sd_locked=False`: output_blocks and out).
DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")
#: transformers classes of the text modules, where a base's model_index.json does not name them.
TEXT_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection",
                "tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer"}


@dataclass
class Components:
    """Everything the step needs. `trained` maps names ('controlnet', 'unet', 'text_encoder') to the modules
    whose parameters (those with requires_grad) the optimizer updates.

    Attributes:
        text_encoder_2, tokenizer_2: SDXL's second text encoder (frozen) and its tokenizer; None for SD1.x/SD2.x.
        family: the base's family (from its model_index.json).
        weight_dtype: the dtype of the frozen modules (the VAE may stay float32: see the module docstring).
        settings: the family's pipeline config values the base folder records (SDXL's
            `force_zeros_for_empty_prompt`), for pipelines built over these modules.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    controlnet: Any
    trained: dict[str, "torch.nn.Module"]
    base_path: Path
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    family: BaseFamily = SD
    weight_dtype: Any = None
    settings: dict[str, Any] = field(default_factory=dict)

    def base_modules(self, **replaced: Any) -> dict[str, Any]:
        """The family's modules by diffusers' names (the noise scheduler as 'scheduler'), with `replaced` ones
        instead: the arguments of `controlkit.sd_pipelines.pipeline_from_components`."""
        modules = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                   "text_encoder_2": self.text_encoder_2, "tokenizer": self.tokenizer,
                   "tokenizer_2": self.tokenizer_2, "scheduler": self.noise_scheduler, **replaced}
        return {name: modules[name] for name in self.family.components}

    def text_names(self) -> list[str]:
        """The family's text encoders and tokenizers, by diffusers' names."""
        return [name for name in self.family.components if name.startswith(("text_encoder", "tokenizer"))]


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

    model = config.model
    base = resolve_base(model.base)
    family, index = base_index(base)
    if family.pooled and model.train_text_encoder:
        raise ConfigError(f"`model.train_text_encoder` is for SD1.x bases; {base} is {family.name}, whose text "
                          "encoders stay frozen: set it to false")
    text = {name: _load_text_part(base, name, index) for name in family.components
            if name.startswith(("text_encoder", "tokenizer"))}
    encoders = [module for name, module in text.items() if name.startswith("text_encoder")]
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", use_safetensors=True)
    overrides = {"prediction_type": model.prediction_type} if model.prediction_type else {}
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **overrides)
    if model.kind == "base" and model.from_scratch:
        torch.manual_seed(config.train.seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base, subfolder="unet"))
    else:
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", use_safetensors=True)
    for frozen in (vae, unet, *encoders):
        frozen.requires_grad_(False)
    controlnet = _controlnet(config, unet, vae) if model.kind == "controlnet" else None
    trained = _mark_trained(config, unet, text["text_encoder"], controlnet)
    for module in (unet, *encoders, controlnet):
        if module is not None:
            _place(module, device, weight_dtype, channels_last=model.channels_last)
    _place(vae, device, vae_dtype(family, vae.config, weight_dtype), channels_last=model.channels_last)
    if model.gradient_checkpointing:
        for module in trained.values():
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            else:
                module.gradient_checkpointing_enable()
    vae.eval()
    settings = {key: index[key] for key in family.config_keys if key in index}
    return Components(unet, vae, text["text_encoder"], text["tokenizer"], noise_scheduler, controlnet, trained, base,
                      text.get("text_encoder_2"), text.get("tokenizer_2"), family, weight_dtype, settings)


def base_index(base: Path) -> tuple[BaseFamily, dict[str, Any]]:
    """The family of a base folder (`controlkit.sd_pipelines.folder_family`) and its model_index.json ({} and SD
    for a folder without one)."""
    from controlkit.json_files import read_json_file
    from controlkit.sd_pipelines import folder_family

    if not (base / "model_index.json").is_file():
        return SD, {}
    return folder_family(base), read_json_file(base / "model_index.json")


def vae_dtype(family: BaseFamily, vae_config: Any, weight_dtype: "torch.dtype") -> "torch.dtype":
    """The VAE's dtype in a run whose frozen parts are `weight_dtype`: float32 instead of float16 for a family
    whose VAE overflows in float16 (`upcast_vae`) when its config asks for it (`force_upcast`, default true)."""
    import torch

    if weight_dtype == torch.float16 and family.upcast_vae and vae_config.get("force_upcast", True):
        return torch.float32
    return weight_dtype


def _load_text_part(base: Path, name: str, index: dict[str, Any]) -> Any:
    """A text encoder or tokenizer of the base, of the transformers class its model_index.json names."""
    import transformers

    entry = index.get(name)
    named = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" else None
    cls = getattr(transformers, named or "", None) or getattr(transformers, TEXT_CLASSES[name])
    options = {} if name.startswith("tokenizer") else {"use_safetensors": True}
    try:
        return cls.from_pretrained(base, subfolder=name, **options)
    except OSError as error:
        raise WeightsNotFoundError(f"model.base: {base}/{name} cannot be loaded ({first_line(error)}); the base "
                                   "must be a complete diffusers folder") from None


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
                                      conditioning_embedding_out_channels=conditioning_stages(vae),
                                      global_pooling=config.model.global_pooling)
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
