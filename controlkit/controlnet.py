"""The ControlNet itself: diffusers' `ControlNetModel`, created from a U-Net, and the condition metadata that
travels with its weights.

The network is never re-implemented here. `build_controlnet` is `ControlNetModel.from_unet`: a trainable copy of
the U-Net's encoder and middle block, a small conditioning encoder for the condition map, and zero-initialised
1x1 convolutions on the 12 (SD1.x/SD2.x) or 9 (SDXL) skip outputs and the middle output. Because those
convolutions start at zero, a fresh ControlNet leaves the U-Net's prediction exactly unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from controlkit.errors import CheckpointError
from controlkit.json_files import parse_json_object
from controlkit.model_config import MAX_LAYERS_PER_BLOCK, MAX_LEVELS

if TYPE_CHECKING:
    from diffusers import ControlNetModel, UNet2DConditionModel

#: Key of the condition metadata: in safetensors header metadata (a JSON string) and in config.json (an object;
#: the leading underscore makes diffusers' config loader skip it without a warning).
METADATA_KEY = "controlkit"
CONFIG_METADATA_KEY = "_controlkit"

#: Map polarities: line/edge maps given to the released checkpoints are white lines on black (anchors B.1).
POLARITIES = ("white_on_black", "black_on_white")

#: Channels of the conditioning encoder's stages for SD's x8 VAE (diffusers' default, the original hint block);
#: smaller VAEs (the tiny and demo models) use the first 1 + log2(factor) of them.
CONDITIONING_STAGES = (16, 32, 96, 256)

#: The parts of a ControlNet copied from its U-Net: a ControlNet fits a base when these have its U-Net's shapes.
ENCODER_PREFIXES = ("conv_in.", "time_embedding.", "class_embedding.", "add_embedding.", "down_blocks.", "mid_block.")

#: Base families by the width of the text encoder the U-Net cross-attends to.
_FAMILY_BY_CROSS_ATTENTION = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def build_controlnet(
    unet: UNet2DConditionModel,
    *,
    conditioning_channels: int = 3,
    conditioning_embedding_out_channels: Sequence[int] = CONDITIONING_STAGES,
    global_pooling: bool = False,
) -> ControlNetModel:
    """A new ControlNet for `unet` (SD1.x, SD2.x, SDXL or any `UNet2DConditionModel`).

    The encoder, middle block, input convolution and time/class/added embeddings are copied from `unet`; the
    conditioning encoder is fresh and the zero convolutions are zero, so every residual is exactly 0 until
    training moves them.

    Args:
        unet: the base model's U-Net; its weights are copied, it is not modified.
        conditioning_channels: channels of the condition map (3 for RGB maps, 1 for a single-channel map).
        conditioning_embedding_out_channels: channels of the conditioning encoder's stages; each stage after the
            first halves the resolution, so the default four stages take a map at image size (H, W) to latent size
            (H / 8, W / 8), matching SD's VAE.
        global_pooling: average each output over its height and width (ControlNet 1.1 shuffle's
            `global_average_pooling`): the control then carries global content (colours, style), not layout, and
            acts on the conditional side of guidance only at generation.
    """
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(
        unet,
        conditioning_channels=conditioning_channels,
        conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
    )
    if global_pooling:  # from_unet has no such argument; diffusers' forward reads the config entry
        controlnet.register_to_config(global_pool_conditions=True)
    return controlnet


def conditioning_stages(vae: Any) -> tuple[int, ...]:
    """Channels of a new ControlNet's conditioning encoder for a base with this VAE: it must bring condition maps
    down by the VAE's factor, one stride-2 stage per halving (SD's x8 VAE: all of `CONDITIONING_STAGES`)."""
    halvings = len(vae.config.block_out_channels) - 1
    return CONDITIONING_STAGES[: halvings + 1]


def new_controlnet(base: Any, *, conditioning_channels: int = 3, seed: int | None = None) -> ControlNetModel:
    """A fresh ControlNet for a loaded base (`controlkit.load_base`): `build_controlnet` of its U-Net with the
    conditioning encoder its VAE needs, in the U-Net's dtype and on its device. It leaves every image of the base
    exactly unchanged until trained.

    Args:
        conditioning_channels: channels of the condition map (3 for RGB maps).
        seed: seeds the conditioning encoder's random initialisation (the only random part); None: torch's
            global generator as it stands.
    """
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    controlnet = build_controlnet(base.unet, conditioning_channels=conditioning_channels,
                                  conditioning_embedding_out_channels=conditioning_stages(base.vae))
    return controlnet.to(device=base.unet.device, dtype=base.unet.dtype)


def check_fits(controlnet_state: Mapping[str, Any], controlnet_config: Mapping[str, Any], unet: Any,
               name: str = "the ControlNet") -> None:
    """The one test of "does this ControlNet fit this base": its copy of the encoder must have the U-Net's
    encoder shapes, key for key (its residuals then have the shapes of the U-Net's skip connections).

    Args:
        controlnet_state: the ControlNet's tensors by key (a state dict, or anything with `.shape` values).
        controlnet_config: its config (names its base family in the message).
        unet: the base's U-Net (meta-device weights are fine: only shapes are read).

    Raises:
        CheckpointError: "{name} is for a different base: ...", naming the first differing tensor.
    """
    ours = {k: tuple(v.shape) for k, v in controlnet_state.items() if k.startswith(ENCODER_PREFIXES)}
    theirs = {k: tuple(v.shape) for k, v in unet.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
    inpainting = theirs.get("conv_in.weight"), ours.get("conv_in.weight")
    if all(inpainting) and inpainting[0][1] == 2 * inpainting[1][1] + 1 and inpainting[0][2:] == inpainting[1][2:]:
        # an inpainting U-Net also takes the mask and the masked image's latents; its ControlNets see the latents
        theirs["conv_in.weight"] = ours["conv_in.weight"]
    differing = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    if differing:
        key = differing[0]
        raise CheckpointError(
            f"{name} is for a different base: the ControlNet is {base_family(controlnet_config)}, the U-Net is "
            f"{base_family(unet.config)}; {len(differing)} encoder tensors differ, first {key}: "
            f"{ours.get(key, 'absent')} in the ControlNet, {theirs.get(key, 'absent')} in the U-Net; use a "
            "ControlNet trained for this base (an SD1.x ControlNet needs an SD1.x base)"
        )


def base_family(config: Mapping[str, Any]) -> str:
    """'SD1.x', 'SD2.x', 'SDXL' or 'custom (cross-attention N)' for a U-Net or ControlNet config.

    SDXL is told by its added text/size embedding (`addition_embed_type` "text_time"), at any width: the tiny SDXL
    models are SDXL's layout at a small size. Whether it is SDXL's *size* is `original_format.client_support`'s
    question (it compares every layout value)."""
    if config.get("addition_embed_type") == "text_time":
        return "SDXL"
    width = config.get("cross_attention_dim")
    family = _FAMILY_BY_CROSS_ATTENTION.get(width) if isinstance(width, int) else None
    if family == "SDXL":  # 2048 wide without the added embedding is not SDXL's layout
        family = None
    return family or f"custom (cross-attention {width})"


@dataclass
class ConditionMetadata:
    """What a ControlNet expects as its condition, stored next to its weights.

    Attributes:
        condition: the condition family, e.g. 'canny', 'depth', 'openpose', 'shuffle'; None if unknown.
        preprocessor: the registry name of the preprocessor that makes the maps it was trained on.
        preprocessor_params: that preprocessor's parameters (thresholds, resolutions), JSON values only.
        polarity: 'white_on_black' (every 1.1 line/edge map) or 'black_on_white'.
        global_pooling: the residuals are averaged over space (ControlNet 1.1 shuffle); mirrors diffusers'
            `global_pool_conditions`.
        conditional_only: the control is applied to the conditional half of classifier-free guidance only
            (the shuffle case; diffusers' guess mode does the same).
        base: the base model or family it was trained on, e.g. 'SD1.x' or 'runwayml/stable-diffusion-v1-5'.
    """

    condition: str | None = None
    preprocessor: str | None = None
    preprocessor_params: dict[str, Any] = field(default_factory=dict)
    polarity: str = "white_on_black"
    global_pooling: bool = False
    conditional_only: bool = False
    base: str | None = None

    def __post_init__(self) -> None:
        if self.polarity not in POLARITIES:
            raise CheckpointError(f"condition metadata: polarity {self.polarity!r} is not one of {POLARITIES}")
        if not isinstance(self.preprocessor_params, dict):
            raise CheckpointError("condition metadata: preprocessor_params must be a JSON object")
        for name in ("condition", "preprocessor", "base"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise CheckpointError(f"condition metadata: {name} must be a string, got {type(value).__name__}")
        for name in ("global_pooling", "conditional_only"):  # bool("false") is True: only real booleans
            if not isinstance(getattr(self, name), bool):
                raise CheckpointError(f"condition metadata: {name} must be true or false, got "
                                      f"{type(getattr(self, name)).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what config.json stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConditionMetadata:
        """Inverse of `to_dict`. Keys written by a newer version (unknown here) are ignored."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"condition metadata must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def to_metadata(self) -> dict[str, str]:
        """Safetensors header metadata (string values only): {'controlkit': '<json>'}."""
        return {METADATA_KEY: json.dumps(self.to_dict(), sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> ConditionMetadata | None:
        """The metadata stored by `to_metadata`, or None when the header has none."""
        text = (metadata or {}).get(METADATA_KEY)
        if text is None:
            return None
        return cls.from_dict(parse_json_object(text, "condition metadata"))


def guess_metadata(name: str) -> ConditionMetadata:
    """Condition metadata from a lllyasviel file name ('control_v11p_sd15_canny.pth' -> condition 'canny').

    Shuffle models average their residuals over space and act on the conditional side only (ControlNet 1.1).
    """
    stem = name.lower().split(".")[0]
    match = re.match(r"control_(?:v11[a-z0-9]*_)?(?:sd[a-z0-9]*_)?([a-z0-9_]+?)(?:[-_]fp16)?$", stem)
    if match is None:
        return ConditionMetadata()
    condition = match.group(1)
    shuffle = condition == "shuffle"
    return ConditionMetadata(condition=condition, global_pooling=shuffle, conditional_only=shuffle)


def infer_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A `ControlNetModel` config for weights with diffusers key names, read from their names and shapes.

    Used for files that carry no config (the original lllyasviel files, bare diffusers single files). What the
    weights cannot tell follows the SD families: 8 attention heads when the cross-attention width is 768
    (SD1.x), else 64 channels per head (SD2.x, SDXL); SDXL's added time embedding is 256 wide. When a U-Net is
    at hand, `checkpoint.load_controlnet(..., unet=)` takes those values from it instead.

    Raises:
        CheckpointError: the weights lack a part every ControlNet has.
    """
    import math

    def shape(key: str, rank: int | None) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointError(f"not a complete ControlNet: {key} is missing")
        found = tuple(state_dict[key].shape)
        if rank is not None and len(found) != rank:
            raise CheckpointError(f"not a ControlNet: {key} has shape {found}, a ControlNet's has {rank} dimensions")
        return found

    def indices(pattern: str) -> set[int]:  # patterns take at most 4 digits: a longer index is never converted
        return {int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))}

    levels = max(indices(r"down_blocks\.(\d{1,4})\."), default=-1) + 1
    layers = max(indices(r"down_blocks\.0\.resnets\.(\d{1,4})\."), default=-1) + 1
    if levels == 0 or layers == 0:
        raise CheckpointError("not a complete ControlNet: no down_blocks.*.resnets weights")
    if levels > MAX_LEVELS or layers > MAX_LAYERS_PER_BLOCK:  # before the per-level loops below
        raise CheckpointError(f"not a ControlNet: its weights name {levels} levels of {layers} layers (at most "
                              f"{MAX_LEVELS} of {MAX_LAYERS_PER_BLOCK})")
    channels = [shape(f"down_blocks.{level}.resnets.0.conv1.weight", 4)[0] for level in range(levels)]
    attends = [f"down_blocks.{level}.attentions.0.proj_in.weight" in state_dict for level in range(levels)]
    depth = [len(indices(rf"down_blocks\.{level}\.attentions\.0\.transformer_blocks\.(\d{{1,4}})\.")) or 1
             for level in range(levels)]
    cross_width = shape(next((k for k in state_dict if k.endswith("attn2.to_k.weight")), "attn2.to_k.weight"), 2)[1]
    projection = shape(next((k for k in state_dict if k.endswith("proj_in.weight")), "proj_in.weight"), None)
    heads = [8] * levels if cross_width == 768 else [max(1, c // 64) for c in channels]
    hint_in = shape("controlnet_cond_embedding.conv_in.weight", 4)  # (first stage, condition channels, 3, 3)
    hint_blocks = len(indices(r"controlnet_cond_embedding\.blocks\.(\d{1,4})\.weight"))
    # blocks alternate a same-width conv and a stride-2 conv that widens: the stages are the widening outputs
    widening = range(1, hint_blocks, 2)
    stages = [hint_in[0]] + [shape(f"controlnet_cond_embedding.blocks.{j}.weight", 4)[0] for j in widening]
    config: dict[str, Any] = {
        "in_channels": shape("conv_in.weight", 4)[1],
        "conditioning_channels": hint_in[1],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": cross_width,
        "transformer_layers_per_block": depth if len(set(depth)) > 1 else depth[0],
        "attention_head_dim": heads if len(set(heads)) > 1 else heads[0],
        "use_linear_projection": len(projection) == 2,
        "norm_num_groups": math.gcd(32, *channels),
        "conditioning_embedding_out_channels": stages,
    }
    if "add_embedding.linear_1.weight" in state_dict:
        config["addition_embed_type"] = "text_time"
        config["addition_time_embed_dim"] = 256
        config["projection_class_embeddings_input_dim"] = shape("add_embedding.linear_1.weight", 2)[1]
    elif "class_embedding.linear_1.weight" in state_dict:
        config["class_embed_type"] = "projection"
        config["projection_class_embeddings_input_dim"] = shape("class_embedding.linear_1.weight", 2)[1]
    return config
