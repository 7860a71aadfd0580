"""Smoke tests of examples/: every script runs end to end (few steps) and writes its output."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from controlkit.demo.models import DEMO_CONDITIONS, base_path, controlnet_path
from controlkit.image import load_image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_script(name: str, *argv: str) -> int:
    """Run examples/NAME as `python examples/NAME ARGV...` in this process; its exit status."""
    saved = sys.argv
    sys.argv = [str(EXAMPLES / name), *argv]
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = saved
    return 0


def test_there_is_one_example_per_condition_and_they_share_the_library_code():
    assert {path.stem for path in EXAMPLES.glob("*.py")} >= {*DEMO_CONDITIONS, "train_fill50k"}
    for condition in DEMO_CONDITIONS:
        source = (EXAMPLES / f"{condition}.py").read_text()
        assert f'run_example("{condition}", sys.argv[1:])' in source and len(source.splitlines()) < 20


@pytest.mark.parametrize("condition", DEMO_CONDITIONS)
def test_each_example_runs_on_the_demo_models(condition, tmp_path, capsys):
    output = tmp_path / f"{condition}.png"
    assert run_script(f"{condition}.py", "--steps", "2", "-o", str(output)) == 0
    panels = load_image(output)
    assert panels.shape == (64, 3 * 64 + 2 * 4, 3)  # input | condition map | generated
    condition_map, generated = panels[:, 68:132], panels[:, 136:]
    assert condition_map.std() > 0 and generated.std() > 0
    assert str(output) in capsys.readouterr().out


def test_an_example_takes_an_image_and_explicit_checkpoints(tmp_path):
    """--base/--controlnet: the real-checkpoint path (here pointed at the demo folders), own preprocessor params."""
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(photo)
    output = tmp_path / "canny.png"
    status = run_script("canny.py", str(photo), "--base", str(base_path()), "--controlnet",
                        str(controlnet_path("canny")), "--set", "low_threshold=20", "--steps", "1", "-o", str(output))
    assert status == 0
    assert load_image(output).shape == (48, 3 * 80 + 2 * 4, 3)  # the input's size, sides multiples of 8


def test_example_errors_are_one_line(tmp_path, capsys):
    assert run_script("depth.py", "--base", str(base_path()), "-o", str(tmp_path / "x.png")) == 1
    assert "--base and --controlnet go together" in capsys.readouterr().err


def test_the_training_example_trains_on_circles_and_on_a_folder(tmp_path, capsys):
    output = tmp_path / "fill50k"
    assert run_script("train_fill50k.py", "--circles", "16", "--steps", "3", "--batch-size", "4", "-o",
                      str(output)) == 0
    assert (output / "controlnet" / "config.json").is_file()
    assert load_image(output / "check.png").shape == (64, 3 * 64, 3)

    folder = tmp_path / "mine"  # a user's folder: images with captions, maps computed by a preprocessor
    (folder / "images").mkdir(parents=True)
    from controlkit.demo.toyworld.world import render_scene

    for index in range(8):
        scene = render_scene(index)
        from PIL import Image

        Image.fromarray(scene.image).save(folder / "images" / f"{index}.png")
        (folder / "images" / f"{index}.txt").write_text(scene.caption)
    assert run_script("train_fill50k.py", "--folder", str(folder), "--preprocessor", "canny", "--steps", "2",
                      "--batch-size", "4", "-o", str(tmp_path / "custom")) == 0
    assert (tmp_path / "custom" / "controlnet" / "config.json").is_file()
    assert "trained 2 steps" in capsys.readouterr().out
