"""The trainer on tiny real components: what trains, what stays frozen, faults, modes, outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from train_helpers import RESOLUTION, load_tensors, make_world, tiny_config

from controlkit.errors import ConfigError
from training.engine.loop import TrainingDiverged, run_loop
from training.engine.step import StepInputs, prediction_target, training_loss
from training.engine.trainer import build_run, train

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, tensor in module.state_dict().items() if not torch.equal(before[name], tensor)}


def test_only_the_controlnet_trains_and_its_zero_convolutions_leave_zero(world, tmp_path):
    base, data = world
    run = build_run(tiny_config(base, data, tmp_path / "run", "train.max_steps=3"))
    parts = run.recipe.parts
    frozen = {name: _weights(getattr(parts, name)) for name in ("unet", "vae", "text_encoder")}
    controlnet_before = _weights(parts.controlnet)
    zero_convs = [*parts.controlnet.controlnet_down_blocks, parts.controlnet.controlnet_mid_block]
    assert all(torch.count_nonzero(conv.weight) == 0 for conv in zero_convs)

    state = run_loop(run)
    assert state.step == 3 and all(math.isfinite(loss) for loss in state.losses)
    for name, before in frozen.items():
        assert not _changed(before, getattr(parts, name)), f"the frozen {name} changed"
    assert len(_changed(controlnet_before, parts.controlnet)) > 0.9 * len(controlnet_before)
    assert all(torch.count_nonzero(conv.weight) > 0 for conv in zero_convs)
    assert all(p.dtype == torch.float32 for p in run.parameters)


def test_non_finite_losses_skip_the_update_and_stop_after_too_many_in_a_row(world, tmp_path):
    base, data = world
    run = build_run(tiny_config(base, data, tmp_path / "run", "train.max_steps=4"))
    poisoned_calls = {2}  # the U-Net's 3rd forward (step 3): its prediction becomes NaN
    calls = [0]

    def poison(module, inputs, output):
        calls[0] += 1
        return (output[0] * math.nan,) if calls[0] - 1 in poisoned_calls else output

    run.recipe.parts.unet.register_forward_hook(poison)
    snapshots = {}
    run.on_step = lambda step: snapshots.update({step: _weights(run.recipe.parts.controlnet)})
    state = run_loop(run)
    assert state.nonfinite_total == 1 and math.isnan(state.losses[2])
    assert all(math.isfinite(loss) for i, loss in enumerate(state.losses) if i != 2)
    assert all(torch.equal(snapshots[2][name], snapshots[3][name]) for name in snapshots[2])  # no update at step 3
    assert _changed(snapshots[3], run.recipe.parts.controlnet)  # step 4 updates again
    assert run.lr_scheduler.last_epoch == 3  # the schedule advanced for the 3 real updates only

    poisoned_calls.update(range(100))
    config = tiny_config(base, data, tmp_path / "diverging", "train.max_consecutive_nonfinite=2")
    diverging = build_run(config)
    calls[0] = 0
    diverging.recipe.parts.unet.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match="2 non-finite losses in a row at step 2 .* weights are unchanged"):
        run_loop(diverging)


def test_caching_on_and_off_follow_the_same_loss_trajectory(world, tmp_path):
    base, data = world
    settings = ("train.max_steps=4", "data.proportion_empty_prompts=0.5")
    cached = train(tiny_config(base, data, tmp_path / "cached", *settings))
    per_step = train(tiny_config(base, data, tmp_path / "per-step", *settings, "data.cache_encodings=false"))
    assert (tmp_path / "cached" / "cache").is_dir() and not (tmp_path / "per-step" / "cache").exists()
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(per_step.losses), rtol=1e-4, atol=1e-5)
    expected = load_tensors(cached.output / "diffusion_pytorch_model.safetensors")
    actual = load_tensors(per_step.output / "diffusion_pytorch_model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-3, atol=1e-5)


def test_final_controlnet_has_metadata_and_generates(world, tmp_path):
    from controlkit.checkpoint import load_controlnet
    from controlkit.control import Control
    from controlkit.pipeline import generate, load_base

    base, data = world
    result = train(tiny_config(base, data, tmp_path / "run", "train.max_steps=2", "checkpoint.save_original=true"))
    controlnet, metadata = load_controlnet(result.output)
    assert (metadata.condition, metadata.base) == ("canny", "custom (cross-attention 32)")
    original, original_metadata = load_controlnet(tmp_path / "run" / "run.safetensors")
    assert original_metadata.condition == "canny"
    for name, tensor in controlnet.state_dict().items():
        assert torch.equal(original.state_dict()[name], tensor)
    condition = np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)
    condition[4:12, 4:12] = 255
    image = generate(load_base(base), "a red circle", [Control(condition, controlnet)], steps=2, seed=0,
                     output_type="np").images
    assert image.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all()

    from PIL import Image

    from controlkit.cli import main

    Image.fromarray(condition).save(tmp_path / "edges.png")
    assert main(["generate", "a red circle", "--base", str(base), "--controlnet", f"canny={result.output}",
                 "--control", f"canny={tmp_path / 'edges.png'}", "--steps", "2", "-o", str(tmp_path / "out.png")]) == 0
    assert Image.open(tmp_path / "out.png").size == (RESOLUTION, RESOLUTION)


def test_unlock_decoder_trains_the_decoder_and_only_mid_control_leaves_skip_outputs_unused(world, tmp_path):
    from controlkit.pipeline import load_base

    base, data = world
    run = build_run(tiny_config(base, data, tmp_path / "run", "train.max_steps=2", "model.unlock_decoder=true",
                                 "model.only_mid_control=true"))
    unet_before = _weights(run.recipe.parts.unet)
    run_loop(run)
    changed = _changed(unet_before, run.recipe.parts.unet)
    assert changed and all(name.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")) for name in changed)
    assert any(name.startswith("up_blocks.") for name in changed)
    controlnet = run.recipe.parts.controlnet
    assert all(torch.count_nonzero(conv.weight) == 0 for conv in controlnet.controlnet_down_blocks)
    assert torch.count_nonzero(controlnet.controlnet_mid_block.weight) > 0
    run.recipe.export(run)
    saved_unet = load_base(tmp_path / "run" / "base").unet
    for name in changed:
        assert torch.equal(saved_unet.state_dict()[name], run.recipe.parts.unet.state_dict()[name])


def test_base_mode_trains_a_unet_from_scratch_and_lowers_the_loss(world, tmp_path):
    from controlkit.pipeline import generate, load_base

    base, data = world
    config = tiny_config(base, data, tmp_path / "run", "model.kind=base", "model.condition=", "train.max_steps=30",
                         "train.batch_size=4", "model.train_text_encoder=true", "optim.learning_rate=2e-3",
                         "model.prediction_type=v_prediction")
    run = build_run(config)
    generator = torch.Generator().manual_seed(1)
    probe = [run.dataset[i] for i in range(8)]
    latents = torch.randn((8, 4, RESOLUTION // 2, RESOLUTION // 2), generator=generator)

    def probe_loss() -> float:
        from training.data.encodings import encode_images, encode_prompts, sample_latents

        with torch.no_grad():
            moments = encode_images(run.recipe.parts.vae, torch.stack([item["pixel_values"] for item in probe]))
            inputs = StepInputs(
                sample_latents(run.recipe.parts.vae.config, moments, latents),
                encode_prompts(run.recipe.parts.tokenizer, run.recipe.parts.text_encoder, [item["prompt"] for item in probe]),
                None, torch.randn(latents.shape, generator=torch.Generator().manual_seed(2)),
                torch.arange(50, 1000, 120), torch.ones(8),
            )
            return float(training_loss(run.recipe.parts.unet, None, run.recipe.parts.noise_scheduler, inputs))

    before = probe_loss()
    run_loop(run)
    after = probe_loss()
    assert after < 0.7 * before, (before, after)
    output = run.recipe.export(run)
    trained = load_base(output)
    assert trained.scheduler.config.prediction_type == "v_prediction"
    image = generate(trained, "a red circle on a blue background", steps=2, seed=0, width=RESOLUTION,
                     height=RESOLUTION, output_type="np").images
    assert image.shape == (1, RESOLUTION, RESOLUTION, 3)


def test_bad_pairs_are_left_out_when_caching_and_skipped_per_batch_without(world, tmp_path):
    base, data = world
    broken = data.parent / "images" / "000003.png"
    content = broken.read_bytes()
    try:
        broken.write_bytes(content[:40])  # a truncated PNG
        cached = build_run(tiny_config(base, data, tmp_path / "cached"))
        assert len(cached.sampler.indices) == 15 and 3 not in cached.sampler.indices
        per_step = train(tiny_config(base, data, tmp_path / "per-step", "data.cache_encodings=false",
                                     "train.max_steps=8"))
        assert per_step.skipped_pairs == 1 and all(math.isfinite(loss) for loss in per_step.losses)
    finally:
        broken.write_bytes(content)


def test_prediction_target_follows_the_scheduler_and_rejects_others():
    from diffusers import DDPMScheduler

    latents, noise, timesteps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert prediction_target(DDPMScheduler(prediction_type="epsilon"), latents, noise, timesteps) is noise
    velocity = DDPMScheduler(prediction_type="v_prediction")
    torch.testing.assert_close(prediction_target(velocity, latents, noise, timesteps),
                               velocity.get_velocity(latents, noise, timesteps))
    with pytest.raises(ValueError, match="Unknown prediction type 'sample'"):
        prediction_target(DDPMScheduler(prediction_type="sample"), latents, noise, timesteps)


def test_eight_bit_adam_without_bitsandbytes_is_a_clear_error(world, tmp_path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    base, data = world
    with pytest.raises(ConfigError, match="needs bitsandbytes: pip install bitsandbytes"):
        train(tiny_config(base, data, tmp_path / "run", "optim.name=adamw8bit"))


def test_validation_generates_grids_through_the_pipeline_and_measures_controllability(world, tmp_path):
    from PIL import Image

    base, data = world
    run = build_run(tiny_config(base, data, tmp_path / "run", "train.max_steps=2", "validation.every_steps=2",
                                 "validation.count=3", "validation.num_inference_steps=2"))
    assert len(run.recipe.validator.prompts) == 3
    state = run_loop(run)
    assert state.step == 2
    grid = Image.open(tmp_path / "run" / "validation" / "step-00000002.png")
    assert grid.size == (3 * RESOLUTION, 3 * RESOLUTION)  # condition | generated | target, one row per pair
    values = run.recipe.validator.run(2, should_stop=lambda: False)
    assert set(values) == {"validation/edge_f1"} and 0.0 <= values["validation/edge_f1"] <= 1.0
    assert run.recipe.validator.run(3, should_stop=lambda: True) == {}  # a stop signal ends validation early


def test_bf16_mixed_precision_keeps_trained_weights_in_float32(world, tmp_path):
    from training.data.encodings import encode_images

    base, data = world
    run = build_run(tiny_config(base, data, tmp_path / "run", "train.mixed_precision=bf16", "train.max_steps=2",
                                 "validation.every_steps=2", "validation.count=1", "validation.num_inference_steps=2"))
    assert {p.dtype for p in run.recipe.parts.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in run.recipe.parts.controlnet.parameters()} == {torch.float32}
    item = run.dataset[5]
    with torch.no_grad():
        encoded = encode_images(run.recipe.parts.vae, item["pixel_values"][None])
    cached = run.recipe.encoder.latent_rows.rows([5])
    assert cached.dtype == torch.bfloat16 and torch.equal(cached, encoded)  # stored bit for bit
    state = run_loop(run)
    assert all(math.isfinite(loss) for loss in state.losses)
    assert (tmp_path / "run" / "validation" / "step-00000002.png").is_file()
    assert {p.dtype for p in run.recipe.parts.controlnet.parameters()} == {torch.float32}


def test_global_pooling_trains_a_pooled_controlnet_that_acts_on_the_conditional_side(world, tmp_path):
    """1.1 shuffle's global average pooling: each residual the trained ControlNet gives is constant over the
    image, the exported model and its metadata say so, and generation applies it on the conditional side only."""
    from controlkit.checkpoint import load_controlnet
    from controlkit.control import Control

    base, data = world
    output = tmp_path / "run"
    assert train(tiny_config(base, data, output, "train.max_steps=2", "model.global_pooling=true")).output
    controlnet, metadata = load_controlnet(output / "controlnet")
    assert controlnet.config.global_pool_conditions and metadata.global_pooling and metadata.conditional_only
    sample = torch.randn(1, 4, 8, 8)
    down, mid = controlnet(sample, 10, encoder_hidden_states=torch.randn(1, 77, 32),
                           controlnet_cond=torch.rand(1, 3, 16, 16), return_dict=False)
    assert all(residual.shape[2:] == (1, 1) for residual in (*down, mid))
    assert Control(torch.rand(3, 16, 16), controlnet).conditional_side_only
    with pytest.raises(ConfigError, match="model.global_pooling"):
        tiny_config(base, data, output, "model.global_pooling=true", f"model.controlnet={output / 'controlnet'}")
