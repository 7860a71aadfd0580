"""SDXL generation on tiny SDXL components (two CLIP text encoders, the second projected; SDXL's added
text/size embedding): the same `generate` as SD1.x, equal to diffusers' SDXL pipelines with the same components
(difference 0.0 on CPU float32), and every control feature on the SDXL path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import trained_like_controlnet, trained_like_union
from PIL import Image

from controlkit.control import Control, num_control_layers
from controlkit.errors import CheckpointError, ConfigError
from controlkit.pipeline import generate
from controlkit.sd_pipelines import pipeline_from_components
from controlkit.tiny import save_components

TINY_MODELS = True

PROMPT = "a blue cube on the floor"
STEPS, SEED = 3, 7


@pytest.fixture(scope="module")
def sdxl_base(sdxl):
    return pipeline_from_components(sdxl)


@pytest.fixture(scope="module")
def controlnet(sdxl):
    return trained_like_controlnet(sdxl["unet"], seed=1)


@pytest.fixture(scope="module")
def second_controlnet(sdxl):
    return trained_like_controlnet(sdxl["unet"], seed=2)


@pytest.fixture(scope="module")
def union(sdxl):
    return trained_like_union(sdxl["unet"], seed=3)


def edge_map(seed: int = 0, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    x, y = rng.integers(4, size // 2, 2)
    image[y : y + size // 3, x] = 255
    image[y, x : x + size // 3] = 255
    return image


def diffusers_images(cls_name, components, prompt=PROMPT, **options):
    import diffusers

    scheduler = diffusers.UniPCMultistepScheduler.from_config(components["scheduler"].config)
    extra = {key: options.pop(key) for key in ("controlnet", "force_zeros_for_empty_prompt") if key in options}
    pipe = getattr(diffusers, cls_name)(**{**components, "scheduler": scheduler}, add_watermarker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(SEED)
    options = {"num_inference_steps": STEPS, "guidance_scale": 5.0, "output_type": "np", **options}
    return pipe(prompt, generator=generator, **options).images


def ours(base, controls=(), **options):
    return generate(base, PROMPT, controls, steps=STEPS, seed=SEED, output_type="np", **options).images


def test_without_controls_equals_diffusers_sdxl_and_defaults_to_its_guidance(sdxl, sdxl_base):
    expected = diffusers_images("StableDiffusionXLPipeline", sdxl, height=64, width=64)
    np.testing.assert_array_equal(ours(sdxl_base), expected)
    assert generate(sdxl_base, PROMPT, steps=1, seed=0, output_type="latent").settings["guidance_scale"] == 5.0


def test_controlnet_equals_diffusers_sdxl_controlnet_pipeline(sdxl, sdxl_base, controlnet):
    image = edge_map(0)
    expected = diffusers_images("StableDiffusionXLControlNetPipeline", sdxl, controlnet=controlnet,
                                image=Image.fromarray(image), controlnet_conditioning_scale=0.7)
    result = ours(sdxl_base, [Control(image, controlnet, scale=0.7)])
    np.testing.assert_array_equal(result, expected)
    assert np.abs(result - ours(sdxl_base)).max() > 0.01  # the control reaches the image


def test_two_controlnets_equal_diffusers_multi_controlnet(sdxl, sdxl_base, controlnet, second_controlnet):
    from diffusers import MultiControlNetModel

    first, second = edge_map(0), edge_map(1)
    expected = diffusers_images(
        "StableDiffusionXLControlNetPipeline", sdxl, controlnet=MultiControlNetModel([controlnet, second_controlnet]),
        image=[Image.fromarray(first), Image.fromarray(second)], controlnet_conditioning_scale=[1.0, 0.5],
        control_guidance_end=[1.0, 0.5],
    )
    result = ours(sdxl_base, [Control(first, controlnet), Control(second, second_controlnet, scale=0.5, end=0.5)])
    np.testing.assert_array_equal(result, expected)


def test_control_mode_equals_diffusers_guess_mode_with_its_layer_weights(sdxl, sdxl_base, controlnet):
    image = edge_map(0)
    expected = diffusers_images("StableDiffusionXLControlNetPipeline", sdxl, controlnet=controlnet,
                                image=Image.fromarray(image), guess_mode=True)
    logspace = torch.logspace(-1, 0, num_control_layers(controlnet)).tolist()
    result = ours(sdxl_base, [Control(image, controlnet, mode="control", layer_weights=logspace)])
    np.testing.assert_array_equal(result, expected)


def test_img2img_equals_diffusers_sdxl_controlnet_img2img(sdxl, sdxl_base, controlnet):
    init = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = edge_map(0)
    expected = diffusers_images("StableDiffusionXLControlNetImg2ImgPipeline", sdxl, controlnet=controlnet,
                                image=Image.fromarray(init), control_image=Image.fromarray(image), strength=0.6,
                                controlnet_conditioning_scale=1.0)  # this pipeline's default is 0.8
    result = ours(sdxl_base, [Control(image, controlnet)], init_image=init, strength=0.6)
    np.testing.assert_array_equal(result, expected)


def test_union_with_one_and_two_control_types_equals_diffusers_union_pipeline(sdxl, sdxl_base, union):
    first, second = edge_map(0), edge_map(1)
    for scale in (1.0, 0.6):
        one = diffusers_images("StableDiffusionXLControlNetUnionPipeline", sdxl, controlnet=union,
                               control_image=[Image.fromarray(first)], control_mode=[3],
                               controlnet_conditioning_scale=scale)
        np.testing.assert_array_equal(ours(sdxl_base, [Control(first, union, scale=scale, control_type="canny")]), one)
        two = diffusers_images("StableDiffusionXLControlNetUnionPipeline", sdxl, controlnet=union,
                               control_image=[Image.fromarray(first), Image.fromarray(second)], control_mode=[3, 1],
                               controlnet_conditioning_scale=scale)
        controls = [Control(first, union, scale=scale, control_type="canny"),
                    Control(second, union, scale=scale, control_type="depth")]
        np.testing.assert_array_equal(ours(sdxl_base, controls), two)
    assert np.abs(two - one).max() > 1e-3  # the second type changes the image


def test_union_needs_a_known_control_type_and_plain_controlnets_take_none(union, controlnet):
    with pytest.raises(ConfigError, match="ControlNet-Union needs `control_type`"):
        Control(edge_map(0), union)
    with pytest.raises(ConfigError, match="one of openpose"):
        Control(edge_map(0), union, control_type="sketchy")
    with pytest.raises(ConfigError, match="is index 7 but this Union model has 6 types"):
        Control(edge_map(0), union, control_type="repaint")
    with pytest.raises(ConfigError, match="for ControlNet-Union models"):
        Control(edge_map(0), controlnet, control_type="canny")


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_fresh_controlnet_gives_exactly_the_base_image(sdxl, sdxl_base, scale):
    from controlkit.controlnet import build_controlnet

    fresh = build_controlnet(sdxl["unet"], conditioning_embedding_out_channels=(16, 32))
    np.testing.assert_array_equal(ours(sdxl_base, [Control(edge_map(0), fresh, scale=scale)]), ours(sdxl_base))


def test_micro_conditioning_equals_diffusers_and_changes_the_image(sdxl, sdxl_base):
    sizes = {"original_size": (256, 192), "crops_coords_top_left": (16, 8), "target_size": (64, 64),
             "negative_original_size": (512, 512), "negative_target_size": (64, 64)}
    expected = diffusers_images("StableDiffusionXLPipeline", sdxl, height=64, width=64, **sizes)
    result = ours(sdxl_base, **sizes)
    np.testing.assert_array_equal(result, expected)
    assert np.abs(result - ours(sdxl_base)).max() > 1e-3


def test_force_zeros_for_empty_prompt_follows_the_base_config(sdxl):
    base = pipeline_from_components(sdxl, settings={"force_zeros_for_empty_prompt": False})
    expected = diffusers_images("StableDiffusionXLPipeline", sdxl, height=64, width=64,
                                force_zeros_for_empty_prompt=False)
    np.testing.assert_array_equal(ours(base), expected)
    assert np.abs(ours(base) - ours(pipeline_from_components(sdxl))).max() > 1e-4


def test_mismatched_families_are_refused_with_one_line(components, sdxl_base, controlnet):
    from controlkit.sd_pipelines import pipeline_from_components as sd_pipeline

    sd_controlnet = trained_like_controlnet(components["unet"], seed=1)
    with pytest.raises(CheckpointError, match="is for a different base") as refused:
        ours(sdxl_base, [Control(edge_map(0), sd_controlnet)])
    assert "\n" not in str(refused.value)
    with pytest.raises(CheckpointError, match="is for a different base"):
        ours(sd_pipeline(components), [Control(edge_map(0), controlnet)])
    with pytest.raises(ConfigError, match="micro-conditioning options are SDXL's"):
        ours(sd_pipeline(components), original_size=(512, 512))
    with pytest.raises(ConfigError, match="`original_size` must be an integer in 1..16384"):
        ours(sdxl_base, original_size=(0, 512))


def test_float16_vae_decodes_through_a_float32_copy_and_is_not_converted(tmp_path, sdxl):
    from controlkit.pipeline import load_base

    folder = save_components(sdxl, tmp_path / "tiny-sdxl")
    half = load_base(folder, torch_dtype=torch.float16)
    result = generate(half, PROMPT, steps=2, seed=SEED, output_type="np", guidance_scale=1.0)
    assert np.isfinite(result.images).all()
    assert half.vae.dtype == torch.float16 and half.unet.dtype == torch.float16  # the caller's modules unchanged
    again = generate(half, PROMPT, steps=2, seed=SEED, output_type="np", guidance_scale=1.0)
    np.testing.assert_array_equal(result.images, again.images)


def test_sdxl_layout_has_ten_control_outputs():
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        model = ControlNetModel(
            block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                   "CrossAttnDownBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            use_linear_projection=True,
        )
    assert num_control_layers(model) == 10


def test_cli_generates_with_an_sdxl_folder_and_records_the_settings(tmp_path, sdxl, controlnet):
    from controlkit.checkpoint import save_controlnet
    from controlkit.cli import main
    from controlkit.controlnet import ConditionMetadata

    folder = save_components(sdxl, tmp_path / "tiny-sdxl")
    save_controlnet(controlnet, tmp_path / "cn", ConditionMetadata(condition="canny"))
    Image.fromarray(edge_map(0)).save(tmp_path / "edges.png")
    output = tmp_path / "out.png"
    code = main(["generate", PROMPT, "--base", str(folder), "--controlnet", f"edges={tmp_path / 'cn'}",
                 "--control", f"edges={tmp_path / 'edges.png'}", "--steps", "2", "--seed", "3",
                 "--original-size", "128", "96", "-o", str(output)])
    assert code == 0
    with Image.open(output) as written:
        assert written.size == (64, 64)
        record = json.loads(written.text["controlkit"])
    assert record["original_size"] == [128, 96] and record["guidance_scale"] == 5.0 and record["seed"] == 3
