"""Generation around the controls: bases, schedulers, seeds, batches, sizes, resize modes, img2img, dtypes,
and the errors a user can cause. Tiny real components, compared with diffusers' pipelines where they overlap."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import trained_like_controlnet
from PIL import Image

from controlkit.control import Control, fit_image
from controlkit.controlnet import build_controlnet
from controlkit.errors import CheckpointError, ConfigError, ControlkitError, ImageError, WeightsNotFoundError
from controlkit.generation_options import GenerationWarning
from controlkit.pipeline import generate, load_base
from controlkit.sd_pipelines import pipeline_from_components
from controlkit.tiny import TinyConfig, build_components, save_components

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)

PROMPT = "a blue cube on the floor"




@pytest.fixture(scope="module")
def controlnet(components):
    return trained_like_controlnet(components["unet"], seed=1)


@pytest.fixture(scope="module")
def saved_base(components, tmp_path_factory):
    return save_components(components, tmp_path_factory.mktemp("base") / "tiny-sd")


def edge_map(height: int = 64, width: int = 64) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[height // 4 : 3 * height // 4, width // 4] = 255
    image[height // 4, width // 4 : 3 * width // 4] = 255
    return image


def run(base, controls=(), **options):
    options = {"steps": 3, "seed": 7, "output_type": "np", **options}
    return generate(base, PROMPT, controls, **options).images


def diffusers_pipeline(cls, components, scheduler_class, **extra):
    pipe = cls(
        **{**components, "scheduler": scheduler_class.from_config(components["scheduler"].config)},
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    ("name", "class_name"),
    [("unipc", "UniPCMultistepScheduler"), ("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler"),
     ("euler-ancestral", "EulerAncestralDiscreteScheduler"), ("dpm++", "DPMSolverMultistepScheduler")],
)
def test_without_controls_equals_diffusers_stable_diffusion_for_each_scheduler(components, base, name, class_name):
    import diffusers

    pipe = diffusers_pipeline(diffusers.StableDiffusionPipeline, components, getattr(diffusers, class_name))
    expected = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(7),
                    output_type="np").images
    np.testing.assert_array_equal(run(base, scheduler=name), expected)


def test_img2img_equals_diffusers_controlnet_img2img(components, base, controlnet):
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, UniPCMultistepScheduler

    init = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pipe = diffusers_pipeline(
        StableDiffusionControlNetImg2ImgPipeline, components, UniPCMultistepScheduler, controlnet=controlnet
    )
    expected = pipe(PROMPT, image=Image.fromarray(init), control_image=Image.fromarray(edge_map()), strength=0.6,
                    controlnet_conditioning_scale=1.0, num_inference_steps=5,
                    generator=torch.Generator("cpu").manual_seed(7), output_type="np").images
    result = run(base, [Control(edge_map(), controlnet)], init_image=init, strength=0.6, steps=5)
    np.testing.assert_allclose(result, expected, atol=1e-5, rtol=0)


def test_img2img_stays_near_the_init_latents_at_low_strength(base):
    init = np.zeros((64, 64, 3), np.uint8)
    init[:, 32:] = 255
    pixels = torch.from_numpy(init).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        target = base.vae.encode(pixels).latent_dist.mean * base.vae.config.scaling_factor
    weak, strong = (
        run(base, init_image=init, strength=strength, steps=10, output_type="latent") for strength in (0.2, 1.0)
    )
    assert (weak - target).abs().mean() < 0.5 * (strong - target).abs().mean()


def test_img2img_strength_that_leaves_no_step_is_refused(base):
    with pytest.raises(ConfigError, match="leaves no step"):
        run(base, init_image=edge_map(), strength=0.1, steps=3)


def test_seed_reproduces_and_a_drawn_seed_is_returned(base, controlnet):
    controls = [Control(edge_map(), controlnet)]
    np.testing.assert_array_equal(run(base, controls, seed=11), run(base, controls, seed=11))
    assert np.abs(run(base, controls, seed=11) - run(base, controls, seed=12)).max() > 1e-3
    drawn = generate(base, PROMPT, controls, steps=3, output_type="np")
    np.testing.assert_array_equal(drawn.images, run(base, controls, seed=drawn.seed))
    assert drawn.settings["seed"] == drawn.seed and drawn.settings["scheduler"] == "unipc"


def test_batch_returns_num_images_and_its_first_equals_a_single_run(base, controlnet):
    controls = [Control(edge_map(), controlnet)]
    batch = generate(base, PROMPT, controls, steps=3, seed=5, num_images=3).images
    assert len(batch) == 3 and all(isinstance(image, Image.Image) and image.size == (64, 64) for image in batch)
    arrays = run(base, controls, seed=5, num_images=3)
    assert np.abs(arrays[0] - arrays[1]).max() > 1e-3  # different noise per image
    np.testing.assert_allclose(arrays[0], run(base, controls, seed=5)[0], atol=1e-4)


def test_size_defaults_to_the_control_image_rounded_to_multiples_of_8(base, controlnet):
    assert run(base, [Control(edge_map(44, 60), controlnet)]).shape == (1, 48, 64, 3)
    with pytest.warns(GenerationWarning, match="the output is 32x48 but the base was made for 64x64"):
        assert run(base, [Control(edge_map(44, 60), controlnet)], width=32).shape == (1, 48, 32, 3)
    assert run(base).shape == (1, 64, 64, 3)  # no control: the U-Net's sample size


@pytest.mark.parametrize("side", ["width", "height"])
def test_size_not_a_multiple_of_8_is_refused(base, side):
    with pytest.raises(ConfigError, match=f"`{side}` must be a positive multiple of 8, got 100; use 96 or 104"):
        run(base, **{side: 100})


def test_resize_modes_fit_control_images_of_another_size():
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 200  # left half light, right half dark
    wide[0, :] = 10
    stretched = fit_image(wide, (32, 32), "resize")
    assert stretched.shape == (32, 32, 3) and stretched[16, 4, 0] == 200 and stretched[16, 28, 0] == 0
    cropped = fit_image(wide, (32, 32), "crop")  # scaled to 32x64, centre 32 columns kept
    assert cropped.shape == (32, 32, 3) and cropped[16, 8, 0] == 200 and cropped[16, 24, 0] == 0
    filled = fit_image(wide, (32, 32), "fill")  # scaled to 16x32, padded above and below with the border median
    assert filled.shape == (32, 32, 3)
    border_median = np.median(np.concatenate([wide[0], wide[-1], wide[:, 0], wide[:, -1]]), axis=0)
    np.testing.assert_array_equal(filled[0, 0], border_median.astype(np.uint8))
    assert filled[16, 4, 0] == 200 and filled[16, 28, 0] == 0
    with pytest.raises(ConfigError, match="`resize_mode` must be one of resize, crop, fill"):
        fit_image(wide, (32, 32), "stretch")


def test_resize_mode_changes_what_the_controlnet_sees(base, controlnet):
    wide = edge_map(32, 96)
    results = [run(base, [Control(wide, controlnet)], width=64, height=64, resize_mode=mode) for mode in
               ("resize", "crop", "fill")]
    assert all(result.shape == (1, 64, 64, 3) for result in results)
    assert np.abs(results[0] - results[1]).max() > 1e-3 and np.abs(results[1] - results[2]).max() > 1e-3


def test_photo_with_a_preprocessor_callable_equals_the_precomputed_map(base, controlnet):
    photo = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    calls = []

    def threshold(image):
        calls.append(image.shape)
        return ((image.mean(axis=2) > 128) * 255).astype(np.uint8)

    via_callable = run(base, [Control(photo, controlnet, preprocessor=threshold)])
    np.testing.assert_array_equal(via_callable, run(base, [Control(threshold(photo), controlnet)]))
    assert calls == [(64, 64, 3), (64, 64, 3)]


def test_core_generation_modules_import_neither_preprocessors_nor_torch():
    code = (
        "import sys, controlkit.pipeline, controlkit.control, controlkit.sampling; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('preprocessors', 'torch', 'diffusers')]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_load_base_reads_a_diffusers_folder(components, saved_base):
    loaded = load_base(saved_base)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = components[name].state_dict(), loaded.components[name].state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert run(loaded).shape == (1, 64, 64, 3)


def test_load_base_with_dtype_runs_in_that_dtype_and_never_converts_the_controlnet(components, saved_base):
    loaded = load_base(saved_base, torch_dtype=torch.bfloat16)
    fresh = build_controlnet(components["unet"], conditioning_embedding_out_channels=(16, 32))
    assert loaded.unet.dtype == loaded.vae.dtype == torch.bfloat16 and fresh.dtype == torch.float32
    with pytest.raises(ConfigError, match="is float32 on cpu but the base is bfloat16 on cpu; load it with"):
        generate(loaded, PROMPT, [Control(edge_map(), fresh)], steps=2, seed=1, output_type="np")
    assert fresh.dtype == torch.float32
    result = generate(loaded, PROMPT, [Control(edge_map(), fresh.to(torch.bfloat16))], steps=2, seed=1,
                      output_type="np")
    assert result.settings["dtype"] == "bfloat16" and np.isfinite(result.images).all()


def test_load_base_errors_name_the_input_and_the_fix(tmp_path, saved_base):
    with pytest.raises(WeightsNotFoundError, match="no such file or folder"):
        load_base(tmp_path / "missing")
    with pytest.raises(WeightsNotFoundError, match=r"not a diffusers folder \(no model_index.json\)"):
        load_base(tmp_path)
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(saved_base, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(WeightsNotFoundError, match="weights missing"):
        load_base(broken)
    page = tmp_path / "model.ckpt"
    page.write_text("<!doctype html><html>login</html>")
    with pytest.raises(CheckpointError, match="HTML page"):
        load_base(page)


def test_single_file_without_a_config_says_what_to_pass(tmp_path):
    from safetensors.torch import save_file

    single = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(single))
    with pytest.raises(WeightsNotFoundError, match="--base-config"):
        load_base(single)


def test_controlnet_for_another_base_is_refused(base):
    other_unet = build_components(TinyConfig(block_out_channels=(16, 32), vae_channels=(16, 32)))["unet"]
    foreign = build_controlnet(other_unet, conditioning_embedding_out_channels=(16, 32))
    with pytest.raises(CheckpointError, match=r"control 1 is for a different base: .* encoder tensors differ"):
        run(base, [Control(edge_map(), foreign)])


def test_controlnet_with_another_downsampling_is_refused(components, base):
    eightfold = build_controlnet(components["unet"])  # SD's 8x conditioning encoder; the tiny VAE is 2x
    with pytest.raises(CheckpointError, match="downsamples its condition by 8 but the base's VAE by 2"):
        run(base, [Control(edge_map(), eightfold)])


def test_bad_control_image_is_an_image_error(base, controlnet, tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        run(base, [Control(tmp_path / "missing.png", controlnet)])


@pytest.mark.parametrize(
    ("options", "message"),
    [({"steps": 0}, r"`steps` must be an integer in 1..999, got 0"), ({"num_images": 0}, "`num_images`"),
     ({"strength": 1.5}, r"`strength` must be a finite number in \(0, 1\]"),
     ({"scheduler": "heun"}, "available: unipc, ddim"),
     ({"output_type": "jpeg"}, "`output_type` must be one of")],
)
def test_bad_generation_options_are_refused(base, options, message):
    with pytest.raises(ConfigError, match=message):
        run(base, **options)


def test_non_finite_latents_are_reported_not_returned_as_a_black_image():
    broken = build_components(seed=3)
    with torch.no_grad():
        broken["unet"].conv_out.bias.fill_(float("nan"))
    with pytest.raises(ControlkitError, match="NaN/inf latents"):
        run(pipeline_from_components(broken))


def test_a_float16_folder_loads_in_one_dtype_and_generates():
    """The demo base stores float16; transformers would keep its text encoder in float16 beside a float32 U-Net."""
    from controlkit.weights import DEMO_WEIGHTS_DIR

    loaded = load_base(DEMO_WEIGHTS_DIR / "base")
    assert {module.dtype for module in (loaded.unet, loaded.vae, loaded.text_encoder)} == {torch.float32}
    images = generate(loaded, "a red sphere on a grey floor", steps=2, seed=0, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    half = load_base(DEMO_WEIGHTS_DIR / "base", torch_dtype=torch.bfloat16)
    assert {module.dtype for module in (half.unet, half.vae, half.text_encoder)} == {torch.bfloat16}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_here_is_refused_before_loading(saved_base):
    with pytest.raises(ConfigError, match="device 'cuda': no cuda device here"):
        load_base(saved_base, device="cuda")
    with pytest.raises(ConfigError, match="device 'gpu0': not a device name; use cpu, cuda, cuda:N or mps"):
        load_base(saved_base, device="gpu0")


def test_on_step_reports_each_denoising_step_and_changes_nothing(base, controlnet):
    seen = []
    reported = run(base, [Control(edge_map(), controlnet)], on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_array_equal(reported, run(base, [Control(edge_map(), controlnet)]))
    seen.clear()
    run(base, init_image=edge_map(), strength=0.5, steps=4, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]  # img2img runs the last `strength` of the steps
