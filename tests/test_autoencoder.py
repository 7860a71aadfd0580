"""The VAE stage of the trainer (model.kind = "vae", training/engine/autoencoder.py) on tiny real components."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from train_helpers import load_tensors, make_world, overrides

from controlkit.errors import ConfigError
from training.config import load_config
from training.engine.autoencoder import autoencoder_loss, latent_scaling_factor
from training.engine.trainer import train

VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def vae_config(base, data, output, *extra):
    common = [item for item in overrides(base, data, output) if not item.startswith("model.condition")]
    return load_config(None, [*common, "model.kind=vae", "data.resolution=32", *extra])


def test_vae_training_lowers_the_loss_and_writes_a_loadable_base_with_its_scaling_factor(world, tmp_path):
    from controlkit.pipeline import load_base

    base, data = world
    result = train(vae_config(base, data, tmp_path / "run", "train.max_steps=40", "optim.learning_rate=3e-3",
                              "train.batch_size=4"))
    assert result.step == 40 and result.output == tmp_path / "run" / "model"
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # measured: 0.52 -> 0.37

    trained = load_base(result.output)
    start = load_tensors(base / VAE_WEIGHTS)
    assert any(not torch.equal(value, start[key]) for key, value in load_tensors(result.output / VAE_WEIGHTS).items())
    # The U-Net, text encoder and tokenizer are the base's, untouched.
    assert load_tensors(result.output / "unet/diffusion_pytorch_model.safetensors").keys() == \
        load_tensors(base / "unet/diffusion_pytorch_model.safetensors").keys()
    assert trained.tokenizer.get_vocab() == load_base(base).tokenizer.get_vocab()
    factor = json.loads((result.output / "vae" / "config.json").read_text())["scaling_factor"]
    assert factor != pytest.approx(0.18215) and factor > 0
    assert (tmp_path / "run" / "validation" / "reconstructions.png").is_file()

    # The factor is 1 / std of posterior samples of the training images (what the diffusion trainer scales).
    from training.data.dataset import PairedDataset, image_as_condition, load_pairs

    dataset = PairedDataset(load_pairs(data), resolution=32, condition_fn=image_as_condition)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    assert latent_scaling_factor(trained.vae, pixels) == pytest.approx(factor, rel=1e-4)


def test_loss_is_the_mean_absolute_error_plus_a_small_kl(world):
    from diffusers import AutoencoderKL

    base, _ = world
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    eps = torch.zeros(2, vae.config.latent_channels, 16, 16)
    with torch.no_grad():
        loss = autoencoder_loss(vae, pixels, eps)
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    assert float(loss) == pytest.approx(float((reconstruction - pixels).abs().mean()), rel=1e-3)


def test_an_interrupted_vae_run_resumes_to_the_same_weights(world, tmp_path):
    base, data = world
    settings = ("train.max_steps=6", "schedule.name=cosine", "schedule.warmup_steps=2", "ema.enabled=true",
                "ema.decay=0.9", "train.gradient_accumulation_steps=2")
    straight = train(vae_config(base, data, tmp_path / "straight", *settings))

    def stop_at_three(done: int) -> None:
        if done == 3:
            signal.raise_signal(signal.SIGTERM)

    interrupted = train(vae_config(base, data, tmp_path / "resumed", *settings), on_step=stop_at_three)
    assert interrupted.stopped_by == signal.SIGTERM and interrupted.step == 3 and interrupted.output is None
    resumed = train(vae_config(base, data, tmp_path / "resumed", *settings, "checkpoint.resume=latest"))
    assert resumed.step == 6
    expected, got = (load_tensors(run.output / VAE_WEIGHTS) for run in (straight, resumed))
    assert all(torch.equal(expected[key], got[key]) for key in expected)


@pytest.mark.parametrize("setting", ["model.train_text_encoder=true", "model.controlnet=some/folder",
                                     "model.unlock_decoder=true", "model.kind=autoencoder"])
def test_settings_that_do_not_apply_to_a_vae_are_refused(world, tmp_path, setting):
    base, data = world
    with pytest.raises(ConfigError, match=setting.split("=")[0].replace(".", r"\.")):
        vae_config(base, data, tmp_path / "run", setting)
