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

What the clients decide for themselves, and how exports keep it:
- the channel order: A1111 and ComfyUI feed the hint encoder RGB. A diffusers ControlNet configured
  `controlnet_conditioning_channel_order: bgr` flips its input first, so an original file always holds the first
  hint convolution in RGB order: `to_original` flips it for a BGR config, `from_original(bgr=True)` flips it back.
- global pooling (shuffle): both decide it from the file name only (ComfyUI: the name ends `_shuffle` or
  `_shuffle_fp16`; A1111: it contains `shuffle`), see `pooling_name_problem`.
- the architecture: both load the SD1.x, SD2.x and SDXL layouts only, see `client_support`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlkit.controlnet import CONDITIONING_STAGES, base_family
from controlkit.errors import CheckpointError, preview
from controlkit.model_config import MAX_CONDITION_STAGES, MAX_LAYERS_PER_BLOCK, MAX_LEVELS

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

    def __post_init__(self) -> None:  # the key map has levels x layers entries: bound them before building it
        if not (1 <= self.levels <= MAX_LEVELS and 1 <= self.layers_per_block <= MAX_LAYERS_PER_BLOCK
                and 0 <= self.hint_blocks <= 2 * (MAX_CONDITION_STAGES - 1)):
            raise CheckpointError(
                f"original-format ControlNet with an impossible layout ({self.levels} levels, {self.layers_per_block} "
                f"layers per block, {self.hint_blocks} hint convolutions); the file is damaged"
            )

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
        return cls(  # a config checked by model_config.check_model_config; missing keys: diffusers' defaults
            levels=len(config.get("block_out_channels") or (320, 640, 1280, 1280)),
            layers_per_block=int(config.get("layers_per_block") or 2),
            hint_blocks=2 * (len(embedding_channels) - 1),
            label_embedding=label,
        )

    @classmethod
    def from_original_keys(cls, keys: Iterable[str]) -> OriginalLayout:
        """The layout of bare original keys, read from which input blocks exist and which hold a downsampler."""
        keys = list(keys)
        # indices of at most 4 digits (a key with more is left to the unknown-keys message, never converted)
        blocks = {int(m.group(1)) for key in keys if (m := re.match(r"input_blocks\.(\d{1,4})\.", key))}
        downsamplers = sorted(
            int(m.group(1)) for key in keys if (m := re.match(r"input_blocks\.(\d{1,4})\.0\.op\.weight$", key))
        )
        hint_convs = {int(m.group(1)) for key in keys
                      if (m := re.match(r"input_hint_block\.(\d{1,4})\.weight$", key))}
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


#: The hint encoder's first convolution, (stage channels, condition channels, 3, 3): the one that sees the colours.
HINT_INPUT = "controlnet_cond_embedding.conv_in.weight"


def is_bgr(config: Mapping[str, Any]) -> bool:
    """Whether a diffusers ControlNet config flips its condition from RGB to BGR before the hint encoder."""
    return config.get("controlnet_conditioning_channel_order") == "bgr"


def to_original(state_dict: Mapping[str, Any], config: Mapping[str, Any], *, prefix: str = CONTROL_PREFIX) -> dict:
    """A diffusers ControlNet state dict as original keys (`control_model.` prefixed by default); the same tensors,
    except the first hint convolution of a BGR config, flipped to the RGB order the clients feed."""
    names = diffusers_to_original_keys(state_dict, OriginalLayout.from_config(config))
    flip = is_bgr(config)
    return {prefix + names[key]: tensor.flip(1) if flip and key == HINT_INPUT else tensor
            for key, tensor in state_dict.items()}


def from_original(state_dict: Mapping[str, Any], layout: OriginalLayout | None = None, *, bgr: bool = False) -> dict:
    """Original keys (with or without `control_model.`) as a diffusers state dict; same tensors.

    Args:
        state_dict: only ControlNet keys (the caller drops the SD model's keys of a 1.0 full checkpoint).
        layout: the layout, when the config is known; inferred from the keys otherwise.
        bgr: the model's config reads BGR: flip the (RGB-order) first hint convolution back, undoing `to_original`.
    """
    bare = {_strip(key): tensor for key, tensor in state_dict.items()}
    layout = layout or OriginalLayout.from_original_keys(bare)
    names = original_to_diffusers_keys(bare, layout)
    converted = {names[key]: tensor for key, tensor in bare.items()}
    if bgr and HINT_INPUT in converted:
        converted[HINT_INPUT] = converted[HINT_INPUT].flip(1)
    return converted


def _strip(key: str) -> str:
    return key[len(CONTROL_PREFIX):] if key.startswith(CONTROL_PREFIX) else key


# -- what A1111 and ComfyUI can read -------------------------------------------------------------------------------

_SD_TYPES = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_SD_LAYOUT = {"channels": [320, 640, 1280, 1280], "layers per block": 2, "block types": _SD_TYPES,
              "transformer depth": [1, 1, 1, 0], "latent channels": 4, "condition channels": 3,
              "hint encoder": list(CONDITIONING_STAGES), "added embedding": None}
#: The layouts both clients build (their model configs are fixed per family; they read no diffusers config).
STANDARD_LAYOUTS: dict[str, dict[str, Any]] = {
    "SD1.x": {**_SD_LAYOUT, "linear projection": False},
    "SD2.x": {**_SD_LAYOUT, "linear projection": True},
    "SDXL": {**_SD_LAYOUT, "channels": [320, 640, 1280], "block types": ["DownBlock2D"] + _SD_TYPES[:2],
             "transformer depth": [0, 2, 10], "added embedding": ["text_time", 2816], "linear projection": True},
}


@dataclass(frozen=True)
class ClientSupport:
    """Whether A1111 and ComfyUI can load a ControlNet as an original-format file.

    Attributes:
        readable: True for the SD1.x, SD2.x and SDXL layouts.
        line: 'yes (SD1.x layout)' or 'no: custom layout (...)', for messages and `controlkit info`.
    """

    readable: bool
    line: str


def client_support(config: Mapping[str, Any]) -> ClientSupport:
    """Whether A1111 and ComfyUI can read this ControlNet (a config checked by `check_model_config`) exported to
    the original format: its layout must be one of STANDARD_LAYOUTS, value for value. A ControlNet-Union (its
    config has `num_control_type`) has no original layout: they read its diffusers file instead."""
    if "num_control_type" in config:
        return ClientSupport(False, "no: a ControlNet-Union has no original layout (ComfyUI and A1111 read its "
                                    "diffusers .safetensors file directly)")
    family = base_family(config)
    ours = _layout(config)
    expected = STANDARD_LAYOUTS.get(family)
    if expected is not None:
        differing = [name for name in expected if ours[name] != expected[name]]
        if not differing:
            return ClientSupport(True, f"yes ({family} layout)")
        name = differing[0]
        return ClientSupport(False, f"no: custom layout ({family} but {name} {_text(ours[name])}; the clients "
                                    f"build {_text(expected[name])})")
    layers = ours["layers per block"]
    return ClientSupport(False, f"no: custom layout (cross-attention {config.get('cross_attention_dim')}, channels "
                                f"{_text(ours['channels'])}, {layers} layer{'s' if layers != 1 else ''} per block)")


def _layout(config: Mapping[str, Any]) -> dict[str, Any]:
    """The shape-deciding values of a ControlNet config, in STANDARD_LAYOUTS' terms (missing keys: defaults)."""
    channels = list(config.get("block_out_channels") or (320, 640, 1280, 1280))
    types = list(config.get("down_block_types") or _SD_TYPES)
    depth = config.get("transformer_layers_per_block") or 1
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(channels)
    added = config.get("addition_embed_type") or config.get("class_embed_type")
    return {
        "channels": channels, "layers per block": config.get("layers_per_block") or 2, "block types": types,
        "transformer depth": [d if "CrossAttn" in t else 0 for d, t in zip(depth, types)],
        "latent channels": config.get("in_channels") or 4, "condition channels": config.get("conditioning_channels") or 3,
        "hint encoder": list(config.get("conditioning_embedding_out_channels") or CONDITIONING_STAGES),
        "added embedding": [added, config.get("projection_class_embeddings_input_dim")] if added else None,
        "linear projection": bool(config.get("use_linear_projection")),
    }


def _text(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return "/".join(str(v) for v in value)
    return str(value)


#: File name endings with which ComfyUI turns global pooling on (comfy/controlnet.py); A1111 needs 'shuffle' in it.
POOLED_ENDINGS = ("_shuffle", "_shuffle_fp16")


def pooling_name_problem(path: str | Path, pooled: bool) -> str | None:
    """Why A1111 or ComfyUI would get this ControlNet's global pooling wrong from the file name, or None.

    Both decide pooling (ControlNet 1.1 shuffle) from the name alone: ComfyUI pools when the name (without its
    extension) ends in `_shuffle` or `_shuffle_fp16`, A1111 when it contains `shuffle` anywhere.
    """
    stem = Path(path).name.rsplit(".", 1)[0]
    if pooled and not stem.endswith(POOLED_ENDINGS):
        return (f"{Path(path).name}: this ControlNet pools its residuals (shuffle), and A1111 and ComfyUI pool only a "
                f"file whose name ends in _shuffle; name it e.g. {stem}_shuffle.safetensors")
    if not pooled and "shuffle" in stem.lower():
        return (f"{Path(path).name}: the name contains 'shuffle', so A1111 and ComfyUI would pool the residuals of "
                "this ControlNet, which does not pool; choose a name without 'shuffle'")
    return None
