"""Bounds on the model configs that arrive with untrusted files, checked before anything is built.

A ControlNet or U-Net `config.json` (in a folder, or stored in a safetensors header) says how big a model to
build; diffusers builds whatever it is asked for, so a config asking for `layers_per_block` 10^6 would burn CPU
and memory until the OOM killer. `check_model_config` reads every value that sets a size, checks its type and
range, and computes the parameter count the config implies arithmetically (no module is built), refusing
anything beyond `MAX_PARAMETERS`. One line names the key and what it may be.

Missing keys take diffusers' defaults (`ControlNetModel` and `UNet2DConditionModel` share them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

from controlkit.errors import CheckpointError

#: Resolutions of the encoder: SD1.x/SD2.x have 4, SDXL 3.
MAX_LEVELS = 8
#: Resnets per level: every SD family has 2.
MAX_LAYERS_PER_BLOCK = 16
#: Channels of any level, stage or embedding: SD's widest level is 1280, SDXL's text width 2048.
MAX_CHANNELS = 8192
#: Transformer blocks per attention: SDXL's deepest level has 10.
MAX_TRANSFORMER_LAYERS = 32
#: Transformer blocks in the whole model, 10x SDXL's U-Net (70): bounds the time to build it even at few channels.
MAX_TRANSFORMER_BLOCKS = 700
#: Input, output and condition channels: 4 for SD latents (9 inpainting, 16 newer VAEs), 3 for an RGB condition.
MAX_IO_CHANNELS = 64
#: Stages of the conditioning encoder: 4 for SD's x8 VAE.
MAX_CONDITION_STAGES = 8
#: Any other integer in a config (embedding inputs, class counts, sample sizes): SDXL's largest is 2816.
MAX_CONFIG_INTEGER = 65_536
#: Implied parameters, 10x SDXL's U-Net (2.6 B): nothing real is larger, and a model this size is ~100 GB.
MAX_PARAMETERS = 26_000_000_000

#: diffusers' defaults for the keys that set sizes (ControlNetModel and UNet2DConditionModel agree on these).
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "conditioning_channels": 3, "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2,
    "norm_num_groups": 32, "cross_attention_dim": 1280, "transformer_layers_per_block": 1, "attention_head_dim": 8,
    "conditioning_embedding_out_channels": [16, 32, 96, 256], "use_linear_projection": False,
}


def check_model_config(config: Mapping[str, Any], what: str, *, model: str = "ControlNet",
                       max_parameters: int = MAX_PARAMETERS) -> int:
    """Check a ControlNet or U-Net config's sizes before it is built; returns the parameter count it implies.

    Args:
        config: the config (diffusers keys; missing keys take diffusers' defaults).
        what: the config's name in messages, e.g. 'models/cn/config.json'.
        model: 'ControlNet' (down path, middle block and conditioning encoder) or 'U-Net' (also the up path).
        max_parameters: the largest implied parameter count accepted.

    Raises:
        CheckpointError: "{what}: `key` is VALUE; a ControlNet has ..." for the first value out of bounds.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{what}: a model config must be a JSON object, not {type(config).__name__}")
    sizes = _Sizes(config, what, model)  # the named keys first: their messages say what each may be
    _check_integers(config, what)
    parameters = sizes.parameters()
    if parameters > max_parameters:
        raise CheckpointError(
            f"{what}: the config describes a {model} of about {parameters / 1e9:,.0f} billion parameters, more than "
            f"the {max_parameters / 1e9:,.0f} billion accepted (10x SDXL's U-Net); it is not a real model config"
        )
    return parameters


def shown(value: Any, limit: int = 60) -> str:
    """A config value as it appears in a message: JSON, clipped to `limit` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_integers(config: Mapping[str, Any], what: str) -> None:
    """Every integer anywhere in the config (one list level deep) is at most MAX_CONFIG_INTEGER in size."""
    for key, value in config.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            for number in item if isinstance(item, (list, tuple)) else [item]:
                if isinstance(number, int) and not isinstance(number, bool) and abs(number) > MAX_CONFIG_INTEGER:
                    raise CheckpointError(f"{what}: `{key}` is {shown(value)}; no size in a model config is above "
                                          f"{MAX_CONFIG_INTEGER:,}")


class _Sizes:
    """The size-setting values of one config, each checked as it is read."""

    def __init__(self, config: Mapping[str, Any], what: str, model: str) -> None:
        self.config, self.what, self.model = config, what, model
        self.channels = self.int_list("block_out_channels", 1, MAX_CHANNELS, "channels per level", MAX_LEVELS, "levels")
        self.levels = len(self.channels)
        self.groups = self.integer("norm_num_groups", 1, MAX_CHANNELS, "normalisation groups")
        for width in self.channels:
            if width % self.groups:
                self.fail("block_out_channels", f"needs channels divisible by `norm_num_groups` ({self.groups})")
        types = self.get("down_block_types")
        if not isinstance(types, (list, tuple)) or len(types) != self.levels or not all(
                isinstance(t, str) for t in types):
            self.fail("down_block_types", f"has one block type name per level ({self.levels})")
        self.attends = ["CrossAttn" in name for name in types]
        self.layers = self.per_level("layers_per_block", 1, MAX_LAYERS_PER_BLOCK, "layers per block")
        self.depth = self.per_level("transformer_layers_per_block", 1, MAX_TRANSFORMER_LAYERS,
                                    "transformer layers per block", nested=True)
        self.cross = max(self.per_level("cross_attention_dim", 1, MAX_CHANNELS, "cross-attention channels"))
        self.per_level("attention_head_dim", 1, MAX_CHANNELS, "attention heads", optional=True)
        self.per_level("num_attention_heads", 1, MAX_CHANNELS, "attention heads", optional=True)
        self.in_channels = self.integer("in_channels", 1, MAX_IO_CHANNELS, "input channels")
        self.out_channels = self.integer("out_channels", 1, MAX_IO_CHANNELS, "output channels")
        self.condition = self.integer("conditioning_channels", 1, MAX_IO_CHANNELS, "condition channels")
        self.stages = self.int_list("conditioning_embedding_out_channels", 1, MAX_CHANNELS,
                                    "conditioning encoder channels", MAX_CONDITION_STAGES, "conditioning stages")
        if model == "U-Net":
            ups = self.get("up_block_types")
            if ups is not None and (not isinstance(ups, (list, tuple)) or len(ups) != self.levels):
                self.fail("up_block_types", f"has one block type name per level ({self.levels})")
        up = 2 if model == "U-Net" else 1  # a U-Net's up path has one layer more per level than its down path
        blocks = self.depth[-1] + sum(d * (up * n + up - 1) for d, n, a in zip(self.depth, self.layers, self.attends)
                                      if a)
        if blocks > MAX_TRANSFORMER_BLOCKS:
            raise CheckpointError(
                f"{what}: `transformer_layers_per_block` is {shown(self.get('transformer_layers_per_block'))}, "
                f"{blocks} transformer blocks in all; a {model} has at most {MAX_TRANSFORMER_BLOCKS}")

    # -- reading values -------------------------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        value = self.config.get(key)
        return _DEFAULTS.get(key) if value is None else value

    def fail(self, key: str, rule: str) -> None:
        raise CheckpointError(f"{self.what}: `{key}` is {shown(self.config.get(key, _DEFAULTS.get(key)))}; "
                              f"a {self.model} {rule}")

    def integer(self, key: str, low: int, high: int, name: str, value: Any = None) -> int:
        value = self.get(key) if value is None else value
        if not _is_int(value) or not low <= value <= high:
            self.fail(key, f"has {low} to {high:,} {name}")
        return value

    def int_list(self, key: str, low: int, high: int, name: str, longest: int, unit: str) -> list[int]:
        values = self.get(key)
        if not isinstance(values, (list, tuple)) or not values:
            self.fail(key, f"has a list of {name}")
        if len(values) > longest:
            self.fail(key, f"has 1 to {longest} {unit}")
        return [self.integer(key, low, high, name, value) for value in values]

    def per_level(self, key: str, low: int, high: int, name: str, *, optional: bool = False,
                  nested: bool = False) -> list[int]:
        """One value per level: a number for all, or a list of one per level (with `nested`, an entry may itself
        be a list, as in U-Net configs; its largest value counts)."""
        value = self.get(key)
        if value is None and optional:
            return [low] * self.levels
        values = value if isinstance(value, (list, tuple)) else [value] * self.levels
        if len(values) != self.levels:
            self.fail(key, f"has one value per level ({self.levels})")
        result = []
        for entry in values:
            items = entry if nested and isinstance(entry, (list, tuple)) and entry else [entry]
            result.append(max(self.integer(key, low, high, name, item) for item in items))
        return result

    # -- the parameter count --------------------------------------------------------------------------------------

    def parameters(self) -> int:
        """Parameters the config implies, counted per layer as diffusers builds them (within a few percent)."""
        c0 = self.channels[0]
        embed = self.integer("time_embedding_dim", 1, MAX_CONFIG_INTEGER, "time embedding channels",
                             self.config.get("time_embedding_dim") or 4 * c0)
        total = _conv(self.in_channels, c0, 3) + _linear(c0, embed) + _linear(embed, embed) + self._extra(embed)
        previous, skips = c0, [c0]
        for level, width in enumerate(self.channels):
            for layer in range(self.layers[level]):
                total += _resnet(previous if layer == 0 else width, width, embed)
                total += _transformer(width, self.depth[level], self.cross) if self.attends[level] else 0
                skips.append(width)
            previous = width
            if level < self.levels - 1:
                total += _conv(width, width, 3)
                skips.append(width)
        last = self.channels[-1]
        total += 2 * _resnet(last, last, embed) + _transformer(last, self.depth[-1], self.cross)
        if self.model == "U-Net":
            return total + self._up_path(skips, embed)
        stages = self.stages
        total += _conv(self.condition, stages[0], 3) + _conv(stages[-1], c0, 3)
        total += sum(_conv(a, a, 3) + _conv(a, b, 3) for a, b in pairwise(stages))
        return total + sum(_conv(width, width, 1) for width in skips) + _conv(last, last, 1)

    def _extra(self, embed: int) -> int:
        """The class or added (SDXL text_time) embedding: a projection, or a table of `num_class_embeds` rows."""
        total = 0
        if self.config.get("addition_embed_type") or self.config.get("class_embed_type"):
            inputs = self.config.get("projection_class_embeddings_input_dim") or embed
            total += _linear(inputs if _is_int(inputs) else 0, embed) + _linear(embed, embed)
        rows = self.config.get("num_class_embeds")
        return total + (rows * embed if _is_int(rows) and rows > 0 else 0)

    def _up_path(self, skips: list[int], embed: int) -> int:
        total, previous = 0, self.channels[-1]
        for level, width in reversed(list(enumerate(self.channels))):
            for _ in range(self.layers[level] + 1):
                total += _resnet(previous + skips.pop(), width, embed)
                total += _transformer(width, self.depth[level], self.cross) if self.attends[level] else 0
                previous = width
            total += _conv(width, width, 3) if level > 0 else 0
        return total + 2 * self.channels[0] + _conv(self.channels[0], self.out_channels, 3)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _conv(inputs: int, outputs: int, kernel: int) -> int:
    return inputs * outputs * kernel * kernel + outputs


def _linear(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs if inputs else 0


def _resnet(inputs: int, outputs: int, embed: int) -> int:
    shortcut = _conv(inputs, outputs, 1) if inputs != outputs else 0
    return 2 * inputs + _conv(inputs, outputs, 3) + _linear(embed, outputs) + 2 * outputs + _conv(
        outputs, outputs, 3) + shortcut


def _transformer(width: int, depth: int, cross: int) -> int:
    """Norm, input and output projections, and `depth` blocks of self-attention, cross-attention and GEGLU."""
    block = 6 * width + 4 * width * width + width + 2 * width * width + 2 * cross * width + width
    block += _linear(width, 8 * width) + _linear(4 * width, width)
    return 2 * width + 2 * _linear(width, width) + depth * block
