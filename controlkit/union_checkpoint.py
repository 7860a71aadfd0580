"""ControlNet-Union checkpoints (diffusers' `ControlNetUnionModel`: xinsir's SDXL Union / ProMax), and the choice
between the two ControlNet classes every checkpoint reader builds.

A Union model is a ControlNet whose condition goes through a small fusion transformer first: its weights are a
ControlNet's plus `task_embedding` (one row per control type), `transformer_layes.*` (diffusers keeps the
original spelling), `spatial_ch_projs.*` and `control_add_embedding.*`. It is read from a diffusers folder
(config.json `_class_name` "ControlNetUnionModel") or a diffusers-keyed single file, recognised by those keys.
The original lllyasviel format has no Union layout: ComfyUI and A1111 read the diffusers file directly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from controlkit.controlnet import base_family
from controlkit.errors import CheckpointError, ConfigError, first_line
from controlkit.model_config import MAX_CHANNELS, MAX_TRANSFORMER_LAYERS, check_model_config, shown
from controlkit.union import is_union

if TYPE_CHECKING:
    from diffusers import ControlNetModel, UNet2DConditionModel

CONTROLNET = "ControlNetModel"
UNION = "ControlNetUnionModel"
#: The diffusers classes a ControlNet checkpoint may name in its config.json.
MODEL_CLASSES = (CONTROLNET, UNION)
#: Key prefixes only a Union model has.
UNION_PREFIXES = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")
#: Config keys only a Union model has (the fusion transformer and the control types).
UNION_KEYS = ("num_control_type", "num_trans_channel", "num_trans_head", "num_trans_layer", "num_proj_channel")
#: Control types a Union config may declare: the released models have 6 (Union) or 8 (ProMax).
MAX_CONTROL_TYPES = 256
#: The fusion transformer's heads for a file without a config (weights do not store them): the released models'.
DEFAULT_TRANS_HEADS = 8
#: Why a Union model is never written in the original format (for messages).
NO_ORIGINAL_LAYOUT = ("ControlNet-Union has no original (lllyasviel) layout; ComfyUI and A1111 read its diffusers "
                      ".safetensors file directly")


def model_class(class_name: Any, where: str) -> str:
    """The ControlNet class a config.json names (`_class_name`, absent: ControlNetModel); CheckpointError naming
    `where` for any other class (a U-Net folder passed as a ControlNet, for one)."""
    name = CONTROLNET if class_name is None else class_name
    if name not in MODEL_CLASSES:
        shown_name = name[:60] if isinstance(name, str) else shown(name)
        raise CheckpointError(f"{where} describes a {shown_name}, not a ControlNetModel or ControlNetUnionModel")
    return name


def is_union_state(keys: Iterable[str]) -> bool:
    """Whether diffusers-keyed weights are a Union model's (any of its own keys is there)."""
    return any(key.startswith(UNION_PREFIXES) for key in keys)


def refuse_original(controlnet: Any, what: str) -> None:
    """ConfigError for a Union model asked for in the original format (with or without --force)."""
    if is_union(controlnet):
        raise ConfigError(f"{what}: {NO_ORIGINAL_LAYOUT}; use --to diffusers (a folder) and give them its "
                          "diffusion_pytorch_model.safetensors")


def describe(config: Mapping[str, Any]) -> str:
    """'ControlNet-Union (SDXL, 8 control types)' for a Union config."""
    return f"ControlNet-Union ({base_family(config)}, {config.get('num_control_type', 6)} control types)"


def check_union_config(config: Mapping[str, Any], what: str) -> None:
    """The fusion transformer's sizes, before anything is built: bounded, and consistent with the encoder (its
    tokens are the mean of the first level's features, its output is added to them)."""
    bounds = {"num_control_type": MAX_CONTROL_TYPES, "num_trans_channel": MAX_CHANNELS, "num_trans_head": MAX_CHANNELS,
              "num_trans_layer": MAX_TRANSFORMER_LAYERS, "num_proj_channel": MAX_CHANNELS}
    values = {key: config.get(key) for key in UNION_KEYS}
    for key, value in values.items():
        integer = isinstance(value, int) and not isinstance(value, bool)
        if value is not None and not (integer and 1 <= value <= bounds[key]):
            raise CheckpointError(f"{what}: `{key}` is {shown(value)}; a ControlNet-Union has 1 to {bounds[key]:,}")
    width = (config.get("block_out_channels") or [320])[0]
    channels, heads = values["num_trans_channel"] or 320, values["num_trans_head"] or DEFAULT_TRANS_HEADS
    if channels % heads:
        raise CheckpointError(f"{what}: `num_trans_channel` {channels} is not divisible by `num_trans_head` {heads}")
    for key in ("num_trans_channel", "num_proj_channel"):
        if (values[key] or 320) != width:
            raise CheckpointError(f"{what}: `{key}` is {values[key] or 320} but the first level has {width} channels; "
                                  "a ControlNet-Union fuses its conditions at that width")
    if not config.get("addition_time_embed_dim"):
        raise CheckpointError(f"{what}: a ControlNet-Union needs `addition_time_embed_dim` (its control-type "
                              "embedding uses it); the config has none")


def infer_union_fields(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The Union-only config values its weights show (the heads are not stored: the released models' 8)."""
    from controlkit.controlnet import infer_config

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointError(f"not a complete ControlNet-Union: {key} is missing")
        return tuple(state_dict[key].shape)

    embedding = shape("task_embedding")
    if len(embedding) != 2:
        raise CheckpointError(f"not a ControlNet-Union: task_embedding has shape {embedding}, not (types, channels)")
    types, channels = embedding
    layers = {int(m.group(1)) for key in state_dict if (m := re.match(r"transformer_layes\.(\d{1,4})\.", key))}
    fields = {"num_control_type": types, "num_trans_channel": channels, "num_trans_head": DEFAULT_TRANS_HEADS,
              "num_trans_layer": len(layers), "num_proj_channel": shape("spatial_ch_projs.weight")[0]}
    # control_add_embedding takes addition_time_embed_dim inputs per control type
    fields["addition_time_embed_dim"] = shape("control_add_embedding.linear_1.weight")[1] // max(1, types)
    config = infer_config(state_dict)
    config.update(fields)
    return config


def build_empty(config: Mapping[str, Any], model_class_name: str = CONTROLNET) -> ControlNetModel:
    """A ControlNet (or Union) model with this config on the meta device (no memory), after the config's bounds are
    checked; CheckpointError for a config diffusers cannot build."""
    import inspect

    import diffusers
    from accelerate import init_empty_weights

    check_model_config(config, "the ControlNet config")  # every build passes here: never an unbounded one
    if model_class_name == UNION:
        check_union_config(config, "the ControlNet-Union config")
    cls = getattr(diffusers, model_class(model_class_name, "the checkpoint"))
    accepted = set(inspect.signature(cls.__init__).parameters)  # ControlNetModel's mid_block_type: not a Union's
    try:
        with init_empty_weights():
            return cls.from_config({key: value for key, value in config.items() if key in accepted})
    except Exception as error:  # diffusers raises many kinds for values it cannot build (within the bounds)
        raise CheckpointError(f"the stored ControlNet config is invalid ({first_line(error)[:200]})") from None


def config_from_unet(unet: UNet2DConditionModel, inferred: Mapping[str, Any],
                     model_class_name: str = CONTROLNET) -> dict[str, Any]:
    """The config `from_unet` gives for this U-Net, with what only the weights know (the conditioning encoder, a
    Union's fusion transformer) taken from `inferred`."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        model = ControlNetModel.from_unet(
            unet,
            load_weights_from_unet=False,
            conditioning_channels=inferred["conditioning_channels"],
            conditioning_embedding_out_channels=tuple(inferred["conditioning_embedding_out_channels"]),
        )
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    config["global_pool_conditions"] = inferred.get("global_pool_conditions", False)
    if model_class_name == UNION:
        config.update({key: inferred[key] for key in UNION_KEYS if key in inferred})
    return config
