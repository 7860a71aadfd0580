"""SDXL formats: SDXL ControlNets through the original (A1111/ComfyUI) format and back, bit for bit; the real SDXL
size's original key set; SDXL single-file bases read offline with a local config; `controlkit info` naming SDXL."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import public_config, same_tensors, trained_like_controlnet
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from controlkit.checkpoint import load_controlnet, save_controlnet
from controlkit.cli import main
from controlkit.control import Control
from controlkit.controlnet import ConditionMetadata
from controlkit.conversion import convert_controlnet
from controlkit.errors import WeightsNotFoundError
from controlkit.original_format import client_support, from_original, to_original
from controlkit.pipeline import generate
from controlkit.sd_pipelines import load_base, pipeline_from_components
from controlkit.tiny import save_components

TINY_MODELS = True

PROMPT = "a red cube on the floor"

#: diffusers' SDXL ControlNet config (diffusers/controlnet-canny-sdxl-1.0), the size A1111 and ComfyUI build.
SDXL_CONTROLNET = {
    "in_channels": 4, "conditioning_channels": 3, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "conditioning_embedding_out_channels": (16, 32, 96, 256),
}


@pytest.fixture(scope="module")
def base(sdxl):
    return pipeline_from_components(sdxl)


@pytest.fixture(scope="module")
def controlnet(sdxl):
    return trained_like_controlnet(sdxl["unet"], seed=1)


def edge_map(size: int = 64) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[8:40, 20] = 255
    image[30, 10:50] = 255
    return image


def images(base, controls=()):
    return generate(base, PROMPT, controls, steps=2, seed=3, output_type="np").images




# -- SDXL ControlNets through the original format ------------------------------------------------------------------

def test_tiny_sdxl_controlnet_round_trips_bitwise_through_the_original_format(sdxl, base, controlnet, tmp_path):
    save_controlnet(controlnet, tmp_path / "folder", ConditionMetadata(condition="canny"))
    result = convert_controlnet(tmp_path / "folder", tmp_path / "control_sdxl_canny.safetensors", original=True,
                                force=True)
    assert result.clients == "no: custom layout (SDXL but channels 32/64; the clients build 320/640/1280)"
    with safe_open(str(result.path), "pt") as reader:
        keys = set(reader.keys())
    assert all(key.startswith("control_model.") for key in keys)
    assert {"control_model.label_emb.0.0.weight", "control_model.middle_block_out.0.weight"} <= keys
    loaded, metadata = load_controlnet(result.path)
    assert metadata.condition == "canny"
    assert same_tensors(loaded.state_dict(), controlnet.state_dict())
    assert public_config(loaded.config) == public_config(controlnet.config)
    control = [Control(edge_map(), controlnet)]
    expected = images(base, control)
    np.testing.assert_array_equal(images(base, [Control(edge_map(), loaded)]), expected)
    assert np.abs(expected - images(base)).max() > 1e-3  # the control reaches the image
    back = convert_controlnet(result.path, tmp_path / "back")
    assert same_tensors(load_file(back.path / "diffusion_pytorch_model.safetensors"),
                        load_file(tmp_path / "folder" / "diffusion_pytorch_model.safetensors"))


def test_a_client_written_sdxl_file_without_our_config_loads_with_the_unet(sdxl, base, controlnet, tmp_path):
    """Files from other tools carry no config: the layout comes from the keys, the attention from the U-Net."""
    path = tmp_path / "control_sdxl.safetensors"
    original = to_original(controlnet.state_dict(), controlnet.config)
    save_file({key: value.contiguous() for key, value in original.items()}, str(path))
    loaded, _ = load_controlnet(path, unet=sdxl["unet"])
    assert same_tensors(loaded.state_dict(), controlnet.state_dict())
    expected = images(base, [Control(edge_map(), controlnet)])
    np.testing.assert_array_equal(images(base, [Control(edge_map(), loaded)]), expected)


def comfyui_sdxl_keys() -> set[str]:
    """The tensor names of an SDXL ControlNet as ComfyUI's cldm.ControlNet (and lllyasviel's) names them, written
    out from SDXL's layout: two res blocks per level, transformer depth 0, 2, 10, a downsampler after the first two
    levels, 9 zero convolutions, the 8-convolution hint block, the time and label (added) embeddings."""
    wb = ("weight", "bias")
    keys = {f"{name}.{p}" for name in ("time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2",
                                       "input_blocks.0.0", "middle_block_out.0") for p in wb}
    keys |= {f"input_hint_block.{2 * i}.{p}" for i in range(8) for p in wb}
    keys |= {f"zero_convs.{i}.0.{p}" for i in range(9) for p in wb}

    def resnet(prefix, skip):
        names = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"]
        return {f"{prefix}.{n}.{p}" for n in names + ["skip_connection"] * skip for p in wb}

    def transformer(prefix, depth):
        found = {f"{prefix}.{n}.{p}" for n in ("norm", "proj_in", "proj_out") for p in wb}
        for d in range(depth):
            block = f"{prefix}.transformer_blocks.{d}"
            found |= {f"{block}.{a}.to_{x}.weight" for a in ("attn1", "attn2") for x in "qkv"}
            found |= {f"{block}.{n}.{p}" for n in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
                                                   "norm1", "norm2", "norm3") for p in wb}
        return found

    index = 1
    for level, depth in enumerate((0, 2, 10)):
        for layer in range(2):
            keys |= resnet(f"input_blocks.{index}.0", skip=level > 0 and layer == 0)
            keys |= transformer(f"input_blocks.{index}.1", depth) if depth else set()
            index += 1
        if level < 2:
            keys |= {f"input_blocks.{index}.0.op.{p}" for p in wb}
            index += 1
    return keys | resnet("middle_block.0", False) | transformer("middle_block.1", 10) | resnet("middle_block.2", False)


def test_sdxl_size_converts_to_the_key_set_comfyui_and_a1111_read():
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():  # SDXL's 1.25 B parameters as shapes only
        model = ControlNetModel.from_config(SDXL_CONTROLNET)
    state_dict, config = model.state_dict(), dict(model.config)
    original = to_original(state_dict, config, prefix="")
    assert set(original) == comfyui_sdxl_keys()
    assert len(original) == len(state_dict)
    assert tuple(original["label_emb.0.0.weight"].shape) == (1280, 2816)
    assert tuple(original["input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape) == (1280, 2048)
    support = client_support(config)
    assert support.readable and support.line == "yes (SDXL layout)"
    back = from_original(to_original(state_dict, config))  # with the control_model. prefix, layout from the keys
    assert back.keys() == state_dict.keys() and all(back[key] is state_dict[key] for key in state_dict)


# -- SDXL single-file bases ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unequal_sdxl(sdxl):
    """The tiny SDXL components with text encoders of different widths (16 + 48 = the U-Net's 64), as SDXL's
    768 + 1280: diffusers' single-file reader tells the two encoders apart by their width."""
    torch.manual_seed(5)
    components = dict(sdxl)
    for name, width in (("text_encoder", 16), ("text_encoder_2", 48)):
        encoder = sdxl[name]
        config = type(encoder.config)(**{**encoder.config.to_dict(), "hidden_size": width,
                                         "intermediate_size": 4 * width, "num_attention_heads": width // 16})
        components[name] = type(encoder)(config).eval()
    return components


def test_sdxl_single_file_base_loads_offline_with_a_local_config(unequal_sdxl, tmp_path):
    folder = save_components(unequal_sdxl, tmp_path / "sdxl-base")
    path = tmp_path / "sdxl_base.safetensors"
    save_file(original_sdxl_checkpoint(unequal_sdxl), str(path))
    loaded = load_base(path, config=folder)
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert same_tensors(getattr(loaded, name).state_dict(), unequal_sdxl[name].state_dict()), name
    np.testing.assert_array_equal(images(loaded), images(load_base(folder)))


def test_sdxl_single_file_without_a_config_names_base_config(unequal_sdxl, tmp_path):
    path = tmp_path / "sdxl_base.safetensors"
    save_file(original_sdxl_checkpoint(unequal_sdxl), str(path))
    with pytest.raises(WeightsNotFoundError) as caught:
        load_base(path)
    message = str(caught.value)
    assert "\n" not in message and "--base-config" in message and "SDXL" in message and str(path) in message


_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def original_sdxl_checkpoint(components) -> dict[str, torch.Tensor]:
    """The components under the original SDXL single-file names that `StableDiffusionXLPipeline.from_single_file`
    reads (the inverse of diffusers' converters, which the installed diffusers does not ship for SDXL)."""
    unet, vae = components["unet"], components["vae"]
    checkpoint = {f"model.diffusion_model.{_unet_key(k, unet.config)}": v for k, v in unet.state_dict().items()}
    checkpoint |= {f"first_stage_model.{_vae_key(k, len(vae.config.block_out_channels))}": v
                   for k, v in vae.state_dict().items()}
    clip = components["text_encoder"].state_dict()  # transformers 5 drops CLIPTextModel's text_model. prefix
    checkpoint |= {f"conditioner.embedders.0.transformer.text_model.{k.removeprefix('text_model.')}": v
                   for k, v in clip.items()}
    checkpoint |= {f"conditioner.embedders.1.model.{k}": v
                   for k, v in _open_clip(components["text_encoder_2"].state_dict()).items()}
    return {key: value.detach().contiguous() for key, value in checkpoint.items()}


def _resnet(rest: str) -> str:
    return next(old + rest[len(new):] for new, old in _RESNET if rest.startswith(new + "."))


def _unet_key(key: str, config) -> str:
    stride = config.layers_per_block + 1  # blocks per level: the layers and a down/upsampler
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    module, _, param = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{param}"
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        side, level, kind, layer, rest = m.groups()
        index = (1 + int(level) * stride if side == "down" else int(level) * stride) + int(layer)
        blocks = "input_blocks" if side == "down" else "output_blocks"
        return f"{blocks}.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"{blocks}.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * stride}.0.op.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        slot = 2 if "CrossAttn" in config.up_block_types[int(m[1])] else 1  # after the transformer, if any
        return f"output_blocks.{int(m[1]) * stride + stride - 1}.{slot}.conv.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"


def _vae_key(key: str, levels: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    up = lambda m: f"decoder.up.{levels - 1 - int(m[1])}."  # noqa: E731 - diffusers counts the decoder the other way
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + "block.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    if "mid_block.attentions.0." in key:
        key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
        for new, old in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")):
            key = key.replace(new, old)
    return key


def _open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's names for the second text encoder: fused q/k/v, a (width, projection) text projection."""
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    result, qkv = {"text_projection": state["text_projection.weight"].T}, {}
    for key, value in state.items():
        if key in fixed:
            result[fixed[key]] = value
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key):
            rest = m[2]
            for new, old in (("self_attn.", "attn."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                rest = rest.replace(new, old)
            result[f"transformer.resblocks.{m[1]}.{rest}"] = value
    for (layer, kind), parts in qkv.items():
        result[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[x] for x in "qkv"])
    return result


# -- controlkit info -------------------------------------------------------------------------------------------------

def test_info_names_sdxl_controlnets(controlnet, tmp_path, capsys):
    save_controlnet(controlnet, tmp_path / "folder", ConditionMetadata(condition="canny"))
    assert main(["info", str(tmp_path / "folder")]) == 0
    out = capsys.readouterr().out
    assert "fits:" in out and "SDXL U-Nets (cross-attention width 64)" in out
    assert "no: custom layout (SDXL but channels 32/64; the clients build 320/640/1280)" in out
    original = save_controlnet(controlnet, tmp_path / "control_sdxl.safetensors", ConditionMetadata(), original=True)
    assert main(["info", str(original), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"family": "SDXL"' in out and '"format": "original (ControlNet only)"' in out
