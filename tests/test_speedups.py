"""The speed-ups of `generate`: ControlNet step reuse (`Control.every`), compilation (`compile=True`: each
loaded model compiled once, no recompilation when the settings of a generation change, output equal to eager),
and bfloat16 with a float32 VAE. Tiny real models; compilation is torch's inductor, as users get it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import trained_like_controlnet

from controlkit.control import Control
from controlkit.errors import ConfigError
from controlkit.pipeline import generate
from controlkit.sd_pipelines import pipeline_from_components

TINY_MODELS = True

PROMPT = "a red sphere on the floor"


@pytest.fixture(scope="module")
def controlnet(components):
    return trained_like_controlnet(components["unet"], seed=5)


@pytest.fixture(scope="module")
def second_controlnet(components):
    return trained_like_controlnet(components["unet"], seed=6)


def edges(seed: int = 0) -> np.ndarray:
    x, y = np.random.default_rng(seed).integers(4, 32, 2)
    image = np.zeros((64, 64, 3), np.uint8)
    image[y : y + 24, x] = 255
    image[y, x : x + 20] = 255
    return image


def run(base, controls, **options):
    options = {"steps": 4, "seed": 1, "output_type": "np", **options}
    return generate(base, PROMPT, controls, **options).images


class Recorder:
    """Records, per U-Net call, the middle-block residual it was given (forward pre-hook with kwargs), and counts
    the ControlNet's runs (its input convolution sees the latents once per run)."""

    def __init__(self, unet, controlnet):
        self.residuals: list[torch.Tensor | None] = []
        self.runs = 0
        self.handles = [
            unet.register_forward_pre_hook(self._unet, with_kwargs=True),
            controlnet.conv_in.register_forward_pre_hook(self._controlnet),
        ]

    def _unet(self, module, args, kwargs):
        self.residuals.append(kwargs.get("mid_block_additional_residual"))

    def _controlnet(self, module, args):
        self.runs += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_every_step_is_the_default_bit_for_bit(base, controlnet):
    np.testing.assert_array_equal(run(base, [Control(edges(), controlnet, every=1)]),
                                  run(base, [Control(edges(), controlnet)]))


@pytest.mark.parametrize(("options", "runs_at"), [
    ({"every": 2}, [0, 2, 4]),
    ({"every": 3}, [0, 3]),
    ({"every": [0, 1, 4]}, [0, 1, 4]),
    ({"every": 2, "start": 0.4}, [3, 5]),  # the window starts at step 3 (3/6 >= 0.4): it runs, then every second
    ({"every": [4], "start": 0.2}, [2, 4]),  # the window's first step (2) always runs
])
def test_the_controlnet_runs_on_its_schedule_and_the_steps_between_reuse_its_residuals(base, controlnet, options,
                                                                                         runs_at):
    with Recorder(base.unet, controlnet) as record:
        run(base, [Control(edges(), controlnet, **options)], steps=6)
    assert record.runs == len(runs_at)
    residuals = record.residuals
    for step, residual in enumerate(residuals):
        if step < runs_at[0]:
            assert residual is None
        elif step not in runs_at:  # exactly the tensor of the last run
            last = max(s for s in runs_at if s < step)
            assert residual is residuals[last]
    assert all(residuals[a] is not residuals[b] for a, b in zip(runs_at, runs_at[1:]))


def test_reuse_changes_the_image_and_stays_near_every_step(base, controlnet):
    every_step = run(base, [Control(edges(), controlnet)], steps=8)
    reused = run(base, [Control(edges(), controlnet, every=2)], steps=8)
    no_control = run(base, [], steps=8)
    assert 0 < np.abs(reused - every_step).max()
    assert np.abs(reused - every_step).mean() < np.abs(no_control - every_step).mean()


@pytest.mark.parametrize("every", [0, 51, 2.5, "2", [-1], [0, 999], True])
def test_bad_every_is_one_line(controlnet, every):
    with pytest.raises(ConfigError, match="`every`") as refused:
        Control(edges(), controlnet, every=every)
    assert "\n" not in str(refused.value)


def test_cli_every_is_checked_before_any_model_loads(tmp_path, capsys):
    from controlkit.cli import main

    code = main(["generate", "x", "--base", str(tmp_path / "absent"), "--controlnet", "a=b", "--control", "a=c.png",
                 "--every", "a=0"])
    assert code != 0
    assert "--every must be an integer in 1..50" in capsys.readouterr().err


@pytest.fixture(scope="module")
def compiled_once(base, controlnet, second_controlnet):
    """Every graph compiled once: both ControlNets on both guidance layouts, the U-Net with and without
    residuals. Returns the dynamo counters."""
    run(base, [Control(edges(), controlnet), Control(edges(1), second_controlnet, mode="control", start=0.5)],
        compile=True)
    run(base, [Control(edges(), controlnet, mode="control")], compile=True)
    run(base, [Control(edges(1), second_controlnet, start=0.5)], compile=True)  # steps without residuals too
    return torch._dynamo.utils.counters


def test_compiled_equals_eager_within_rounding(base, controlnet, second_controlnet, compiled_once):
    for controls in ([Control(edges(), controlnet)],
                     [Control(edges(), controlnet, scale=0.7, mode="prompt"),
                      Control(edges(1), second_controlnet, end=0.5)]):
        np.testing.assert_allclose(run(base, controls, compile=True), run(base, controls), atol=1e-4, rtol=0)


@pytest.mark.parametrize("change", [
    {"scale": 0.3}, {"scale": 1.7, "mode": "prompt"}, {"mode": "control"}, {"start": 0.25, "end": 0.75},
    {"layer_weights": [0.0, 0.5, 1.0, 1.5, 2.0]}, {"every": 2}, {"prompt": "two blue cubes"}, {"seed": 9},
    {"two_controls": True}, {"no_controls_active": True},
])
def test_no_recompilation_when_the_settings_change(base, controlnet, second_controlnet, compiled_once, change):
    change = dict(change)
    prompt, seed = change.pop("prompt", PROMPT), change.pop("seed", 1)
    controls = [Control(edges(), controlnet, **{k: v for k, v in change.items() if k in Control.__dataclass_fields__})]
    if change.pop("two_controls", False):
        controls.append(Control(edges(1), second_controlnet, scale=0.5))
    if change.pop("no_controls_active", False):
        controls = [Control(edges(), controlnet, scale=0.0)]
    graphs = compiled_once["stats"]["unique_graphs"]
    generate(base, prompt, controls, steps=4, seed=seed, output_type="np", compile=True)
    assert compiled_once["stats"]["unique_graphs"] == graphs


def test_compiling_leaves_the_callers_modules_as_they_were(base, controlnet, compiled_once):
    assert type(base.unet).__name__ == "UNet2DConditionModel"
    assert type(controlnet).__name__ == "ControlNetModel"
    assert not any(name.startswith("_orig") for name, _ in controlnet.named_modules())


def test_bfloat16_runs_the_vae_in_float32_and_stays_near_float32(components):
    import copy

    half = pipeline_from_components({name: copy.deepcopy(module).to(torch.bfloat16)
                                     if isinstance(module, torch.nn.Module) else module
                                     for name, module in components.items()})
    controlnet = trained_like_controlnet(half.unet, seed=5).to(torch.bfloat16)
    result = run(half, [Control(edges(), controlnet)])
    assert half.vae.dtype == torch.bfloat16  # decoded through a float32 copy, not converted
    full = run(pipeline_from_components(components), [Control(edges(), trained_like_controlnet(components["unet"], 5))])
    assert np.isfinite(result).all()
    assert np.abs(result - full).mean() < 0.05


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_compile_must_be_a_bool(base, value):
    with pytest.raises(ConfigError, match="`compile` must be True or False") as refused:
        run(base, [], compile=value)
    assert "\n" not in str(refused.value)


def test_cli_size_conditioning_is_checked_before_any_model_loads(tmp_path, capsys):
    from controlkit.cli import main

    code = main(["generate", "x", "--base", str(tmp_path / "absent"), "--original-size", "0", "512"])
    assert code == 1
    err = capsys.readouterr().err
    assert "`original_size` must be an integer in 1..16384, got 0" in err and err.count("\n") == 1
