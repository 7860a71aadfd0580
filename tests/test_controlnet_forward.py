"""`controlnet_residuals` (the ControlNet's forward from a precomputed condition embedding) equals diffusers'
`ControlNetModel.forward` bit for bit: flat scales, guess mode's profile, BGR channel order, global pooling,
number timesteps, and the added (SDXL "text_time", "text") embeddings; and it only reads the model."""

from __future__ import annotations

import pytest
import torch

from controlkit.controlnet import build_controlnet
from controlkit.controlnet_forward import controlnet_residuals
from controlkit.errors import ConfigError

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)


def randomised(controlnet):
    """Zero convolutions made random (as after training), so every output carries signal."""
    torch.manual_seed(5)
    for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                 controlnet.controlnet_cond_embedding.conv_out):
        torch.nn.init.normal_(conv.weight, std=0.3)
        torch.nn.init.normal_(conv.bias, std=0.05)
    return controlnet.eval()


@pytest.fixture(scope="module")
def controlnet(components):
    torch.manual_seed(2)
    return randomised(build_controlnet(components["unet"], conditioning_embedding_out_channels=(16, 32)))


def variant(controlnet, **config):
    """The same weights under a changed config (channel order, global pooling)."""
    from diffusers import ControlNetModel

    model = ControlNetModel.from_config({**controlnet.config, **config})
    model.load_state_dict(controlnet.state_dict())
    return model.eval()


def inputs(controlnet, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, controlnet.config.in_channels, 32, 32, generator=generator)
    text = torch.randn(batch, 77, controlnet.config.cross_attention_dim, generator=generator)
    condition = torch.rand(1, controlnet.config.conditioning_channels, 64, 64, generator=generator)
    return sample, text, condition


def embedding_of(controlnet, condition):
    """What `controlkit.control.prepare_control` computes: the encoder on the map in RGB order."""
    if controlnet.config.controlnet_conditioning_channel_order == "bgr":
        condition = torch.flip(condition, dims=[1])
    return controlnet.controlnet_cond_embedding(condition)


def assert_same(ours, theirs):
    (down, mid), (expected_down, expected_mid) = ours, theirs
    assert len(down) == len(expected_down)
    for got, expected in zip([*down, mid], [*expected_down, expected_mid]):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


@torch.no_grad()
@pytest.mark.parametrize("scale", [1.0, 0.7])
@pytest.mark.parametrize("config", [{}, {"controlnet_conditioning_channel_order": "bgr"},
                                    {"global_pool_conditions": True}])
def test_flat_scale_equals_diffusers(controlnet, scale, config):
    model = variant(controlnet, **config) if config else controlnet
    sample, text, condition = inputs(model)
    timestep = torch.tensor(601)
    expected = model(sample, timestep, text, condition, conditioning_scale=scale, return_dict=False)
    count = len(model.controlnet_down_blocks) + 1
    ours = controlnet_residuals(model, sample, timestep, text, embedding_of(model, condition), [scale] * count)
    assert_same(ours, expected)


@torch.no_grad()
def test_guess_mode_profile_equals_diffusers_guess_mode(controlnet):
    sample, text, condition = inputs(controlnet)
    timestep = torch.tensor(301)
    expected = controlnet(sample, timestep, text, condition, conditioning_scale=0.8, guess_mode=True,
                          return_dict=False)
    count = len(controlnet.controlnet_down_blocks) + 1
    scales = (torch.logspace(-1, 0, count) * 0.8).tolist()  # diffusers' float32 products
    assert_same(controlnet_residuals(controlnet, sample, timestep, text, embedding_of(controlnet, condition), scales),
                expected)


@torch.no_grad()
@pytest.mark.parametrize("timestep", [501, 501.0, torch.tensor([501, 501])])
def test_number_and_batched_timesteps_equal_diffusers(controlnet, timestep):
    sample, text, condition = inputs(controlnet)
    expected = controlnet(sample, timestep, text, condition, return_dict=False)
    count = len(controlnet.controlnet_down_blocks) + 1
    ours = controlnet_residuals(controlnet, sample, timestep, text, embedding_of(controlnet, condition), [1.0] * count)
    assert_same(ours, expected)


def added_embedding_controlnet(kind):
    from diffusers import ControlNetModel

    torch.manual_seed(3)
    options = {"addition_embed_type": kind}
    if kind == "text_time":  # SDXL: pooled text (32) + 6 size/crop numbers embedded in 8 channels each
        options.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    else:
        options.update(addition_embed_type_num_heads=4)
    model = ControlNetModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, conditioning_embedding_out_channels=(16, 32),
        **options,
    )
    return randomised(model)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["text_time", "text"])
def test_added_embeddings_equal_diffusers(kind):
    model = added_embedding_controlnet(kind)
    sample, text, condition = inputs(model)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    added = added if kind == "text_time" else None
    timestep = torch.tensor(401)
    expected = model(sample, timestep, text, condition, conditioning_scale=0.9, added_cond_kwargs=added,
                     return_dict=False)
    count = len(model.controlnet_down_blocks) + 1
    ours = controlnet_residuals(model, sample, timestep, text, embedding_of(model, condition), [0.9] * count,
                                added_cond_kwargs=added)
    assert_same(ours, expected)


@torch.no_grad()
def test_missing_added_conditions_and_wrong_scale_count_are_one_line_errors(controlnet):
    model = added_embedding_controlnet("text_time")
    sample, text, condition = inputs(model)
    count = len(model.controlnet_down_blocks) + 1
    with pytest.raises(ConfigError, match="needs text_embeds and time_ids in `added_cond_kwargs`"):
        controlnet_residuals(model, sample, torch.tensor(1), text, embedding_of(model, condition), [1.0] * count)
    sample, text, condition = inputs(controlnet)
    with pytest.raises(ConfigError, match="2 scales for a ControlNet with"):
        controlnet_residuals(controlnet, sample, torch.tensor(1), text, embedding_of(controlnet, condition), [1.0] * 2)


@torch.no_grad()
def test_the_model_is_only_read(controlnet):
    modules = dict(controlnet.named_modules())
    state = {name: tensor.clone() for name, tensor in controlnet.state_dict().items()}
    sample, text, condition = inputs(controlnet)
    count = len(controlnet.controlnet_down_blocks) + 1
    controlnet_residuals(controlnet, sample, torch.tensor(1), text, embedding_of(controlnet, condition), [0.5] * count)
    assert all(dict(controlnet.named_modules())[name] is module for name, module in modules.items())
    assert all(torch.equal(controlnet.state_dict()[name], tensor) for name, tensor in state.items())
