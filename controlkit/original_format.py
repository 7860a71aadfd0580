"""The original ControlNet key format (lllyasviel `cldm`, used by A1111 and ComfyUI) and diffusers' keys.

The map is explicit and derived from the model's layout, so it works for SD1.x, SD2.x, SDXL and the tiny test
models alike. In the original `ControlNet` module:
- `time_embed.{0,2}` are the time embedding's two linears; `label_emb.0.{0,2}` the class / added embedding's;
- `input_hint_block.{0,2,...,2n}` are the conditioning encoder's convolutions (odd indices are SiLUs);
- `input_blocks.0.0` is conv_in; then each resolution has `layers_per_block` blocks `input_blocks.i` with a
  resnet at `.0` and, at cross-attention levels, a transformer at `.1`, followed (except at the last level) by
  a downsampler at `input_blocks.i.0.op`;
- `zero_convs.i.0` is the zero 1x1 convolution after input block i, `middle_block.{0,1,2}` is resnet,
  transformer, resnet, and `middle_block_out.0` the middle zero convolution.
Inside resnets the names differ (`in_layers.0` = norm1, ...); inside transformers they are identical.
Files hold these keys under `control_model.` (ControlNet 1.0 and 1.1, A1111 extracts) or bare.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from controlkit.controlnet import CONDITIONING_STAGES
from controlkit.errors import CheckpointError, preview

#: Prefix of the ControlNet's keys inside a ControlLDM checkpoint (and in the files A1111 and ComfyUI load).
CONTROL_PREFIX = "control_model."

#: diffusers resnet parameter names -> original ResBlock names.
_RESNET_NAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)


@dataclass(frozen=True)
class OriginalLayout:
    """What the key map depends on.

    Attributes:
        levels: resolutions of the encoder (4 for SD1.x/SD2.x, 3 for SDXL).
        layers_per_block: blocks per resolution (2 for SD).
        hint_blocks: inner convolutions of the conditioning encoder (6 for the standard 16/32/96/256 encoder).
        label_embedding: 'add_embedding' (SDXL), 'class_embedding', or None.
    """

    levels: int
    layers_per_block: int
    hint_blocks: int
    label_embedding: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> OriginalLayout:
        """The layout of a diffusers `ControlNetModel` config."""
        if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise CheckpointError(
                f"the original format has a cross-attention middle block; mid_block_type "
                f"{config.get('mid_block_type')!r} cannot be expressed in it"
            )
        label = None
        if config.get("addition_embed_type"):
            label = "add_embedding"
        elif config.get("class_embed_type"):
            label = "class_embedding"
        embedding_channels = config.get("conditioning_embedding_out_channels") or CONDITIONING_STAGES
        return cls(
            levels=len(config["block_out_channels"]),
            layers_per_block=int(config["layers_per_block"]),
            hint_blocks=2 * (len(embedding_channels) - 1),
            label_embedding=label,
        )

    @classmethod
    def from_original_keys(cls, keys: Iterable[str]) -> OriginalLayout:
        """The layout of bare original keys, read from which input blocks exist and which hold a downsampler."""
        keys = list(keys)
        blocks = {int(m.group(1)) for key in keys if (m := re.match(r"input_blocks\.(\d+)\.", key))}
        downsamplers = sorted(
            int(m.group(1)) for key in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", key))
        )
        hint_convs = {int(m.group(1)) for key in keys if (m := re.match(r"input_hint_block\.(\d+)\.weight$", key))}
        if not blocks or not hint_convs:
            raise CheckpointError("not an original-format ControlNet: no input_blocks or input_hint_block keys")
        count = max(blocks) + 1  # conv_in, layers_per_block per level, a downsampler between levels
        layers = downsamplers[0] - 1 if downsamplers else count - 1
        levels = count // (layers + 1) if layers > 0 else 0
        if layers < 1 or levels * (layers + 1) != count or len(downsamplers) != levels - 1:
            raise CheckpointError(f"original-format ControlNet with an unexpected block layout ({count} input blocks)")
        has_label = any(key.startswith("label_emb.") for key in keys)
        return cls(levels, layers, len(hint_convs) - 2, "add_embedding" if has_label else None)

    def module_pairs(self) -> list[tuple[str, str, bool]]:
        """(diffusers module prefix, original module prefix, is_resnet) for every module with parameters."""
        pairs: list[tuple[str, str, bool]] = [
            ("conv_in", "input_blocks.0.0", False),
            ("time_embedding.linear_1", "time_embed.0", False),
            ("time_embedding.linear_2", "time_embed.2", False),
            ("controlnet_cond_embedding.conv_in", "input_hint_block.0", False),
            ("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * self.hint_blocks + 2}", False),
            ("mid_block.resnets.0", "middle_block.0", True),
            ("mid_block.attentions.0", "middle_block.1", False),
            ("mid_block.resnets.1", "middle_block.2", True),
            ("controlnet_mid_block", "middle_block_out.0", False),
        ]
        if self.label_embedding:
            pairs += [
                (f"{self.label_embedding}.linear_1", "label_emb.0.0", False),
                (f"{self.label_embedding}.linear_2", "label_emb.0.2", False),
            ]
        pairs += [
            (f"controlnet_cond_embedding.blocks.{j}", f"input_hint_block.{2 * j + 2}", False)
            for j in range(self.hint_blocks)
        ]
        stride = self.layers_per_block + 1  # input blocks per level: the layers and a downsampler
        for level in range(self.levels):
            for layer in range(self.layers_per_block):
                index = 1 + level * stride + layer
                pairs.append((f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0", True))
                pairs.append((f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1", False))
            if level < self.levels - 1:
                index = 1 + level * stride + self.layers_per_block
                pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op", False))
        zero_convs = self.levels * stride  # one per input block, conv_in included
        pairs += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0", False) for i in range(zero_convs)]
        return pairs


def diffusers_to_original_keys(keys: Iterable[str], layout: OriginalLayout) -> dict[str, str]:
    """diffusers key -> bare original key, for every key; raises listing the keys the format has no place for."""
    return _translate(keys, [(d, o, r, False) for d, o, r in layout.module_pairs()], "diffusers")


def original_to_diffusers_keys(keys: Iterable[str], layout: OriginalLayout) -> dict[str, str]:
    """Bare original key -> diffusers key, for every key; raises listing the keys diffusers has no place for."""
    return _translate(keys, [(o, d, r, True) for d, o, r in layout.module_pairs()], "original")


def _translate(keys: Iterable[str], pairs: list[tuple[str, str, bool, bool]], source: str) -> dict[str, str]:
    """Rename keys by their longest matching module prefix; resnet parameter names are renamed too."""
    by_prefix = {prefix: (target, resnet, reverse) for prefix, target, resnet, reverse in pairs}
    result: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # longest module prefix first
            prefix = ".".join(parts[:cut])
            if prefix in by_prefix:
                target, resnet, reverse = by_prefix[prefix]
                rest = ".".join(parts[cut:])
                result[key] = f"{target}.{_rename_resnet(rest, reverse) if resnet else rest}"
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} {source} keys have no counterpart in the other format: {preview(unknown, 5)}"
        )
    return result


def _rename_resnet(rest: str, reverse: bool) -> str:
    head, _, tail = rest.rpartition(".")  # 'in_layers.0' + 'weight', or 'norm1' + 'weight'
    for diffusers_name, original_name in _RESNET_NAMES:
        old, new = (original_name, diffusers_name) if reverse else (diffusers_name, original_name)
        if head == old:
            return f"{new}.{tail}"
    raise CheckpointError(f"unknown resnet parameter {rest!r}")


def to_original(state_dict: Mapping[str, Any], config: Mapping[str, Any], *, prefix: str = CONTROL_PREFIX) -> dict:
    """A diffusers ControlNet state dict as original keys (`control_model.` prefixed by default); same tensors."""
    names = diffusers_to_original_keys(state_dict, OriginalLayout.from_config(config))
    return {prefix + names[key]: tensor for key, tensor in state_dict.items()}


def from_original(state_dict: Mapping[str, Any], layout: OriginalLayout | None = None) -> dict:
    """Original keys (with or without `control_model.`) as a diffusers state dict; same tensors.

    Args:
        state_dict: only ControlNet keys (the caller drops the SD model's keys of a 1.0 full checkpoint).
        layout: the layout, when the config is known; inferred from the keys otherwise.
    """
    bare = {_strip(key): tensor for key, tensor in state_dict.items()}
    layout = layout or OriginalLayout.from_original_keys(bare)
    names = original_to_diffusers_keys(bare, layout)
    return {names[key]: tensor for key, tensor in bare.items()}


def _strip(key: str) -> str:
    return key[len(CONTROL_PREFIX):] if key.startswith(CONTROL_PREFIX) else key
