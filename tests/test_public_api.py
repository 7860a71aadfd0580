"""`import controlkit` is the front door: its public names are the library's own objects, found lazily."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import controlkit
from controlkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(controlkit.PUBLIC_API))
def test_each_public_name_is_the_object_of_its_module(name):
    module = importlib.import_module(controlkit.PUBLIC_API[name])
    assert getattr(controlkit, name) is getattr(module, name)
    assert name in dir(controlkit) and name in controlkit.__all__


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'load_pipeline'"):
        controlkit.load_pipeline  # noqa: B018


def test_importing_controlkit_imports_none_of_the_public_modules():
    code = ("import sys, controlkit; "
            f"print(sorted(set({sorted(set(controlkit.PUBLIC_API.values()))!r}) & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


def test_train_takes_a_config_path_with_overrides_and_checks_them_first(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[model]\nbase = "base"\ncondition = "canny"\n[data]\nsource = "pairs"\n[train]\nmax_steps = 2\n')
    with pytest.raises(ConfigError, match="optim.learning_rat"):
        controlkit.train(config, ["optim.learning_rat=1e-4"])
    from training.config import load_config

    with pytest.raises(ConfigError, match="`overrides` go with a config file path"):
        controlkit.train(load_config(config), ["train.max_steps=3"])
