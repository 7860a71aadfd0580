"""The training config: TOML + overrides, every problem reported at once with its key, shipped configs valid."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from controlkit.cli import main
from controlkit.errors import ConfigError
from training.config import SCHEDULES, SECTIONS, TrainConfig, load_config, to_toml
from training.engine.checkpoints import config_drift

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.toml"))
REQUIRED = ["model.base=models/sd15", "model.condition=canny", "data.source=pairs.jsonl"]


def test_unknown_keys_get_a_close_match(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[optim]\nlearning_rat = 1e-5\n[modle]\nbase = "x"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, [*REQUIRED, "data.resoluton=256", "learning_rate=1e-4"])
    message = str(error.value)
    assert message.startswith(f"{path}: 4 problems: ")
    assert "unknown key `optim.learning_rat` (did you mean `optim.learning_rate`?)" in message
    assert "unknown section `modle` (did you mean `model`?)" in message
    assert "unknown key `data.resoluton` (did you mean `data.resolution`?)" in message
    assert "unknown key `learning_rate` (did you mean `optim.learning_rate`?)" in message
    assert "\n" not in message


def test_bad_values_and_types_name_the_key_and_the_value():
    with pytest.raises(ConfigError) as error:
        load_config(None, [*REQUIRED, "data.resolution=500", "train.batch_size=four", "train.mixed_precision=fp8",
                           "model.unlock_decoder=yes", "schedule.name=cosine_restarts",
                           "data.randomize={low_threshold=[150, 50]}"])
    message = str(error.value)
    assert "`data.resolution` must be a positive multiple of 8 (got 500)" in message
    assert "`train.batch_size` must be an integer (got 'four')" in message
    assert "`train.mixed_precision` must be 'no', 'fp16' or 'bf16' (got 'fp8')" in message
    assert "`model.unlock_decoder` must be true or false (got 'yes')" in message
    assert "`schedule.name` must be one of constant," in message and "(got 'cosine_restarts')" in message
    assert "`data.randomize` must map parameters to [low, high] with low <= high" in message
    assert message.startswith("config: 7 problems")  # randomize without a preprocessor is the 7th


def test_required_keys_and_mode_specific_keys():
    with pytest.raises(ConfigError, match=r"`model.base` must name the base model .*`data.source` must name"):
        load_config(None, ["model.condition=canny"])
    with pytest.raises(ConfigError, match=r"`model.unlock_decoder` applies to model.kind = 'controlnet' only"):
        load_config(None, [*REQUIRED, "model.kind=base", "model.unlock_decoder=true"])
    with pytest.raises(ConfigError, match=r"`data.preprocessor` must be a registry preprocessor .*\(got 'cany'\)"):
        load_config(None, [*REQUIRED, "data.preprocessor=cany"])


def test_overrides_are_toml_values_or_plain_strings(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[optim]\nlearning_rate = 1e-5\n[data]\nresolution = 512\n')
    config = load_config(path, [*REQUIRED, "optim.learning_rate=2e-6", "data.resolution=256", "ema.enabled=true",
                                "data.preprocessor=canny", "data.randomize={low_threshold = [50, 150]}",
                                "train.max_grad_norm=2", f"train.output_dir={tmp_path / 'out dir'}"])
    assert config.optim.learning_rate == 2e-6 and config.data.resolution == 256 and config.ema.enabled is True
    assert config.data.randomize == {"low_threshold": [50, 150]}
    assert config.train.max_grad_norm == 2.0 and isinstance(config.train.max_grad_norm, float)
    assert config.train.output_dir == str(tmp_path / "out dir")


def test_defaults_live_in_the_dataclasses_and_every_key_is_documented(tmp_path):
    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            assert field.metadata.get("doc"), f"{section}.{field.name} has no documentation"
    config = load_config(None, REQUIRED)
    written = tmp_path / "resolved.toml"
    written.write_text(to_toml(config, with_docs=True))
    assert load_config(written) == config
    with pytest.raises(ConfigError):
        TrainConfig()  # the bare defaults lack the base model and the data


def test_schedules_offered_are_diffusers_schedules():
    from diffusers.optimization import SchedulerType

    assert set(SCHEDULES) <= {member.value for member in SchedulerType}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_every_shipped_config_validates(path):
    from preprocessors.registry import get_spec

    config = load_config(path)
    data = config.data
    if data.preprocessor:
        valid = get_spec(data.preprocessor).parameters()
        assert set(data.preprocessor_params) | set(data.randomize) <= set(valid)
    if path.name.endswith("_sd15.toml"):  # the naming rule: <condition>_sd15 -> controlkit_<condition>_sd15
        assert path.name == f"{config.model.condition}_sd15.toml"
        assert Path(config.train.output_dir).name == f"controlkit_{config.model.condition}_sd15"


def test_a_config_ships_for_every_condition():
    names = {path.name for path in SHIPPED}
    for condition in ("canny", "lineart", "softedge", "pose", "depth", "normal"):
        assert f"{condition}_sd15.toml" in names
    assert "base_toy.toml" in names


def test_cli_checks_a_config_without_training(capsys):
    assert main(["train", str(CONFIGS / "canny_sd15.toml"), "optim.learning_rate=2e-6", "--check"]) == 0
    out = capsys.readouterr().out
    assert "learning_rate = 2e-06" in out and "# peak learning rate" in out
    assert main(["train", str(CONFIGS / "canny_sd15.toml"), "optim.lr=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown key `optim.lr`" in err and err.count("\n") == 1


def test_resume_drift_ignores_bookkeeping_keys():
    saved = load_config(None, [*REQUIRED, "schedule.name=cosine"]).flat()
    bookkeeping = load_config(None, [*REQUIRED, "schedule.name=cosine", "checkpoint.every_steps=10",
                                     "logging.every_steps=5", "validation.every_steps=100", "data.num_workers=4"])
    assert config_drift(saved, bookkeeping.flat()) == []
    longer = load_config(None, [*REQUIRED, "schedule.name=cosine", "train.max_steps=2000"]).flat()
    assert config_drift(saved, longer) == ["train.max_steps: 1000 -> 2000"]  # the cosine's length changes
    constant = load_config(None, REQUIRED).flat()
    assert config_drift(constant, load_config(None, [*REQUIRED, "train.max_steps=2000"]).flat()) == []
