"""The original (lllyasviel/A1111/ComfyUI) key map, proven against diffusers' own single-file converter."""

from __future__ import annotations

import pytest
import torch

from controlkit.checkpoint import expected_shapes, save_controlnet
from controlkit.controlnet import ConditionMetadata, build_controlnet, infer_config
from controlkit.errors import CheckpointError
from controlkit.original_format import (
    CONTROL_PREFIX,
    ClientSupport,
    OriginalLayout,
    client_support,
    diffusers_to_original_keys,
    from_original,
    to_original,
)
from controlkit.tiny import TinyConfig, build_components

torch.set_num_threads(2)

_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD15 = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "cross_attention_dim": 768,
        "attention_head_dim": 8, "down_block_types": _SD_DOWN}
SD21 = {**SD15, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True}
SDXL = {"block_out_channels": (320, 640, 1280), "layers_per_block": 2, "cross_attention_dim": 2048,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816}
FAMILIES = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}


def _meta_state_dict(config):
    """Parameters of a full-size ControlNet on the meta device: real names and shapes, no memory."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        model = ControlNetModel.from_config(config)
    return dict(model.state_dict()), dict(model.config)


@pytest.fixture(scope="module")
def tiny():
    """A tiny ControlNet with random (non-zero) weights everywhere, and its U-Net."""
    unet = build_components(TinyConfig(block_out_channels=(32, 64, 64), layers_per_block=2), seed=0)["unet"]
    controlnet = build_controlnet(unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return controlnet, unet


def test_sd15_original_names_and_shapes():
    state_dict, config = _meta_state_dict(SD15)
    original = to_original(state_dict, config, prefix="")
    shapes = {key: tuple(value.shape) for key, value in original.items()}
    assert len(original) == len(state_dict)
    assert shapes["input_hint_block.0.weight"] == (16, 3, 3, 3)
    assert shapes["input_hint_block.14.weight"] == (320, 256, 3, 3)
    assert shapes["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes["input_blocks.4.0.skip_connection.weight"] == (640, 320, 1, 1)
    assert shapes["input_blocks.9.0.op.weight"] == (1280, 1280, 3, 3)
    assert shapes["time_embed.0.weight"] == (1280, 320)
    assert shapes["middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert shapes["middle_block_out.0.weight"] == (1280, 1280, 1, 1)
    assert {f"zero_convs.{i}.0.weight" for i in range(12)} <= set(shapes) and "zero_convs.12.0.weight" not in shapes
    assert not any(key.startswith("input_blocks.12.") for key in shapes)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_matches_diffusers_converter_at_full_size(family):
    """diffusers' converter on our export gives back every tensor under its own name (identity, not a copy)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    state_dict, config = _meta_state_dict(FAMILIES[family])
    original = to_original(state_dict, config)
    converted = convert_controlnet_checkpoint(original, config)
    # diffusers' ControlNet converter does not map SDXL's added embedding (label_emb); everything else must match
    not_mapped = {key for key in state_dict if key.startswith("add_embedding.")}
    assert set(converted) == set(state_dict) - not_mapped
    assert all(converted[key] is state_dict[key] for key in converted)
    assert from_original(original, OriginalLayout.from_config(config)).keys() == state_dict.keys()
    ours = from_original(original)  # layout inferred from the keys alone
    assert all(ours[key] is state_dict[key] for key in state_dict)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layout_from_original_keys_equals_layout_from_config(family):
    state_dict, config = _meta_state_dict(FAMILIES[family])
    original = to_original(state_dict, config, prefix="")
    assert OriginalLayout.from_original_keys(original) == OriginalLayout.from_config(config)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_inferred_from_weights_rebuilds_the_same_model(family):
    state_dict, config = _meta_state_dict(FAMILIES[family])
    inferred = infer_config(state_dict)
    assert expected_shapes(inferred) == {key: tuple(value.shape) for key, value in state_dict.items()}
    for name in ("cross_attention_dim", "use_linear_projection", "addition_embed_type", "layers_per_block"):
        assert inferred.get(name) == config.get(name), name
    heads = config["attention_head_dim"]
    assert inferred["attention_head_dim"] == (list(heads) if isinstance(heads, tuple) else heads)


def test_export_import_round_trip_is_bitwise(tiny):
    controlnet, _ = tiny
    state_dict = controlnet.state_dict()
    original = to_original(state_dict, controlnet.config)
    assert all(key.startswith(CONTROL_PREFIX) for key in original)
    back = from_original(original)
    assert back.keys() == state_dict.keys()
    assert all(torch.equal(back[key], state_dict[key]) for key in state_dict)
    bare = from_original({key[len(CONTROL_PREFIX):]: value for key, value in original.items()})
    assert all(bare[key] is back[key] for key in back)


def test_tiny_import_matches_diffusers_converter_and_from_single_file(tiny, tmp_path):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    controlnet, _ = tiny
    save_controlnet(controlnet, tmp_path / "folder", ConditionMetadata())
    exported = save_controlnet(controlnet, tmp_path / "control.safetensors", ConditionMetadata(), original=True)
    original = load_file(exported)
    ours = from_original(original)
    theirs = convert_controlnet_checkpoint(original, dict(controlnet.config))
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[key], ours[key]) for key in ours)
    loaded = ControlNetModel.from_single_file(str(exported), config=str(tmp_path / "folder"), local_files_only=True)
    reference = controlnet.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())


def test_sdxl_like_added_embedding_maps_to_label_emb(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, use_linear_projection=True, sample_size=16,
    )
    controlnet = build_controlnet(unet)
    names = diffusers_to_original_keys(controlnet.state_dict(), OriginalLayout.from_config(controlnet.config))
    assert names["add_embedding.linear_1.weight"] == "label_emb.0.0.weight"
    assert names["add_embedding.linear_2.bias"] == "label_emb.0.2.bias"
    assert names["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"] == (
        "input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight")  # 0 conv_in, 1 resnet, 2 downsampler
    back = from_original(to_original(controlnet.state_dict(), controlnet.config))
    assert all(torch.equal(back[key], value) for key, value in controlnet.state_dict().items())


def test_unmapped_keys_are_listed():
    layout = OriginalLayout(levels=2, layers_per_block=1, hint_blocks=6)
    with pytest.raises(CheckpointError, match=r"2 diffusers keys .*lora_a\.weight.*extra\.bias"):
        diffusers_to_original_keys(["conv_in.weight", "lora_a.weight", "extra.bias"], layout)
    with pytest.raises(CheckpointError, match="input_blocks"):
        OriginalLayout.from_original_keys(["time_embed.0.weight"])


def test_a_mid_block_without_cross_attention_cannot_be_exported():
    with pytest.raises(CheckpointError, match="mid_block_type"):
        OriginalLayout.from_config({"block_out_channels": (32,), "layers_per_block": 1,
                                    "mid_block_type": "UNetMidBlock2D"})


@pytest.mark.slow
def test_full_size_sd15_round_trip_and_diffusers_single_file_parity(tmp_path):
    """A real-size SD1.5 ControlNet (361M parameters, 1.4 GB): our export is exact and diffusers reads it."""
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    from controlkit.checkpoint import load_controlnet

    controlnet = ControlNetModel.from_config(SD15)
    exported = save_controlnet(controlnet, tmp_path / "control_v11p_sd15_canny.safetensors",
                               ConditionMetadata(condition="canny"), original=True)
    assert len(load_file(exported)) == 340  # as in the released 1.1 files
    loaded, metadata = load_controlnet(exported)
    reference = controlnet.state_dict()
    assert metadata.condition == "canny"
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())
    controlnet.save_config(tmp_path / "config")
    theirs = ControlNetModel.from_single_file(str(exported), config=str(tmp_path / "config"), local_files_only=True)
    assert all(torch.equal(value, reference[key]) for key, value in theirs.state_dict().items())


# -- what A1111 and ComfyUI read -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, expected", [("sd15", "yes (SD1.x layout)"), ("sd21", "yes (SD2.x layout)"),
                                              ("sdxl", "yes (SDXL layout)")])
def test_standard_layouts_are_readable_by_the_clients(family, expected):
    _, config = _meta_state_dict(FAMILIES[family])
    assert client_support(config) == ClientSupport(True, expected)
    assert not client_support({**config, "conditioning_channels": 1}).readable


def test_other_layouts_are_named_custom(tiny):
    controlnet, _ = tiny
    assert client_support(controlnet.config).line == (
        "no: custom layout (cross-attention 32, channels 32/64/64, 2 layers per block)")
    _, config = _meta_state_dict(SD15)
    assert client_support({**config, "layers_per_block": 1}).line == (
        "no: custom layout (SD1.x but layers per block 1; the clients build 2)")


def test_a_bgr_controlnet_is_exported_for_clients_that_feed_rgb(tiny, tmp_path):
    """The exported file, read the way A1111 and ComfyUI read it (no config: RGB in, no flip), gives the residuals
    the BGR diffusers model gives for the same RGB image; our own reader restores the BGR model bit for bit."""
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    from controlkit.checkpoint import load_controlnet

    controlnet, _ = tiny
    config = {k: v for k, v in controlnet.config.items() if not k.startswith("_")}
    bgr = ControlNetModel.from_config({**config, "controlnet_conditioning_channel_order": "bgr"}).eval()
    bgr.load_state_dict(controlnet.state_dict())
    path = save_controlnet(bgr, tmp_path / "bgr.safetensors", ConditionMetadata(), original=True)
    as_clients_read = ControlNetModel.from_config(config).eval()  # rgb: what a client builds
    as_clients_read.load_state_dict(from_original(load_file(path)))
    rgb_image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = _residuals(bgr, rgb_image)
    assert _relative_error(_residuals(as_clients_read, rgb_image), expected) < 1e-5
    assert _relative_error(_residuals(controlnet.eval(), rgb_image), expected) > 1e-2  # unflipped: off
    back, _ = load_controlnet(path)
    assert back.config.controlnet_conditioning_channel_order == "bgr"
    assert all(torch.equal(back.state_dict()[key], value) for key, value in bgr.state_dict().items())


def _relative_error(ours, reference):
    return float((ours - reference).abs().max() / reference.abs().max())


def _residuals(model, image):
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 5, 32, generator=generator)
    with torch.no_grad():
        down, mid = model(sample, torch.tensor([99]), text, controlnet_cond=image, return_dict=False)
    return torch.cat([r.flatten() for r in (*down, mid)])
