"""Every config value in its allowed range before anything loads, and the settings that depend on the machine."""

from __future__ import annotations

import pytest
import torch

from controlkit.cli import main
from controlkit.errors import ConfigError
from training.config import load_config
from training.config_rules import machine_settings

REQUIRED = ["model.base=models/sd15", "model.condition=canny", "data.source=pairs.jsonl"]

#: (override, the phrase of its one-line problem): values that used to pass and then broke the run.
BAD_VALUES = [
    ("optim.learning_rate=inf", "`optim.learning_rate` must be a finite number (got inf)"),
    ("optim.learning_rate=nan", "`optim.learning_rate` must be a finite number (got nan)"),
    ("optim.learning_rate=5.0", "`optim.learning_rate` must be in (0, 1] (got 5.0)"),
    ("optim.epsilon=inf", "`optim.epsilon` must be a finite number"),
    ("optim.weight_decay=nan", "`optim.weight_decay` must be a finite number"),
    ("train.max_grad_norm=inf", "`train.max_grad_norm` must be a finite number"),
    ("train.seed=-1", "`train.seed` must be in [0, 2**63) (got -1)"),
    ("train.seed=18446744073709551616", "`train.seed` must be in [0, 2**63) (got 18446744073709551616)"),
    ("validation.seed=9223372036854775808", "`validation.seed` must be in [0, 2**63)"),
    ("data.proportion_empty_prompts=nan", "`data.proportion_empty_prompts` must be a finite number"),
    ("data.resolution=16384", "`data.resolution` must be a positive multiple of 8 up to 8192 (got 16384)"),
    ("data.num_workers=100000", "`data.num_workers` must be in [0, 128]"),
    ("model.conditioning_channels=1", "`model.conditioning_channels` must be 3: training condition maps are RGB"),
    ("schedule.power=0", "`schedule.power` must be positive (got 0.0)"),
    ("validation.num_inference_steps=5000", "`validation.num_inference_steps` must be in [1, 1000]"),
    ("validation.guidance_scale=-1", "`validation.guidance_scale` must be 0 or positive"),
    ("validation.count=100000", "`validation.count` must be in [1, 1000]"),
    ("validation.every=0", "`validation.every` must be in [1, 50]"),
    ("train.process_timeout_minutes=99999999999999", "`train.process_timeout_minutes` must be in [1, 10080]"),
    ("ema.decay=nan", "`ema.decay` must be a finite number"),
    ('train.output_dir="runs/a\\u0000b"', "`train.output_dir` must not contain a NUL character"),
    ("data.image_column=", "`data.image_column` must name a dataset column"),
    ("data.preprocessor_params={low_threshold = 50}", "`data.preprocessor_params` needs data.preprocessor"),
]


@pytest.mark.parametrize("override, problem", BAD_VALUES, ids=[item[0][:40] for item in BAD_VALUES])
def test_values_outside_their_range_are_one_line_naming_the_key(override, problem):
    with pytest.raises(ConfigError) as error:
        load_config(None, [*REQUIRED, override])
    message = str(error.value)
    assert message.startswith("config: 1 problem: ") and problem in message and "\n" not in message


def test_settings_that_depend_on_each_other():
    with pytest.raises(ConfigError, match=r"`schedule.warmup_steps` must be below train.max_steps with the polyn"):
        load_config(None, [*REQUIRED, "schedule.name=polynomial", "schedule.warmup_steps=1000"])
    with pytest.raises(ConfigError, match=r"`optim.learning_rate` must be above the polynomial schedule's end"):
        load_config(None, [*REQUIRED, "schedule.name=polynomial", "optim.learning_rate=1e-8"])
    with pytest.raises(ConfigError, match=r"`data.preprocessor_params` has parameter\(s\) bogus that canny does not "
                                          r"take \(it takes: .*low_threshold"):
        load_config(None, [*REQUIRED, "data.preprocessor=canny", "data.preprocessor_params={bogus = 1}"])
    with pytest.raises(ConfigError, match=r"`data.randomize` must map parameters to \[low, high\] with low <= high, "
                                          r"both finite"):
        load_config(None, [*REQUIRED, "data.preprocessor=canny", "data.randomize={low_threshold = [0, inf]}"])
    edge = load_config(None, [*REQUIRED, "train.seed=9223372036854775807", "optim.learning_rate=1"])
    assert edge.train.seed == 2**63 - 1 and edge.optim.learning_rate == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fp16 fallback is for machines without CUDA")
def test_fp16_without_cuda_falls_back_to_float32_and_says_so(capsys):
    config = load_config(None, [*REQUIRED, "train.mixed_precision=fp16"])
    adapted, notes = machine_settings(config)
    assert adapted.train.mixed_precision == "no" and config.train.mixed_precision == "fp16"
    assert len(notes) == 1 and "needs a CUDA GPU" in notes[0] and "train.mixed_precision=bf16 or no" in notes[0]
    assert machine_settings(load_config(None, [*REQUIRED, "train.mixed_precision=bf16"]))[1] == []

    assert main(["train", "training/configs/canny_sd15.toml", "--check"]) == 0  # fp16, as the tutorial
    captured = capsys.readouterr()
    assert 'mixed_precision = "fp16"' in captured.out
    assert captured.err.startswith("note: train.mixed_precision = 'fp16' needs a CUDA GPU")


def test_check_builds_the_preprocessor_with_its_parameter_values(capsys):
    code = main(["train", "training/configs/canny_sd15.toml", "data.preprocessor=canny",
                 "data.preprocessor_params={low_threshold = \"high\"}", "--check"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: preprocessor 'canny': ") and err.count("\n") == 1
