"""Shared test setup: offline hub, the benchmark marker, one torch thread for tiny models, tiny SD components."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests under tests/benchmarks carry the benchmark marker, so the default run leaves them out."""
    for item in items:
        if "benchmarks" in item.path.parts:
            item.add_marker(pytest.mark.benchmark)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread(request):
    """Tiny models run fastest on one intra-op thread (and far slower with two on a busy 2-core CPU). Modules
    that run tiny diffusion models set `TINY_MODELS = True`; the others keep torch's default."""
    if not getattr(request.module, "TINY_MODELS", False):
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def components():
    """Tiny real SD components (U-Net, VAE, CLIP text encoder, tokenizer, scheduler), seeded."""
    from controlkit.tiny import build_components

    return build_components(seed=0)


@pytest.fixture(scope="module")
def base(components):
    """A diffusers StableDiffusionPipeline over the tiny components."""
    from controlkit.sd_pipelines import pipeline_from_components

    return pipeline_from_components(components)


@pytest.fixture(scope="module")
def sdxl():
    """Tiny real SDXL components (U-Net with the added text/size embedding, VAE, two CLIP text encoders, the
    second projected, their tokenizers, scheduler), seeded."""
    from controlkit.tiny import TINY_SDXL_CONFIG, build_components

    return build_components(TINY_SDXL_CONFIG, seed=0)


def trained_like_controlnet(unet, seed: int):
    """A tiny ControlNet for `unet` whose zero convolutions are made random, as after training, so that the
    condition map reaches the output (a fresh one would leave every image as the base makes it)."""
    import torch

    from controlkit.controlnet import build_controlnet

    torch.manual_seed(seed)
    model = build_controlnet(unet, conditioning_embedding_out_channels=(16, 32))
    for conv in (*model.controlnet_down_blocks, model.controlnet_mid_block, model.controlnet_cond_embedding.conv_out):
        torch.nn.init.normal_(conv.weight, std=0.3)
    return model.eval()


def trained_like_union(unet, seed: int):
    """A tiny ControlNet-Union for an SDXL-layout `unet`, trained-like (random zero convolutions). diffusers'
    `ControlNetUnionModel.from_unet` keeps the 320-wide fusion transformer of the released models, which needs
    320 encoder channels: the tiny one takes the U-Net's first width, with its encoder weights copied."""
    import torch
    from diffusers import ControlNetUnionModel

    torch.manual_seed(seed)
    template = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32),
                                              load_weights_from_unet=False)
    width = unet.config.block_out_channels[0]
    config = {key: value for key, value in template.config.items() if key != "_use_default_values"}  # else reset
    config.update(num_trans_channel=width, num_proj_channel=width, num_trans_head=2)
    model = ControlNetUnionModel.from_config(config)
    copied = {key: value for key, value in unet.state_dict().items() if key in model.state_dict()}
    model.load_state_dict(copied, strict=False)
    for conv in (*model.controlnet_down_blocks, model.controlnet_mid_block, model.controlnet_cond_embedding.conv_out):
        torch.nn.init.normal_(conv.weight, std=0.3)
    return model.eval()


def same_tensors(a, b) -> bool:
    """Two state dicts hold the same keys and bit-identical tensors."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def public_config(config) -> dict:
    """A config as its JSON reads back (tuples are lists), without diffusers' private keys."""
    import json

    return json.loads(json.dumps({key: value for key, value in config.items() if not key.startswith("_")}))
