"""Control-LoRA: Stability AI's SDXL control-lora files (control-lora-canny-rank128.safetensors and the like).

Such a file is a ControlNet stored as its difference from the base: for the copy of the U-Net's encoder it holds
LoRA pairs (`<module>.down` (rank, in[, kh, kw]) and `<module>.up` (out, rank[, 1, 1])) under the original
(SAI/lllyasviel) key names, full tensors for what the U-Net does not have or what training replaced (the hint
encoder, zero convolutions, norms, biases), and a `lora_controlnet` marker. ComfyUI and A1111 read it as it is.

Loading it needs the base's U-Net: the ControlNet is `ControlNetModel.from_unet(unet)` (the caller's U-Net is only
read), the pairs are loaded through diffusers' `load_lora_adapter` (peft), fused into the weights and unloaded,
and the full tensors are then set as given, as ComfyUI does. The result is a plain `ControlNetModel`.

The key names are mapped by `original_format` (the same map as every original-format ControlNet; at SDXL's size
it names every tensor as diffusers' `convert_sai_sd_control_lora_state_dict_to_peft` does). That converter is not
used: it assumes 2 layers per level and a 4-stage hint encoder, and through `load_lora_adapter` the full biases of
layers that carry a LoRA pair are dropped (peft has moved the layer's bias to `<layer>.base_layer.bias`), so those
layers would keep the U-Net's biases.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.controlnet import ConditionMetadata, base_family
from controlkit.errors import CheckpointError, ConfigError, preview

if TYPE_CHECKING:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

#: The key that marks a Control-LoRA file (ComfyUI, A1111 and diffusers test for it).
MARKER = "lora_controlnet"
#: What A1111/ComfyUI compatibility reads for these files.
CLIENTS = "yes (ComfyUI and A1111 read Control-LoRA files as they are)"
#: ControlNet parts the U-Net has no copy of: the file must hold them in full.
_CONTROL_ONLY = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
_ADAPTER = "control_lora"


def is_control_lora(keys: Iterable[str]) -> bool:
    """Whether a file's tensor names are a Control-LoRA's (the `lora_controlnet` marker)."""
    return MARKER in set(keys)


@dataclass(frozen=True)
class ControlLoraSummary:
    """What `controlkit info` shows about a Control-LoRA file (read from its tensors alone)."""

    rank: int
    family: str
    cross_attention_dim: int | None
    conditioning_channels: int
    parameter_count: int
    tensor_count: int
    dtype: str

    @property
    def format(self) -> str:
        """'Control-LoRA (rank 128), SDXL'."""
        return f"Control-LoRA (rank {self.rank}), {self.family}"


def summarize(tensors: Mapping[str, torch.Tensor]) -> ControlLoraSummary:
    """Rank (the most common one), base family, sizes and dtype of a Control-LoRA's tensors."""
    weights = {key: value for key, value in tensors.items() if key != MARKER}
    ranks = Counter(int(value.shape[0]) for key, value in weights.items() if key.endswith(".down") and value.ndim)
    cross = next((value for key, value in weights.items() if key.endswith("attn2.to_k.down")), None)
    width = int(cross.shape[1]) if cross is not None and cross.ndim == 2 else None
    labelled = any(key.startswith("label_emb.") for key in weights)
    family = base_family({"cross_attention_dim": width, "addition_embed_type": "text_time" if labelled else None})
    hint = weights.get("input_hint_block.0.weight")
    dtypes = sorted({str(value.dtype).replace("torch.", "") for value in weights.values()})
    return ControlLoraSummary(
        rank=ranks.most_common(1)[0][0] if ranks else 0, family=family, cross_attention_dim=width,
        conditioning_channels=int(hint.shape[1]) if hint is not None and hint.ndim == 4 else 3,
        parameter_count=sum(value.numel() for value in weights.values()), tensor_count=len(weights),
        dtype="/".join(dtypes),
    )


def load_control_lora(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    header: Mapping[str, str],
    *,
    unet: UNet2DConditionModel | None,
    torch_dtype: torch.dtype | None = None,
) -> tuple[ControlNetModel, ConditionMetadata]:
    """The ControlNet a Control-LoRA file describes for `unet`: eval mode, on the U-Net's device, in `torch_dtype`
    (default: the U-Net's dtype).

    Args:
        path: the file (for messages and the condition guessed from its name).
        tensors: its tensors (original key names).
        header: its safetensors header metadata (condition metadata stored there is returned).
        unet: the base's U-Net whose weights the LoRA pairs are added to; it is not modified.

    Raises:
        ConfigError: no `unet`.
        CheckpointError: a file that does not fit `unet`, or holds keys, shapes or values a Control-LoRA cannot.
    """
    import torch

    if unet is None:
        raise ConfigError(f"{path} is a Control-LoRA: it stores the ControlNet as changes to its base's U-Net, so "
                          "loading it needs that U-Net; pass unet=base.unet (controlkit generate passes its --base's)")
    if any(parameter.is_meta for parameter in unet.parameters()):
        raise ConfigError(f"{path} is a Control-LoRA: it needs the base U-Net's weights, not an empty U-Net")
    controlnet = controlnet_for(unet, tensors, path)
    families = _families(tensors, unet)
    lora, full = split(tensors, controlnet, path, families)
    check_parts(lora, full, controlnet, path, families)
    with torch.no_grad():
        _fuse(controlnet, lora)
        controlnet.load_state_dict(full, strict=False)  # every key was checked to be the model's
    dtype = torch_dtype or unet.dtype
    # place the tensors, not the model: ModelMixin.to warns about fp32-pinned modules
    placed = {key: value.to(device=unet.device, dtype=dtype if value.is_floating_point() else value.dtype)
              for key, value in controlnet.state_dict().items()}
    controlnet.load_state_dict(placed, assign=True)
    return controlnet.eval(), _metadata(path, header)[0]


def check_fits(path: Path, tensors: Mapping[str, torch.Tensor], unet: UNet2DConditionModel) -> None:
    """Everything `load_control_lora` checks before it computes, against a U-Net that may be empty (meta)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        controlnet = controlnet_for(unet, tensors, path, copy_weights=False)
    families = _families(tensors, unet)
    lora, full = split(tensors, controlnet, path, families)
    check_parts(lora, full, controlnet, path, families)


def _families(tensors: Mapping[str, torch.Tensor], unet: Any) -> tuple[str, str]:
    return summarize(tensors).family, base_family(unet.config)


def controlnet_for(unet: UNet2DConditionModel, tensors: Mapping[str, torch.Tensor], path: Path, *,
                   copy_weights: bool = True) -> ControlNetModel:
    """`ControlNetModel.from_unet(unet)` with the file's hint encoder (condition channels and stages)."""
    from diffusers import ControlNetModel

    channels, stages = _hint_encoder(tensors, path)
    return ControlNetModel.from_unet(unet, conditioning_channels=channels, conditioning_embedding_out_channels=stages,
                                     load_weights_from_unet=copy_weights)


def _hint_encoder(tensors: Mapping[str, torch.Tensor], path: Path) -> tuple[int, tuple[int, ...]]:
    """(condition channels, stage channels) of the file's hint encoder: input_hint_block.0, 2, ..., 2n are its
    convolutions; the inner ones alternate a same-width and a widening one."""
    pattern = r"input_hint_block\.(\d{1,2})\.weight"
    convs = sorted(int(m.group(1)) for key in tensors if (m := re.fullmatch(pattern, key)))
    if len(convs) < 2 or convs != list(range(0, 2 * len(convs), 2)):
        raise CheckpointError(f"{path}: the Control-LoRA's hint encoder is incomplete (input_hint_block convolutions "
                              f"{convs}); the file is damaged")
    shapes = [tuple(tensors[f"input_hint_block.{index}.weight"].shape) for index in convs]
    if any(len(shape) != 4 for shape in shapes):
        raise CheckpointError(f"{path}: the Control-LoRA's hint encoder holds tensors that are not convolutions")
    return shapes[0][1], (shapes[0][0], *(shape[0] for shape in shapes[1:-1][1::2]))


def split(tensors: Mapping[str, torch.Tensor], controlnet: ControlNetModel, path: Path,
          families: tuple[str, str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The file under diffusers names: ({module: {'down': A, 'up': B}}, {parameter: full tensor}). `families`: the
    file's and the U-Net's, for the message when its keys have no place in this U-Net's layout."""
    from controlkit.original_format import OriginalLayout, original_to_diffusers_keys

    keys = [key for key in tensors if key != MARKER]
    try:
        names = original_to_diffusers_keys(keys, OriginalLayout.from_config(controlnet.config))
    except CheckpointError as error:
        raise CheckpointError(f"{path}: Control-LoRA is for a different base: it is {families[0]}, the U-Net is "
                              f"{families[1]}, and its keys do not fit this U-Net's layout ({error})") from None
    lora: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key in keys:
        module, _, part = names[key].rpartition(".")
        if part in ("down", "up"):
            lora.setdefault(module, {})[part] = tensors[key]
        else:
            full[names[key]] = tensors[key]
    return lora, full


def check_parts(lora: Mapping[str, Mapping[str, torch.Tensor]], full: Mapping[str, torch.Tensor],
                controlnet: ControlNetModel, path: Path, families: tuple[str, str]) -> None:
    """Every pair on a linear or convolution layer with matching shapes, every full tensor one of the model's with
    its shape, the ControlNet-only parts all there, and every value finite. `families`: the file's and the
    U-Net's base family, for the message when they differ."""
    shapes = {key: tuple(value.shape) for key, value in controlnet.state_dict().items()}
    modules = dict(controlnet.named_modules())
    unknown = sorted({*(key for key in full if key not in shapes), *(m for m in lora if m not in modules)})
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} Control-LoRA tensors name nothing in a ControlNet for this "
                              f"U-Net ({preview(unknown)})")
    expected = {key: _pair_shapes(modules[key], pair, path, key) for key, pair in lora.items()}
    found = [(key, tuple(value.shape), shapes[key]) for key, value in full.items()]
    found += [(f"{key}.{part}", tuple(lora[key][part].shape), shape)
              for key, pair in expected.items() for part, shape in pair.items()]
    wrong = [item for item in found if item[1] != item[2]]
    if wrong:
        key, in_file, want = wrong[0]
        raise CheckpointError(
            f"{path}: Control-LoRA is for a different base: it is {families[0]}, the U-Net is {families[1]}; "
            f"{len(wrong)} tensors differ, first {key}: {in_file} in the file, {want} for this U-Net; use a "
            "Control-LoRA made for this base"
        )
    missing = sorted(key for key in shapes if key.startswith(_CONTROL_ONLY) and key not in full)
    if missing:
        raise CheckpointError(f"{path}: the Control-LoRA lacks {len(missing)} tensors of the parts the U-Net has no "
                              f"copy of ({preview(missing)}); the file is incomplete")
    _check_finite(path, [*full.items(), *((f"{m}.{p}", t) for m, pair in lora.items() for p, t in pair.items())])


def _pair_shapes(layer: Any, pair: Mapping[str, torch.Tensor], path: Path, name: str) -> dict[str, tuple[int, ...]]:
    """The shapes `down` and `up` must have on this layer, at the pair's rank."""
    import torch

    if set(pair) != {"down", "up"}:
        raise CheckpointError(f"{path}: {name} has a LoRA {'down' if 'down' in pair else 'up'} tensor without its "
                              f"{'up' if 'down' in pair else 'down'} half; the file is damaged")
    rank = int(pair["down"].shape[0]) if pair["down"].ndim else 0
    if rank < 1:
        raise CheckpointError(f"{path}: {name}.down has shape {tuple(pair['down'].shape)}, no LoRA rank; the file is "
                              "damaged")
    if isinstance(layer, torch.nn.Linear):
        return {"down": (rank, layer.in_features), "up": (layer.out_features, rank)}
    if isinstance(layer, torch.nn.Conv2d):
        return {"down": (rank, layer.in_channels, *layer.kernel_size), "up": (layer.out_channels, rank, 1, 1)}
    raise CheckpointError(f"{path}: {name} carries a LoRA pair but is a {type(layer).__name__}, not a linear or "
                          "convolution layer")


def _check_finite(path: Path, items: list[tuple[str, torch.Tensor]]) -> None:
    import torch

    bad = [key for key, value in items if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN or Inf values ({preview(bad)}); the file is "
                              "damaged")


def _fuse(controlnet: ControlNetModel, lora: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """W += up @ down on every paired layer, through diffusers' peft loading: scale 1 (Control-LoRA files carry no
    alpha, so peft's alpha is the rank), each layer at its own rank, targets named exactly."""
    if not lora:
        return
    state = {}
    for module, pair in lora.items():
        state[f"{module}.lora_A.weight"] = pair["down"]
        state[f"{module}.lora_B.weight"] = pair["up"]
    ranks = {module: int(pair["down"].shape[0]) for module, pair in lora.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(module): value for module, value in ranks.items() if value != rank}
    targets = "|".join(re.escape(module) for module in lora)  # exact names: "conv_in" must not take the hint's
    config = {"r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": f"^(?:{targets})$"}
    controlnet.load_lora_adapter(state, prefix=None, adapter_name=_ADAPTER, metadata=config)
    controlnet.fuse_lora(lora_scale=1.0, adapter_names=[_ADAPTER])
    controlnet.unload_lora()


def control_lora_info(path: Path, tensors: Mapping[str, torch.Tensor], header: Mapping[str, str],
                      unet: UNet2DConditionModel | None) -> dict[str, Any]:
    """`checkpoint.CheckpointInfo`'s fields (all but the path) for a Control-LoRA file, read from its tensors alone
    and checked against `unet` (which may be empty) when one is given."""
    if unet is not None:
        check_fits(path, tensors, unet)
    summary = summarize(tensors)
    metadata, source = _metadata(path, header)
    return {"format": summary.format, "metadata": metadata, "metadata_source": source,
            "parameter_count": summary.parameter_count, "tensor_count": summary.tensor_count, "dtype": summary.dtype,
            "family": summary.family, "cross_attention_dim": summary.cross_attention_dim,
            "conditioning_channels": summary.conditioning_channels, "config_stored": False, "clients": CLIENTS}


def _metadata(path: Path, header: Mapping[str, str]) -> tuple[ConditionMetadata, str]:
    """The stored condition metadata, else the one the file name gives; and 'stored', 'file name' or 'none'."""
    stored = ConditionMetadata.from_metadata(header)
    if stored is not None:
        return stored, "stored"
    guessed = guess_condition(path.name)
    return guessed, "file name" if guessed.condition else "none"


def guess_condition(name: str) -> ConditionMetadata:
    """Condition metadata from a Control-LoRA file name: control-lora-canny-rank128 or sai_xl_depth_256lora."""
    stem = name.lower().rsplit(".", 1)[0]
    match = re.match(r"(?:control-lora-([a-z]+)-rank\d+|sai_xl_([a-z]+)_\d+lora)", stem)
    return ConditionMetadata(condition=(match.group(1) or match.group(2)) if match else None)
