"""Inpainting under control (controlkit/inpainting.py) against diffusers' ControlNet inpaint pipelines, and the
inpaint condition (preprocessors/inpaint.py) from the mask to the -1 pixels the model sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import trained_like_controlnet
from controlkit.control import Control, condition_tensor
from controlkit.errors import ConfigError
from controlkit.image import load_condition
from controlkit.pipeline import generate
from controlkit.sd_pipelines import pipeline_from_components
from preprocessors import get_preprocessor

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)

PROMPT = "a red sphere on a grey floor"


@pytest.fixture(scope="module")
def controlnet(components):
    return trained_like_controlnet(components["unet"], seed=3)


@pytest.fixture(scope="module")
def photo():
    return np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def mask():
    grey = np.zeros((64, 64), np.uint8)
    grey[16:44, 20:52] = 255
    grey[50:60, 4:12] = 200  # grey >= 128 repaints too
    grey[2:6, 2:6] = 100  # below 128: kept
    return grey


def reference_condition(image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """The reference inpaint condition (ControlNet 1.1's gradio_inpaint / diffusers' make_inpaint_condition)."""
    pixels = image.astype(np.float32) / 255.0
    pixels[mask.astype(np.float32) / 255.0 > 0.5] = -1.0
    return torch.from_numpy(pixels.transpose(2, 0, 1))[None]


def diffusers_inpaint(components, controlnet, photo, mask, **options):
    from diffusers import StableDiffusionControlNetInpaintPipeline, UniPCMultistepScheduler

    pipe = StableDiffusionControlNetInpaintPipeline(
        **{**components, "scheduler": UniPCMultistepScheduler.from_config(components["scheduler"].config)},
        controlnet=controlnet, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    control_image = options.pop("control_image", None)
    return pipe(PROMPT, image=Image.fromarray(photo), mask_image=Image.fromarray(mask),
                control_image=reference_condition(photo, mask) if control_image is None else control_image,
                controlnet_conditioning_scale=1.0, generator=torch.Generator("cpu").manual_seed(7), output_type="np",
                **options).images


def ours(base, controls, photo, mask, **options):
    options = {"steps": 4, "seed": 7, "output_type": "np", "keep_unmasked": False, **options}
    return generate(base, PROMPT, controls, init_image=photo, mask=mask, **options).images


def test_the_inpaint_map_holds_the_reference_condition(photo, mask):
    rgba = np.asarray(get_preprocessor("inpaint")(photo, mask=mask))
    assert rgba.shape == (64, 64, 4) and set(np.unique(rgba[..., 3])) == {0, 255}
    np.testing.assert_array_equal(rgba[..., :3], photo)  # the image's own pixels are kept under the mask
    torch.testing.assert_close(condition_tensor(rgba), reference_condition(photo, mask), rtol=0, atol=0)


def test_the_inpaint_map_survives_a_png_file_and_reads_an_erased_image(tmp_path, photo, mask):
    preprocessor = get_preprocessor("inpaint")
    path = tmp_path / "hole.png"
    preprocessor(photo, mask=mask).save(path)
    read = load_condition(path)
    assert read.shape == (64, 64, 4)
    # an image with the region erased (transparent) is the same condition, without a mask
    assert np.array_equal(np.asarray(preprocessor(path)), read)
    # a photo without transparency and no mask: nothing is masked
    assert np.asarray(preprocessor(photo)).shape == (64, 64, 3)


def test_random_masks_are_seeded_and_cover_part_of_the_image(photo):
    first, again, other = (np.asarray(get_preprocessor("inpaint", random_mask=seed)(photo)) for seed in (5, 5, 6))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    fractions = [
        (np.asarray(get_preprocessor("inpaint", random_mask=seed)(photo))[..., 3] == 0).mean() for seed in range(40)
    ]
    assert 0.02 < float(np.median(fractions)) < 0.7


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_with_the_inpaint_controlnet_equals_diffusers(components, base, controlnet, photo, mask,
                                                                  strength):
    expected = diffusers_inpaint(components, controlnet, photo, mask, strength=strength, num_inference_steps=4)
    control = Control(get_preprocessor("inpaint")(photo, mask=mask), controlnet)
    np.testing.assert_array_equal(ours(base, [control], photo, mask, strength=strength), expected)


def test_the_preprocessor_gets_the_generation_mask(base, controlnet, photo, mask):
    precomputed = Control(get_preprocessor("inpaint")(photo, mask=mask), controlnet)
    from_photo = Control(photo, controlnet, preprocessor=get_preprocessor("inpaint"))
    np.testing.assert_array_equal(ours(base, [from_photo], photo, mask), ours(base, [precomputed], photo, mask))


def test_another_controlnet_on_an_inpainting_base_equals_diffusers(components, photo, mask):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(11)  # an inpainting U-Net: latents, mask and masked latents in (4 + 1 + 4 channels)
    unet = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9}).eval()
    inpainting = {**components, "unet": unet}
    edges = trained_like_controlnet(components["unet"], seed=4)  # made for the plain base: 4 latent channels
    edge_map = np.zeros((64, 64, 3), np.uint8)
    edge_map[10:54, 30] = 255
    expected = diffusers_inpaint(inpainting, edges, photo, mask, control_image=Image.fromarray(edge_map),
                                 num_inference_steps=4, strength=1.0)
    result = ours(pipeline_from_components(inpainting), [Control(edge_map, edges)], photo, mask, strength=1.0)
    np.testing.assert_array_equal(result, expected)


def test_keep_unmasked_equals_diffusers_overlay_and_returns_the_init_pixels(components, base, controlnet, photo,
                                                                            mask):
    from diffusers.image_processor import VaeImageProcessor

    control = Control(get_preprocessor("inpaint")(photo, mask=mask), controlnet)
    raw = generate(base, PROMPT, [control], init_image=photo, mask=mask, steps=4, seed=7, keep_unmasked=False)
    kept = generate(base, PROMPT, [control], init_image=photo, mask=mask, steps=4, seed=7).images[0]
    binary = Image.fromarray(np.where(mask >= 128, 255, 0).astype(np.uint8))
    overlay = VaeImageProcessor().apply_overlay(binary, Image.fromarray(photo), raw.images[0])
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(overlay))
    outside = mask < 128
    np.testing.assert_array_equal(np.asarray(kept)[outside], photo[outside])
    assert not np.array_equal(np.asarray(raw.images[0])[outside], photo[outside])  # the VAE alone changes them
    assert kept.mode == "RGB" and raw.settings["mask"] is True


@pytest.mark.parametrize("output_type", ["np", "pt"])
def test_keep_unmasked_keeps_the_init_pixels_in_every_output_type(base, controlnet, photo, mask, output_type):
    control = Control(get_preprocessor("inpaint")(photo, mask=mask), controlnet)
    images = ours(base, [control], photo, mask, output_type=output_type, keep_unmasked=True)
    array = images.permute(0, 2, 3, 1).numpy() if output_type == "pt" else images
    outside = mask < 128
    np.testing.assert_allclose(array[0][outside], photo[outside] / 255.0, atol=1e-6, rtol=0)


def test_a_mask_of_another_size_is_fitted_like_the_init_image(base, controlnet, photo, mask):
    large = np.kron(mask, np.ones((2, 2), np.uint8))
    control = Control(get_preprocessor("inpaint")(photo, mask=mask), controlnet)
    np.testing.assert_array_equal(ours(base, [control], photo, large), ours(base, [control], photo, mask))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"init_image": None}, "`mask` needs `init_image`"),
        ({"mask": np.zeros((64, 64), np.uint8)}, "black everywhere"),
        ({"keep_unmasked": "yes"}, "`keep_unmasked` must be True or False"),
    ],
)
def test_bad_mask_options_are_one_line(base, photo, mask, options, message):
    arguments = {"init_image": photo, "mask": mask, "steps": 2, **options}
    with pytest.raises(ConfigError, match=message) as caught:
        generate(base, PROMPT, **arguments)
    assert "\n" not in str(caught.value)


def test_an_unreadable_mask_names_the_file(base, photo, tmp_path):
    from controlkit.errors import ImageError

    broken = tmp_path / "mask.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageError, match="mask.png"):
        generate(base, PROMPT, init_image=photo, mask=broken, steps=2)


def test_sdxl_inpainting_with_a_controlnet_equals_diffusers(sdxl, photo, mask):
    from diffusers import StableDiffusionXLControlNetInpaintPipeline, UniPCMultistepScheduler

    controlnet = trained_like_controlnet(sdxl["unet"], seed=5)
    pipe = StableDiffusionXLControlNetInpaintPipeline(
        **{**sdxl, "scheduler": UniPCMultistepScheduler.from_config(sdxl["scheduler"].config)},
        controlnet=controlnet, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, image=Image.fromarray(photo), mask_image=Image.fromarray(mask),
                    control_image=reference_condition(photo, mask), strength=1.0, num_inference_steps=4,
                    guidance_scale=5.0, controlnet_conditioning_scale=1.0, generator=torch.Generator("cpu").manual_seed(7),
                    output_type="np").images
    control = Control(get_preprocessor("inpaint")(photo, mask=mask), controlnet)
    result = ours(pipeline_from_components(sdxl), [control], photo, mask, strength=1.0, guidance_scale=5.0)
    np.testing.assert_array_equal(result, expected)


def test_the_command_line_inpaints_as_the_python_api(tmp_path, components, controlnet, photo, mask, capsys):
    from controlkit.checkpoint import save_controlnet
    from controlkit.cli import main
    from controlkit.controlnet import ConditionMetadata
    from controlkit.pipeline import load_base
    from controlkit.tiny import save_components

    save_components(components, tmp_path / "base")
    save_controlnet(controlnet, tmp_path / "cn", ConditionMetadata(condition="inpaint", preprocessor="inpaint"))
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    common = ["--threads", "1", "generate", PROMPT, "--base", str(tmp_path / "base"), "--steps", "3", "--seed", "2",
              "--init-image", str(tmp_path / "photo.png"), "--strength", "1"]
    # the photo goes through the inpaint preprocessor the checkpoint names, which gets --mask
    code = main([*common, "--preprocess", "--controlnet", f"inpaint={tmp_path / 'cn'}", "--control",
                 f"inpaint={tmp_path / 'photo.png'}",
                 "--mask", str(tmp_path / "mask.png"), "-o", str(out)])
    assert code == 0
    base = load_base(tmp_path / "base")
    control = Control.from_pretrained(tmp_path / "cn", photo, unet=base.unet,
                                      preprocessor=get_preprocessor("inpaint"))
    expected = generate(base, PROMPT, [control], init_image=photo, mask=mask, strength=1.0, steps=3, seed=2)
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected.images[0]))

    capsys.readouterr()
    assert main([*common[:-4], "--mask", str(tmp_path / "mask.png"), "-o", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert "`mask` needs `init_image`" in error and "--init-image" in error and len(error.splitlines()) == 1


def test_training_pairs_keep_the_mask_from_files_from_the_preprocessor_and_through_the_cache(tmp_path, photo, mask):
    import json

    from training.data.dataset import PairedDataset, load_pairs, make_condition_fn

    Image.fromarray(photo).save(tmp_path / "a.png")
    get_preprocessor("inpaint")(photo, mask=mask).save(tmp_path / "a_hole.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "condition": "a_hole.png", "prompt": "p"}) + "\n")
    expected = reference_condition(photo, mask)[0]
    from_file = PairedDataset(load_pairs(tmp_path / "m.jsonl"), resolution=64)[0]["conditioning_pixel_values"]
    torch.testing.assert_close(from_file, expected, rtol=0, atol=0)
    # computed per sample with a random mask (the demo recipe's), then read back from the condition cache
    (tmp_path / "n.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "p"}) + "\n")
    condition_fn = make_condition_fn("inpaint", {"random_mask": 9})
    computed = [
        PairedDataset(load_pairs(tmp_path / "n.jsonl"), resolution=64, condition_fn=condition_fn,
                      cache_dir=tmp_path / "cache")[0]["conditioning_pixel_values"]
        for _ in range(2)
    ]
    hole = np.asarray(get_preprocessor("inpaint", random_mask=9)(photo))
    torch.testing.assert_close(computed[0], condition_tensor(hole)[0], rtol=0, atol=0)
    torch.testing.assert_close(computed[1], computed[0], rtol=0, atol=0)
    assert (computed[1] == -1).any() and len(list((tmp_path / "cache").rglob("*.png"))) == 1
