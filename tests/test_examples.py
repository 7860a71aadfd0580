"""Smoke tests of examples/: every script runs end to end (few steps, in this process as `python examples/X.py`
would run it; one --help in a fresh process) and writes the PNG it says, with the maps it should hold."""

from __future__ import annotations

import runpy
import subprocess
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


def test_there_is_one_example_per_condition_and_each_shows_its_lesson():
    """The lesson (preprocessor -> Control -> generate -> save) is in the script; only the plumbing is shared."""
    assert {path.stem for path in EXAMPLES.glob("*.py")} >= {*DEMO_CONDITIONS, "train_fill50k"}
    for condition in DEMO_CONDITIONS:
        source = (EXAMPLES / f"{condition}.py").read_text()
        for line in (f'checkpoint_preprocessor("{condition}", metadata, args.params)', "Control(", "generate(",
                     "examples.save_panels(", "from controlkit.demo import examples"):
            assert line in source, (condition, line)
        assert "controlkit.cli" not in source


def test_an_example_runs_as_a_script(tmp_path):
    """`python examples/canny.py --help` in a fresh process: importable as a user runs it, the standard flags."""
    result = subprocess.run([sys.executable, str(EXAMPLES / "canny.py"), "--help"], capture_output=True, text=True,
                            cwd=tmp_path, check=True)
    for flag in ("--base", "--controlnet", "--set KEY=VALUE", "--prompt", "--seed", "-o"):
        assert flag in result.stdout


@pytest.mark.parametrize("condition", DEMO_CONDITIONS)
def test_each_example_runs_on_the_demo_models(condition, tmp_path, capsys):
    output = tmp_path / f"{condition}.png"
    assert run_script(f"{condition}.py", "--steps", "2", "-o", str(output)) == 0
    panels = load_image(output)
    assert panels.shape == (64, 3 * 64 + 2 * 4, 3)  # input | condition map | generated
    condition_map, generated = panels[:, 68:132], panels[:, 136:]
    assert condition_map.std() > 0 and generated.std() > 0
    assert str(output) in capsys.readouterr().out
    # The default input: held-out toy render 3, with the toy world's exact map, else its preprocessor's.
    from controlkit.demo.models import load_demo_controlnet
    from controlkit.demo.showcase import exact_map, held_out_render
    from preprocessors.registry import checkpoint_preprocessor

    render = held_out_render(condition, 3)
    np.testing.assert_array_equal(panels[:, :64], render.image)
    expected = exact_map(condition, render)
    if expected is None:
        expected = np.asarray(checkpoint_preprocessor(condition, load_demo_controlnet(condition)[1])(render.image))
    np.testing.assert_array_equal(condition_map, expected)


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


def test_a_photo_goes_through_the_real_pose_preprocessor_with_the_demo_models(tmp_path, capsys):
    """A user's photo (an upper body, no legs) is annotated by the pose preprocessor the ControlNet names, on the
    photo resized to the demo's 64 x 64, never by the toy-world estimator (which draws a whole body anyway)."""
    from PIL import Image

    from controlkit.demo.models import load_demo_controlnet
    from controlkit.demo.photos import sample_photo
    from controlkit.demo.showcase import condition_annotator
    from controlkit.image import resize_to
    from preprocessors.registry import checkpoint_preprocessor, get_preprocessor

    photo = sample_photo("astronaut")
    Image.fromarray(photo).save(tmp_path / "astronaut.png")
    output = tmp_path / "pose.png"
    assert run_script("pose.py", str(tmp_path / "astronaut.png"), "--steps", "1", "-o", str(output)) == 0
    assert "512x512 image resized to 64x64" in capsys.readouterr().out
    condition_map = load_image(output)[:, 68:132]
    small = resize_to(photo, (64, 64))
    expected = np.asarray(get_preprocessor("pose")(small))
    assert (expected.max(axis=2) > 0).sum() > 20  # the preprocessor found the astronaut
    np.testing.assert_array_equal(condition_map, expected)
    _, metadata = load_demo_controlnet("pose")
    np.testing.assert_array_equal(expected, np.asarray(checkpoint_preprocessor("pose", metadata)(small)))
    assert not np.array_equal(condition_map, condition_annotator("pose", metadata)(small))  # not the estimator's


def test_example_errors_are_one_line(tmp_path, capsys):
    assert run_script("depth.py", "--base", str(base_path()), "-o", str(tmp_path / "x.png")) == 1
    assert "--base and --controlnet go together" in capsys.readouterr().err
    assert run_script("canny.py", "--set", "thresholds=1", "--steps", "1", "-o", str(tmp_path / "x.png")) == 1
    error = capsys.readouterr().err
    assert "Unknown parameter(s) thresholds for preprocessor 'canny'" in error and len(error.splitlines()) == 1


def test_an_output_that_cannot_be_written_is_found_before_the_models_load(tmp_path, capsys):
    assert run_script("canny.py", "-o", str(tmp_path / "x.jpg")) == 1
    assert capsys.readouterr().err.strip().endswith("x.jpg: the output must be a .png path")
    (tmp_path / "afile").write_text("x")
    assert run_script("canny.py", "-o", str(tmp_path / "afile" / "x.png")) == 1
    error = capsys.readouterr().err
    assert "afile: is a file, not a folder" in error and len(error.splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile"]  # nothing written, nothing half-written


def test_the_training_example_trains_on_circles_and_on_a_folder(tmp_path, capsys):
    from PIL import Image

    from controlkit.demo.toyworld.world import render_circles, render_scene

    output = tmp_path / "fill50k"
    assert run_script("train_fill50k.py", "--circles", "16", "--steps", "3", "--batch-size", "4", "--held-out", "2",
                      "-o", str(output)) == 0
    assert (output / "controlnet" / "config.json").is_file()
    grid = load_image(output / "check.png")
    assert grid.shape == (2 * 64, 4 * 64, 3)  # per held-out pair: condition | with control | control off | target
    for row in range(2):  # held-out circles: render seed 1 (training uses seed 0)
        circle = render_circles((1, row))
        cells = grid[64 * row: 64 * (row + 1)]
        np.testing.assert_array_equal(cells[:, :64], circle.outline)
        np.testing.assert_array_equal(cells[:, 192:], circle.image)
    out = capsys.readouterr().out
    assert "held-out controllability, edge_f1 (higher is better) on 2 pairs:" in out and "with control off" in out

    folder = tmp_path / "mine"  # a user's folder: images with captions, maps computed by a preprocessor
    (folder / "images").mkdir(parents=True)
    for index in range(8):
        scene = render_scene(index)
        Image.fromarray(scene.image).save(folder / "images" / f"{index}.png")
        (folder / "images" / f"{index}.txt").write_text(scene.caption)
    assert run_script("train_fill50k.py", "--folder", str(folder), "--preprocessor", "canny", "--steps", "2",
                      "--batch-size", "4", "--held-out", "2", "-o", str(tmp_path / "custom")) == 0
    assert (tmp_path / "custom" / "controlnet" / "config.json").is_file()
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "edge_f1 (higher is better) on 2 pairs" in out
    assert load_image(tmp_path / "custom" / "check.png").shape == (2 * 64, 4 * 64, 3)
