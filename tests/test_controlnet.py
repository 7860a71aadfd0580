"""The ControlNet layer: from_unet invariants and condition metadata."""

from __future__ import annotations

import json

import pytest
import torch

from controlkit.controlnet import ConditionMetadata, base_family, build_controlnet, guess_metadata
from controlkit.errors import CheckpointError
from controlkit.tiny import TinyConfig, build_components

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def unet():
    return build_components(TinyConfig(), seed=0)["unet"].eval()


def _inputs(batch: int = 2, channels: int = 3):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, 32, 32, generator=generator)
    text = torch.randn(batch, 7, 32, generator=generator)
    condition = torch.rand(batch, channels, 256, 256, generator=generator)
    return sample, torch.tensor([10, 500]), text, condition


def test_fresh_controlnet_residuals_are_exactly_zero_and_leave_the_unet_unchanged(unet):
    controlnet = build_controlnet(unet).eval()
    sample, timesteps, text, condition = _inputs()
    with torch.no_grad():
        down, mid = controlnet(sample, timesteps, text, controlnet_cond=condition, return_dict=False)
        plain = unet(sample, timesteps, text).sample
        controlled = unet(sample, timesteps, text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
    levels, layers = len(unet.config.block_out_channels), unet.config.layers_per_block
    assert len(down) == levels * (layers + 1)  # conv_in, every layer, every downsampler
    assert all(torch.count_nonzero(residual) == 0 for residual in (*down, mid))
    assert torch.equal(controlled, plain)


def test_encoder_is_a_copy_of_the_unet_and_the_zero_convs_are_zero(unet):
    controlnet = build_controlnet(unet)
    theirs = unet.state_dict()
    copied = [k for k in controlnet.state_dict() if k.startswith(("conv_in.", "time_embedding.", "down_blocks.",
                                                                   "mid_block."))]
    assert copied and all(torch.equal(controlnet.state_dict()[k], theirs[k]) for k in copied)
    zero = [p for n, p in controlnet.named_parameters() if n.startswith(("controlnet_down_blocks", "controlnet_mid"))]
    assert zero and all(torch.count_nonzero(p) == 0 for p in zero)
    assert torch.count_nonzero(controlnet.controlnet_cond_embedding.conv_out.weight) == 0


def test_trained_controlnet_changes_the_prediction(unet):
    controlnet = build_controlnet(unet).eval()
    with torch.no_grad():
        controlnet.controlnet_mid_block.weight.fill_(0.01)
    sample, timesteps, text, condition = _inputs()
    with torch.no_grad():
        down, mid = controlnet(sample, timesteps, text, controlnet_cond=condition, return_dict=False)
        controlled = unet(sample, timesteps, text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        plain = unet(sample, timesteps, text).sample
    assert torch.count_nonzero(mid) > 0
    assert not torch.allclose(controlled, plain)


def test_conditioning_channels_and_encoder_stages_are_configurable(unet):
    controlnet = build_controlnet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 16))
    assert controlnet.controlnet_cond_embedding.conv_in.weight.shape == (8, 1, 3, 3)
    assert len(controlnet.controlnet_cond_embedding.blocks) == 2
    sample, timesteps, text, _ = _inputs()
    condition = torch.rand(2, 1, 64, 64)  # one stride-2 stage: map at twice the latent size
    with torch.no_grad():
        down, _ = controlnet(sample, timesteps, text, controlnet_cond=condition, return_dict=False)
    assert down[0].shape == (2, 32, 32, 32)


def test_metadata_round_trips_through_dict_json_and_safetensors_strings():
    meta = ConditionMetadata(condition="shuffle", preprocessor="shuffle", preprocessor_params={"seed": 3, "f": 0.5},
                             polarity="black_on_white", global_pooling=True, conditional_only=True, base="SD1.x")
    assert ConditionMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    header = meta.to_metadata()
    assert all(isinstance(v, str) for v in header.values())
    assert ConditionMetadata.from_metadata(header) == meta
    assert ConditionMetadata.from_metadata({"format": "pt"}) is None


def test_metadata_ignores_unknown_keys_and_rejects_bad_values():
    assert ConditionMetadata.from_dict({"condition": "depth", "added_later": 1}).condition == "depth"
    with pytest.raises(CheckpointError, match="polarity"):
        ConditionMetadata(polarity="grey")
    with pytest.raises(CheckpointError, match="preprocessor_params"):
        ConditionMetadata(preprocessor_params=[1, 2])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ConditionMetadata.from_metadata({"controlkit": "{broken"})


@pytest.mark.parametrize("config, family", [
    ({"cross_attention_dim": 768}, "SD1.x"),
    ({"cross_attention_dim": 1024}, "SD2.x"),
    ({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, "SDXL"),
    ({"cross_attention_dim": 2048}, "custom (cross-attention 2048)"),
    ({"cross_attention_dim": 32}, "custom (cross-attention 32)"),
])
def test_base_family(config, family):
    assert base_family(config) == family


@pytest.mark.parametrize("name, condition", [
    ("control_v11p_sd15_canny.pth", "canny"),
    ("control_v11p_sd15s2_lineart_anime.pth", "lineart_anime"),
    ("control_v11f1p_sd15_depth.safetensors", "depth"),
    ("control_sd15_openpose.pth", "openpose"),
    ("control_canny-fp16.safetensors", "canny"),  # the A1111 extracts
    ("diffusion_pytorch_model.safetensors", None),
])
def test_condition_guessed_from_lllyasviel_file_names(name, condition):
    assert guess_metadata(name).condition == condition


def test_shuffle_guess_pools_globally_on_the_conditional_side():
    meta = guess_metadata("control_v11e_sd15_shuffle.pth")
    assert meta.condition == "shuffle" and meta.global_pooling and meta.conditional_only
