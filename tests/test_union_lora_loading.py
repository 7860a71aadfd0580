"""ControlNet-Union checkpoints (diffusers folder and single file) and Control-LoRA files (Stability's SDXL format:
LoRA pairs over the base U-Net plus full tensors), loaded, checked and described; tiny real SDXL models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import public_config, same_tensors, trained_like_union
from safetensors.torch import load_file, save_file

from controlkit.checkpoint import inspect_checkpoint, load_controlnet, save_controlnet
from controlkit.cli import main
from controlkit.control import Control
from controlkit.controlnet import ConditionMetadata, check_fits
from controlkit.conversion import convert_controlnet
from controlkit.errors import CheckpointError, ConfigError
from controlkit.original_format import OriginalLayout, diffusers_to_original_keys
from controlkit.pipeline import generate
from controlkit.sd_pipelines import pipeline_from_components
from controlkit.tiny import TinyConfig, build_components, save_components

TINY_MODELS = True

PROMPT = "a blue sphere on the floor"


@pytest.fixture(scope="module")
def base(sdxl):
    return pipeline_from_components(sdxl)


@pytest.fixture(scope="module")
def union(sdxl):
    return trained_like_union(sdxl["unet"], seed=3)


@pytest.fixture(scope="module")
def sd_unet():
    return build_components(TinyConfig(), seed=0)["unet"]


def edge_map(size: int = 64) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[10:50, 30] = 255
    image[20, 8:56] = 255
    return image


def images(base, controls=()):
    return generate(base, PROMPT, controls, steps=2, seed=5, output_type="np").images




def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# -- ControlNet-Union ------------------------------------------------------------------------------------------------

def test_union_folder_round_trip(sdxl, base, union, tmp_path):
    folder = save_controlnet(union, tmp_path / "union", ConditionMetadata(condition="canny"))
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "ControlNetUnionModel"
    loaded, metadata = load_controlnet(folder)
    assert type(loaded).__name__ == "ControlNetUnionModel" and metadata.condition == "canny"
    assert same_tensors(loaded.state_dict(), union.state_dict())
    assert public_config(loaded.config) == public_config(union.config)
    control = Control.from_pretrained(folder, edge_map(), unet=sdxl["unet"], control_type="canny")
    np.testing.assert_array_equal(images(base, [control]), images(base, [Control(edge_map(), union,
                                                                                 control_type="canny")]))


def test_union_single_file_is_recognised_by_its_keys(sdxl, union, tmp_path):
    folder = save_controlnet(union, tmp_path / "union", ConditionMetadata())
    path = tmp_path / "diffusion_pytorch_model_promax.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", path)
    for unet in (None, sdxl["unet"]):
        loaded, _ = load_controlnet(path, unet=unet)
        assert type(loaded).__name__ == "ControlNetUnionModel"
        assert same_tensors(loaded.state_dict(), union.state_dict())
        # the weights hold every size but the fusion transformer's heads: the released models' 8
        differing = {k for k, v in public_config(loaded.config).items() if public_config(union.config).get(k) != v}
        if unet is not None:
            assert differing == {"num_trans_head"} and loaded.config.num_trans_head == 8
    assert inspect_checkpoint(path).format == "diffusers single file, ControlNet-Union (SDXL, 6 control types)"


def test_union_file_with_a_missing_key_is_one_line(union, tmp_path):
    tensors = {key: value.contiguous() for key, value in union.state_dict().items()}
    del tensors["transformer_layes.0.mlp.c_fc.weight"]
    save_file(tensors, str(tmp_path / "union.safetensors"))
    with pytest.raises(CheckpointError) as caught:
        load_controlnet(tmp_path / "union.safetensors")
    assert "1 missing (transformer_layes.0.mlp.c_fc.weight)" in one_line(caught)
    del tensors["spatial_ch_projs.weight"]
    save_file(tensors, str(tmp_path / "union.safetensors"))
    with pytest.raises(CheckpointError) as caught:
        load_controlnet(tmp_path / "union.safetensors")
    assert "spatial_ch_projs.weight is missing" in one_line(caught)


def test_union_config_out_of_bounds_is_refused_before_building(union, tmp_path):
    folder = save_controlnet(union, tmp_path / "union", ConditionMetadata())
    config = json.loads((folder / "config.json").read_text())
    for key, value, message in (("num_trans_layer", 1000, "`num_trans_layer` is 1000; a ControlNet-Union has 1 to 32"),
                                ("num_trans_channel", 48, "`num_trans_channel` is 48 but the first level has 32")):
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError) as caught:
            load_controlnet(folder)
        assert message in one_line(caught)


def test_union_has_no_original_format(union, tmp_path, capsys):
    folder = save_controlnet(union, tmp_path / "union", ConditionMetadata())
    with pytest.raises(ConfigError) as caught:
        convert_controlnet(folder, tmp_path / "union.safetensors", original=True, force=True)
    assert "ComfyUI and A1111 read its diffusers .safetensors file directly" in one_line(caught)
    with pytest.raises(ConfigError):
        save_controlnet(union, tmp_path / "union.safetensors", ConditionMetadata(), original=True)
    assert not (tmp_path / "union.safetensors").exists()
    assert main(["convert", str(folder), str(tmp_path / "u.safetensors"), "--to", "original", "--force"]) == 1
    assert "no original (lllyasviel) layout" in capsys.readouterr().err
    assert convert_controlnet(folder, tmp_path / "copy").tensor_count == len(union.state_dict())


def test_check_fits_compares_a_unions_encoder(sdxl, union, sd_unet):
    check_fits(union.state_dict(), union.config, sdxl["unet"])
    with pytest.raises(CheckpointError, match="is for a different base: the ControlNet is SDXL, the U-Net is custom"):
        check_fits(union.state_dict(), union.config, sd_unet)


def test_info_names_union_and_its_control_types(union, tmp_path, capsys):
    from diffusers import ControlNetUnionModel

    promax = ControlNetUnionModel.from_config({**union.config, "num_control_type": 8})  # ProMax's eight types
    save_controlnet(promax, tmp_path / "promax", ConditionMetadata())
    assert main(["info", str(tmp_path / "promax")]) == 0
    out = capsys.readouterr().out
    assert "format:" in out and "diffusers folder, ControlNet-Union (SDXL, 8 control types)" in out
    assert "no: a ControlNet-Union has no original layout" in out


# -- Control-LoRA ----------------------------------------------------------------------------------------------------

def write_control_lora(path, unet, seed=0):
    """A Control-LoRA for `unet` in Stability's format: bare original (SAI) key names, LoRA pairs `.down`/`.up` on
    the encoder's linear and convolution layers (rank 4; rank 2 on the cross-attention keys, as a per-layer rank),
    full tensors for norms, biases, the hint encoder, zero convolutions and the middle output, and the marker.
    `time_embedding.linear_2` is left out (it keeps the U-Net's weights). Returns the tensors by diffusers name."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        layout = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32),
                                           load_weights_from_unet=False)
    names = diffusers_to_original_keys(layout.state_dict(), OriginalLayout.from_config(layout.config))
    modules, generator = dict(layout.named_modules()), torch.Generator().manual_seed(seed)
    file, known = {"lora_controlnet": torch.tensor([])}, {}
    for key, value in layout.state_dict().items():
        module, _, param = key.rpartition(".")
        layer = modules[module]
        if module == "time_embedding.linear_2":
            continue
        if param == "weight" and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and not key.startswith(
                "controlnet_"):
            rank = 2 if "attn2.to_k" in key else 4
            down = torch.randn(rank, *value.shape[1:], generator=generator) * 0.1
            up = torch.randn(value.shape[0], rank, *([1, 1] if value.ndim == 4 else []), generator=generator) * 0.1
            stem = names[key][: -len(".weight")]
            file[f"{stem}.down"], file[f"{stem}.up"] = down, up
            known[key] = (down, up)
        else:
            file[names[key]] = known[key] = torch.randn(value.shape, generator=generator) * 0.1
    save_file(file, str(path))
    return known


@pytest.fixture(scope="module")
def lora_file(sdxl, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "control-lora-canny-rank4.safetensors"
    return path, write_control_lora(path, sdxl["unet"])


def test_control_lora_is_fused_onto_the_unet(sdxl, lora_file):
    path, known = lora_file
    unet_before = {key: value.clone() for key, value in sdxl["unet"].state_dict().items()}
    controlnet, metadata = load_controlnet(path, unet=sdxl["unet"])
    assert type(controlnet).__name__ == "ControlNetModel" and metadata.condition == "canny"
    state = controlnet.state_dict()
    assert not any("lora" in key or "base_layer" in key for key in state)
    for key, expected in known.items():
        if isinstance(expected, tuple):  # peft's scale is alpha / rank = 1: Control-LoRA files carry no alpha
            down, up = expected
            delta = (up.flatten(1) @ down.flatten(1)).reshape(state[key].shape)
            torch.testing.assert_close(state[key], unet_before[key] + delta, atol=1e-6, rtol=0)
        else:
            assert torch.equal(state[key], expected), key
    assert torch.equal(state["time_embedding.linear_2.weight"], unet_before["time_embedding.linear_2.weight"])
    assert same_tensors(sdxl["unet"].state_dict(), unet_before)  # the caller's U-Net is untouched


def test_control_lora_generates_deterministically_and_changes_the_image(sdxl, base, lora_file):
    path, _ = lora_file
    control = Control.from_pretrained(path, edge_map(), unet=sdxl["unet"])
    first = images(base, [control])
    np.testing.assert_array_equal(first, images(base, [Control.from_pretrained(path, edge_map(), unet=sdxl["unet"])]))
    assert np.abs(first - images(base)).max() > 1e-3


def test_control_lora_needs_the_base_unet(sd_unet, lora_file):
    path, _ = lora_file
    with pytest.raises(ConfigError) as caught:
        load_controlnet(path)
    assert "unet=base.unet" in one_line(caught) and "--base" in one_line(caught) and str(path) in one_line(caught)
    with pytest.raises(ConfigError, match="Control-LoRA"):
        Control.from_pretrained(path, edge_map())
    with pytest.raises(CheckpointError) as caught:
        load_controlnet(path, unet=sd_unet)
    assert "Control-LoRA is for a different base: it is SDXL, the U-Net is custom" in one_line(caught)


def test_a_damaged_control_lora_is_one_line(sdxl, lora_file, tmp_path):
    tensors = load_file(lora_file[0])
    for missing, message in (("input_blocks.1.0.in_layers.2.up", "down tensor without its up half"),
                             ("zero_convs.2.0.weight", "lacks 1 tensors"),
                             ("input_hint_block.2.weight", "hint encoder is incomplete")):
        save_file({k: v for k, v in tensors.items() if k != missing}, str(tmp_path / "damaged.safetensors"))
        with pytest.raises(CheckpointError) as caught:
            load_controlnet(tmp_path / "damaged.safetensors", unet=sdxl["unet"])
        assert message in one_line(caught), missing


def test_control_lora_names_match_diffusers_sai_converter_at_sdxl_size():
    """diffusers' own Control-LoRA converter (written for SDXL's layout) names every pair and full tensor of an
    SDXL-size file as our reader does."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel
    from diffusers.utils.state_dict_utils import convert_sai_sd_control_lora_state_dict_to_peft

    from controlkit.control_lora import split

    with init_empty_weights():  # SDXL's size (diffusers/controlnet-canny-sdxl-1.0), shapes only
        model = ControlNetModel.from_config({
            "block_out_channels": (320, 640, 1280), "layers_per_block": 2, "cross_attention_dim": 2048,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
            "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816})
    names = diffusers_to_original_keys(model.state_dict(), OriginalLayout.from_config(model.config))
    file = {"lora_controlnet": torch.tensor([])}
    for key, name in names.items():
        lora = key.endswith(".weight") and not key.startswith("controlnet_") and "norm" not in key
        file |= {f"{name[:-7]}.down": key, f"{name[:-7]}.up": key} if lora else {name: key}
    lora, full = split(file, model, "sdxl.safetensors", ("SDXL", "SDXL"))
    ours = {f"{module}.lora_{'A' if part == 'down' else 'B'}.weight" for module, pair in lora.items() for part in pair}
    theirs = convert_sai_sd_control_lora_state_dict_to_peft(file)
    assert ours | set(full) == set(theirs) and len(ours) == 2 * len(lora) > 500


def test_info_names_control_lora_and_checks_the_base(sdxl, lora_file, tmp_path, capsys):
    path, _ = lora_file
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:" in out and "Control-LoRA (rank 4), SDXL" in out
    assert "ComfyUI and A1111 read Control-LoRA files as they are" in out
    assert "canny (guessed from the file name)" in out
    save_components(sdxl, tmp_path / "base")
    assert main(["info", str(path), "--base", str(tmp_path / "base")]) == 0
    assert "fits --base" in capsys.readouterr().out
    save_components(build_components(TinyConfig(), seed=0), tmp_path / "sd_base")
    assert main(["info", str(path), "--base", str(tmp_path / "sd_base")]) == 1
    assert "Control-LoRA is for a different base" in capsys.readouterr().err
