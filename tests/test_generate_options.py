"""Every option of `generate` is checked with its allowed range before any model runs or any latent is allocated,
the working size is bounded, the defaults come from what the base records, and a size far from the base's native
one is said. Tiny real components; the U-Net and the text encoder are watched with forward hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from controlkit import generation_options
from controlkit.control import Control
from controlkit.controlnet import build_controlnet
from controlkit.errors import CheckpointError, ConfigError
from controlkit.generation_options import GenerationWarning, check_generation_options, generation_defaults
from controlkit.pipeline import generate, load_base
from controlkit.sd_pipelines import SETTINGS_FILE, recorded_settings, write_recorded_settings
from controlkit.tiny import save_components

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)

PROMPT = "a red sphere"


@pytest.fixture(scope="module")
def controlnet(components):
    return build_controlnet(components["unet"], conditioning_embedding_out_channels=(16, 32)).eval()


@pytest.fixture
def calls(base):
    """How often the U-Net and the text encoder ran during the test (forward hooks on the real modules)."""
    counts = {"unet": 0, "text_encoder": 0}
    def counter(name):
        return lambda *_: counts.__setitem__(name, counts[name] + 1)

    hooks = [getattr(base, name).register_forward_hook(counter(name)) for name in counts]
    yield counts
    for hook in hooks:
        hook.remove()


BAD_OPTIONS = [
    ({"steps": 0}, "`steps` must be an integer in 1..999, got 0"),
    ({"steps": 1000}, "`steps` must be an integer in 1..999, got 1000"),
    ({"steps": True}, "`steps` must be an integer in 1..999, got True"),
    ({"steps": 2.5}, "`steps` must be an integer"),
    ({"guidance_scale": float("nan")}, "`guidance_scale` must be a finite number >= 0, got nan"),
    ({"guidance_scale": float("inf")}, "`guidance_scale` must be a finite number >= 0, got inf"),
    ({"guidance_scale": -1.0}, "`guidance_scale` must be a finite number >= 0, got -1.0"),
    ({"guidance_scale": "7"}, "`guidance_scale` must be a finite number"),
    ({"seed": -1}, "`seed` must be an integer in 0..18446744073709551615, got -1; leave it out for a random seed"),
    ({"seed": 2**64}, "`seed` must be an integer in 0..18446744073709551615"),
    ({"seed": 1.5}, "`seed` must be an integer"),
    ({"seed": "1"}, "`seed` must be an integer"),
    ({"num_images": 0}, "`num_images` must be an integer in 1..65536, got 0"),
    ({"num_images": 10**9}, "`num_images` must be an integer in 1..65536"),
    ({"strength": float("nan")}, r"`strength` must be a finite number in \(0, 1\], got nan"),
    ({"strength": 0.0}, r"`strength` must be a finite number in \(0, 1\], got 0.0"),
    ({"eta": float("nan")}, r"`eta` must be a finite number in \[0, 1\], got nan"),
    ({"eta": 2.0}, r"`eta` must be a finite number in \[0, 1\]"),
    ({"output_type": "jpeg"}, "`output_type` must be one of pil, np, pt, latent, got 'jpeg'"),
    ({"resize_mode": "stretch"}, "`resize_mode` must be one of resize, crop, fill, got 'stretch'"),
    ({"width": 100}, "`width` must be a positive multiple of 8, got 100; use 96 or 104"),
    ({"width": 8192, "height": 8192}, r"the output size 8192x8192 is over 4.2 MP per image; set a smaller `width`"),
    ({"width": 512, "height": 512, "num_images": 17},
     r"`num_images` 17 at 512x512 is 4.5 MP in one batch, over 4.2 MP; use at most 16 images at this size"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_bad_options_are_refused_before_any_model_runs(base, calls, options, message):
    with pytest.raises(ConfigError, match=message):
        generate(base, PROMPT, steps=options.pop("steps", 2), seed=options.pop("seed", 1), **options)
    assert calls == {"unet": 0, "text_encoder": 0}


def test_the_options_check_names_the_callers_flags():
    with pytest.raises(ConfigError, match="--guidance must be a finite number >= 0, got nan"):
        check_generation_options(guidance_scale=float("nan"), names={"guidance_scale": "--guidance"})
    with pytest.raises(ConfigError, match="set a smaller --width and --height"):
        check_generation_options(width=40960, height=40960, names={"width": "--width", "height": "--height"})


def test_seeds_at_both_ends_of_the_range_run_and_differ(base):
    low, high = (generate(base, PROMPT, steps=1, seed=seed, output_type="latent").images for seed in (0, 2**64 - 1))
    assert torch.isfinite(low).all() and not torch.equal(low, high)
    numpy_seed = generate(base, PROMPT, steps=1, seed=np.int64(0), output_type="latent")
    assert torch.equal(numpy_seed.images, low) and numpy_seed.seed == 0


def test_as_many_steps_as_the_bases_training_timesteps_are_refused(components, calls, base):
    from controlkit.sd_pipelines import pipeline_from_components

    short = pipeline_from_components({**components, "scheduler": type(components["scheduler"]).from_config(
        components["scheduler"].config, num_train_timesteps=50)})
    with pytest.raises(ConfigError, match=r"`steps` must be an integer in 1..49, got 50 \(fewer than the base's"):
        generate(short, PROMPT, steps=50, seed=1, scheduler="ddim")  # DDIM would index past its schedule
    assert calls["unet"] == 0
    latents = generate(short, PROMPT, steps=49, seed=1, scheduler="ddim", output_type="latent").images
    assert torch.isfinite(latents).all()


def test_a_size_taken_from_a_control_image_is_bounded_before_the_preprocessor_runs(base, controlnet, calls,
                                                                                      monkeypatch):
    monkeypatch.setattr(generation_options, "MAX_IMAGE_PIXELS", 64 * 64)  # a small bound: the test image stays small
    seen = []
    control = Control(np.zeros((72, 72, 3), np.uint8), controlnet, preprocessor=lambda image: seen.append(1) or image)
    with pytest.raises(ConfigError, match=r"72x72 \(the first control image's size\) is over 4096 pixels"):
        generate(base, PROMPT, [control], steps=2, seed=1)
    assert not seen and calls["unet"] == 0


def test_bad_prompts_and_controls_are_one_line(base, controlnet):
    with pytest.raises(ConfigError, match="`prompt` must be a string, got NoneType"):
        generate(base, None, steps=1, seed=1)
    with pytest.raises(ConfigError, match="`controls` must be a list of controlkit.Control objects"):
        generate(base, PROMPT, Control(np.zeros((64, 64, 3), np.uint8), controlnet), steps=1, seed=1)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"scale": float("inf")}, r"`scale` must be a finite number in \[0, 10\], got inf"),
     ({"scale": 11.0}, r"`scale` must be a finite number in \[0, 10\]"),
     ({"start": float("nan")}, "0 <= start < end <= 1, got start=nan"),
     ({"layer_weights": [1.0, float("nan"), 1.0, 1.0, 1.0]}, r"`layer_weights` must be a finite number in \[0, 10\]"),
     ({"layer_weights": 1.0}, "`layer_weights` must be a list of numbers, got 1.0")],
)
def test_control_options_out_of_range_are_refused(controlnet, options, message):
    with pytest.raises(ConfigError, match=message):
        Control(np.zeros((64, 64, 3), np.uint8), controlnet, **options)


@pytest.fixture(scope="module")
def saved(components, tmp_path_factory):
    return save_components(components, tmp_path_factory.mktemp("recorded") / "base")


def test_defaults_come_from_the_settings_the_base_records(saved, tmp_path):
    plain = load_base(saved)
    assert generation_defaults(plain) == {"steps": 20, "guidance_scale": 7.5}
    import shutil

    folder = shutil.copytree(saved, tmp_path / "recorded")
    write_recorded_settings(folder, steps=3, guidance_scale=1.0)
    recorded = load_base(folder)
    result = generate(recorded, PROMPT, seed=1, output_type="latent")
    assert (result.settings["steps"], result.settings["guidance_scale"]) == (3, 1.0)
    assert generate(recorded, PROMPT, seed=1, steps=2, guidance_scale=4.0).settings["guidance_scale"] == 4.0


def test_the_demo_base_records_its_own_settings():
    assert generation_defaults(load_base("demo")) == {"steps": 20, "guidance_scale": 2.0}


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [("{not json", CheckpointError, "not a JSON object"),
     (json.dumps({"generation": {"guidance_scale": float("nan")}}), ConfigError,
      "`guidance_scale` must be a finite number >= 0, got nan"),
     (json.dumps({"generation": {"steps": 20, "sampler": "x"}}), ConfigError,
      "\"generation\" may hold only steps, guidance_scale")],
)
def test_a_bad_settings_file_is_one_line_naming_it(tmp_path, text, error, message):
    (tmp_path / SETTINGS_FILE).write_text(text)
    with pytest.raises(error, match=message) as raised:
        recorded_settings(tmp_path)
    assert SETTINGS_FILE in str(raised.value) and "\n" not in str(raised.value)


def test_a_size_far_from_the_bases_native_one_is_said(base, recwarn):
    generate(base, PROMPT, steps=1, seed=1, output_type="latent")  # 64x64: the tiny base's native size
    generate(base, PROMPT, steps=1, seed=1, width=64, height=96, output_type="latent")  # 1.5x the area
    assert not [w for w in recwarn if issubclass(w.category, GenerationWarning)]
    with pytest.warns(GenerationWarning, match=r"the output is 192x192 but the base was made for 64x64 \(9x the "
                                               r"area and about 9x the time\); set the width and height to 64x64"):
        generate(base, PROMPT, steps=1, seed=1, width=192, height=192, output_type="latent")
    with pytest.warns(GenerationWarning, match=r"the output is 32x32 .* \(1/4 of the area\)"):
        generate(base, PROMPT, steps=1, seed=1, width=32, height=32, output_type="latent")
