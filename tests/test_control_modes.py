"""Control modes, scales, windows and multi-ControlNet, each checked against diffusers' own pipelines.

Tiny real components (controlkit.tiny); ControlNet calls are counted with forward hooks on the real modules.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from controlkit.control import SOFT_DECAY, Control, num_control_layers
from controlkit.controlnet import build_controlnet
from controlkit.errors import ConfigError
from controlkit.pipeline import generate

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)

PROMPT = "a red sphere on the floor"
STEPS = 4
SEED = 3




def trained_controlnet(unet, seed, **options):
    """A ControlNet as after training: its zero-initialised convolutions (the residual outputs and the
    conditioning encoder's last layer) are random, so both the condition map and the U-Net features matter."""
    torch.manual_seed(seed)
    controlnet = build_controlnet(unet, conditioning_embedding_out_channels=(16, 32), **options)
    return randomise_zero_convs(controlnet)


def randomise_zero_convs(controlnet):
    for conv in (
        *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ):
        torch.nn.init.normal_(conv.weight, std=0.3)
        torch.nn.init.normal_(conv.bias, std=0.05)
    return controlnet.eval()


@pytest.fixture(scope="module")
def controlnet(components):
    return trained_controlnet(components["unet"], seed=1)


@pytest.fixture(scope="module")
def second_controlnet(components):
    return trained_controlnet(components["unet"], seed=2)


def shapes_map(seed: int, size: int = 64) -> np.ndarray:
    """White square and disc on black, placed by `seed`: a synthetic condition map (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    x, y = rng.integers(4, size // 2, 2)
    image[y : y + size // 3, x : x + size // 3] = 255
    yy, xx = np.mgrid[:size, :size]
    cx, cy = rng.integers(size // 3, size - 8, 2)
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2] = 255
    return image


def diffusers_controlnet_images(components, controlnet, image, **options):
    from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_config(components["scheduler"].config)
    pipe = StableDiffusionControlNetPipeline(
        **{**components, "scheduler": scheduler}, controlnet=controlnet, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(SEED)
    images = pipe(PROMPT, image=image, num_inference_steps=STEPS, generator=generator, output_type="np", **options)
    return images.images


def base_images(components):
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_config(components["scheduler"].config)
    pipe = StableDiffusionPipeline(
        **{**components, "scheduler": scheduler}, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(SEED)
    return pipe(PROMPT, num_inference_steps=STEPS, generator=generator, output_type="np").images


def ours(base, controls, **options):
    return generate(base, PROMPT, controls, steps=STEPS, seed=SEED, output_type="np", **options).images


class CallCounter:
    """Forward pre-hook on a real module: records the batch size of every call."""

    def __init__(self, module):
        self.batches: list[int] = []
        self.handle = module.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        self.batches.append(int(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def controlnet_runs(controlnet):
    """Counts the runs of a ControlNet: its input convolution sees the latents once per run (controlkit runs the
    ControlNet's sub-modules from a precomputed condition embedding, not the module's own forward)."""
    return CallCounter(controlnet.conv_in)


def with_scaled_zero_convs(controlnet, weights):
    """A copy whose zero convolutions are multiplied by per-layer weights: the residuals scale exactly so."""
    scaled = copy.deepcopy(controlnet)
    convs = (*scaled.controlnet_down_blocks, scaled.controlnet_mid_block)
    with torch.no_grad():
        for conv, weight in zip(convs, weights):
            conv.weight.mul_(weight)
            conv.bias.mul_(weight)
    return scaled


def test_balanced_defaults_equal_diffusers_controlnet_pipeline(components, base, controlnet):
    image = shapes_map(0)
    expected = diffusers_controlnet_images(components, controlnet, Image.fromarray(image))
    result = ours(base, [Control(image, controlnet)])
    np.testing.assert_allclose(result, expected, atol=1e-5, rtol=0)
    assert np.abs(result - base_images(components)).max() > 0.02  # the control really changes the image
    other_map = ours(base, [Control(shapes_map(1), controlnet)])
    assert np.abs(result - other_map).max() > 0.02  # and so does its condition map


def test_two_controlnets_equal_diffusers_multi_controlnet(components, base, controlnet, second_controlnet):
    maps = [shapes_map(0), shapes_map(1)]
    expected = diffusers_controlnet_images(
        components, [controlnet, second_controlnet], [Image.fromarray(m) for m in maps],
        controlnet_conditioning_scale=[0.7, 1.3],
    )
    result = ours(base, [Control(maps[0], controlnet, scale=0.7), Control(maps[1], second_controlnet, scale=1.3)])
    np.testing.assert_allclose(result, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_fresh_controlnet_gives_exactly_the_base_image(components, base, scale):
    fresh = build_controlnet(components["unet"], conditioning_embedding_out_channels=(16, 32))
    result = ours(base, [Control(shapes_map(0), fresh, scale=scale)])
    np.testing.assert_array_equal(result, base_images(components))


def test_scale_zero_gives_base_image_and_never_runs(components, base, controlnet):
    with controlnet_runs(controlnet) as calls:
        result = ours(base, [Control(shapes_map(0), controlnet, scale=0.0)])
    np.testing.assert_array_equal(result, base_images(components))
    assert calls.batches == []


def test_window_excluding_every_step_gives_base_image_and_never_runs(components, base, controlnet):
    with controlnet_runs(controlnet) as calls:
        result = ours(base, [Control(shapes_map(0), controlnet, start=0.9, end=1.0)])
    np.testing.assert_array_equal(result, base_images(components))
    assert calls.batches == []


def test_window_equals_diffusers_and_runs_only_inside_it(components, base, controlnet):
    image = shapes_map(0)
    expected = diffusers_controlnet_images(
        components, controlnet, Image.fromarray(image), control_guidance_start=0.25, control_guidance_end=0.75
    )
    with controlnet_runs(controlnet) as calls:
        result = ours(base, [Control(image, controlnet, start=0.25, end=0.75)])
    np.testing.assert_allclose(result, expected, atol=1e-5, rtol=0)
    assert calls.batches == [2, 2]  # steps 1 and 2 of 4, both guidance halves in one batch


def test_condition_embedding_runs_once_per_generation(base, controlnet):
    with CallCounter(controlnet.controlnet_cond_embedding) as encoder, controlnet_runs(controlnet) as net:
        ours(base, [Control(shapes_map(0), controlnet)])
    assert encoder.batches == [2]  # once, on the batch the ControlNet sees (both guidance halves)
    assert net.batches == [2] * STEPS


def test_control_mode_equals_diffusers_guess_mode_with_its_layer_weights(components, base, controlnet):
    image = shapes_map(0)
    expected = diffusers_controlnet_images(components, controlnet, Image.fromarray(image), guess_mode=True)
    logspace = torch.logspace(-1, 0, num_control_layers(controlnet)).tolist()
    result = ours(base, [Control(image, controlnet, mode="control", layer_weights=logspace)])
    np.testing.assert_allclose(result, expected, atol=1e-5, rtol=0)


def test_control_mode_runs_the_controlnet_on_the_conditional_half_only(base, controlnet):
    with controlnet_runs(controlnet) as calls:
        generate(base, PROMPT, [Control(shapes_map(0), controlnet, mode="control")], steps=2, num_images=3,
                 seed=0, output_type="latent")
    assert calls.batches == [3, 3]
    with controlnet_runs(controlnet) as calls:
        generate(base, PROMPT, [Control(shapes_map(0), controlnet, mode="prompt")], steps=2, num_images=3,
                 seed=0, output_type="latent")
    assert calls.batches == [6, 6]


def test_control_mode_soft_scales_equal_guess_mode_on_rescaled_zero_convs(components, base, controlnet):
    """Our 0.825 profile, conditional side only == diffusers' guess mode (logspace) on zero convs scaled by
    0.825**(N-1-i) / logspace_i."""
    count = num_control_layers(controlnet)
    logspace = torch.logspace(-1, 0, count).tolist()
    ratio = [SOFT_DECAY ** (count - 1 - i) / logspace[i] for i in range(count)]
    image = shapes_map(0)
    expected = diffusers_controlnet_images(
        components, with_scaled_zero_convs(controlnet, ratio), Image.fromarray(image), guess_mode=True
    )
    result = ours(base, [Control(image, controlnet, mode="control")])
    np.testing.assert_allclose(result, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("mode", "layer_weights"), [("prompt", None), ("balanced", [0.0, 0.5, 1.0, 1.5, 2.0])]
)
def test_per_layer_scales_on_both_sides_equal_diffusers_on_rescaled_zero_convs(
    components, base, controlnet, mode, layer_weights
):
    control = Control(shapes_map(0), controlnet, scale=0.8, mode=mode, layer_weights=layer_weights)
    expected = diffusers_controlnet_images(
        components, with_scaled_zero_convs(controlnet, control.layer_scales()), Image.fromarray(shapes_map(0))
    )
    np.testing.assert_allclose(ours(base, [control]), expected, atol=1e-4, rtol=0)


def test_prompt_mode_differs_from_balanced_and_control(base, controlnet):
    image = shapes_map(0)
    results = {mode: ours(base, [Control(image, controlnet, mode=mode)]) for mode in ("balanced", "prompt", "control")}
    assert np.abs(results["prompt"] - results["balanced"]).max() > 1e-3
    assert np.abs(results["prompt"] - results["control"]).max() > 1e-3


def test_mixed_modes_run_each_controlnet_on_its_own_batch(base, controlnet, second_controlnet):
    controls = [Control(shapes_map(0), controlnet), Control(shapes_map(1), second_controlnet, mode="control")]
    with controlnet_runs(controlnet) as first, controlnet_runs(second_controlnet) as second:
        result = generate(base, PROMPT, controls, steps=2, seed=0, output_type="np").images
    assert first.batches == [2, 2] and second.batches == [1, 1]
    assert np.isfinite(result).all()


def test_global_pooling_controlnet_equals_diffusers(components, base):
    pooled = trained_controlnet(components["unet"], seed=4)
    pooled.register_to_config(global_pool_conditions=True)
    image = shapes_map(2)
    expected = diffusers_controlnet_images(components, pooled, Image.fromarray(image))  # diffusers: guess mode
    with controlnet_runs(pooled) as calls:
        result = ours(base, [Control(image, pooled)])
    np.testing.assert_allclose(result, expected, atol=1e-5, rtol=0)
    assert calls.batches == [1] * STEPS


def test_bgr_controlnet_equals_diffusers(components, base):
    from diffusers import ControlNetModel

    torch.manual_seed(5)
    bgr = ControlNetModel.from_unet(
        components["unet"], controlnet_conditioning_channel_order="bgr", conditioning_embedding_out_channels=(16, 32)
    )
    randomise_zero_convs(bgr)
    image = shapes_map(3)
    image[..., 0] //= 3  # channels differ, so the order matters
    expected = diffusers_controlnet_images(components, bgr, Image.fromarray(image))
    np.testing.assert_allclose(ours(base, [Control(image, bgr)]), expected, atol=1e-5, rtol=0)
    swapped = np.ascontiguousarray(image[..., ::-1])
    assert np.abs(ours(base, [Control(swapped, bgr)]) - expected).max() > 1e-3


def test_layer_scales_follow_the_reference_profiles(controlnet):
    count = num_control_layers(controlnet)
    image = shapes_map(0)
    assert Control(image, controlnet, scale=0.5).layer_scales() == [0.5] * count
    soft = [0.5 * SOFT_DECAY ** (count - 1 - i) for i in range(count)]
    assert Control(image, controlnet, scale=0.5, mode="prompt").layer_scales() == pytest.approx(soft)
    assert Control(image, controlnet, scale=0.5, mode="control").layer_scales() == pytest.approx(soft)
    weights = [1.0, 0.0, 2.0, 1.0, 0.5]
    assert Control(image, controlnet, scale=2.0, layer_weights=weights).layer_scales() == [2.0, 0.0, 4.0, 2.0, 1.0]


def test_sd15_controlnet_has_13_outputs_and_the_first_soft_scale_is_just_below_a_tenth():
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        sd15 = ControlNetModel()  # the default config is SD1.5's
    scales = Control(np.zeros((8, 8, 3), np.uint8), sd15, mode="prompt").layer_scales()
    assert len(scales) == 13
    assert scales[0] < 0.1 < 0.826**12 and scales[-1] == 1.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "guess"}, "`mode` must be one of balanced, prompt, control"),
        ({"start": 0.5, "end": 0.5}, "0 <= start < end <= 1"),
        ({"end": 1.5}, "0 <= start < end <= 1"),
        ({"scale": float("nan")}, "`scale` must be a finite number"),
        ({"layer_weights": [1.0, 1.0]}, "must be 5 finite numbers"),
    ],
)
def test_bad_control_options_are_refused_with_one_clear_line(controlnet, options, message):
    with pytest.raises(ConfigError, match=message):
        Control(shapes_map(0), controlnet, **options)
