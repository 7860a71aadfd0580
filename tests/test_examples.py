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
#: The examples of the scribble, tile, shuffle, inpaint and mlsd conditions (mlsd: no demo ControlNet).
NEW_EXAMPLES = ("scribble", "tile", "shuffle", "inpaint", "mlsd")


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
    assert {path.stem for path in EXAMPLES.glob("*.py")} >= {*DEMO_CONDITIONS, "mlsd", "train_fill50k"}
    for condition in (*DEMO_CONDITIONS, "mlsd"):
        source = (EXAMPLES / f"{condition}.py").read_text()
        for line in (f'checkpoint_preprocessor("{condition}", metadata, ', "args.params", "Control(", "generate(",
                     "examples.save_panels(", "from controlkit.demo import examples"):
            assert line in source, (condition, line)
        assert "controlkit.cli" not in source


def test_an_example_runs_as_a_script(tmp_path):
    """`python examples/canny.py --help` in a fresh process: importable as a user runs it, the standard flags."""
    result = subprocess.run([sys.executable, str(EXAMPLES / "canny.py"), "--help"], capture_output=True, text=True,
                            cwd=tmp_path, check=True)
    for flag in ("--base", "--controlnet", "--set KEY=VALUE", "--prompt", "--seed", "-o"):
        assert flag in result.stdout


@pytest.mark.parametrize("name", NEW_EXAMPLES)
def test_each_new_example_has_help(name, capsys):
    assert run_script(f"{name}.py", "--help") == 0
    out = capsys.readouterr().out
    for flag in ("--base", "--controlnet", "--set KEY=VALUE", "--prompt", "--seed", "-o",
                 f"python examples/{name}.py"):  # and its usage lines
        assert flag in out, (name, flag)
    assert ("--mask MASK" in out) == (name == "inpaint")


def expected_map(condition: str, render) -> np.ndarray:
    """The condition panel an example shows for the toy render with the demo models and no --set."""
    from controlkit.demo.models import load_demo_controlnet
    from controlkit.demo.showcase import exact_map
    from controlkit.masks import random_mask
    from preprocessors.registry import checkpoint_preprocessor

    drawn = exact_map(condition, render)
    if drawn is not None:
        return drawn
    metadata = load_demo_controlnet(condition)[1]
    if condition == "tile":  # 4x downsampled, as the demo shows tile
        return np.asarray(checkpoint_preprocessor("tile", metadata, {"down_sampling_rate": 4.0})(render.image))
    if condition == "inpaint":  # the random mask of --seed 0, shown black
        masked = random_mask((64, 64), 0)
        rgba = np.asarray(checkpoint_preprocessor("inpaint", metadata)(render.image, mask=masked))
        assert rgba.shape == (64, 64, 4) and np.array_equal(rgba[..., 3] == 0, masked)
        return np.where(masked[..., None], 0, rgba[..., :3]).astype(np.uint8)
    return np.asarray(checkpoint_preprocessor(condition, metadata)(render.image))


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
    from controlkit.demo.showcase import held_out_render
    from controlkit.masks import random_mask

    render = held_out_render(condition, 3)
    np.testing.assert_array_equal(panels[:, :64], render.image)
    np.testing.assert_array_equal(condition_map, expected_map(condition, render))
    if condition == "tile":  # the condition is a blurred copy, not the image (the metadata's rate 1 would be)
        assert np.abs(condition_map.astype(int) - render.image).mean() > 2
    if condition == "inpaint":  # the image's own pixels outside the mask, new ones inside
        kept = ~random_mask((64, 64), 0)
        np.testing.assert_array_equal(generated[kept], render.image[kept])
        assert not np.array_equal(generated[~kept], render.image[~kept])


def test_the_inpaint_example_takes_a_mask_file(tmp_path, capsys):
    """--mask: white = repaint, any size (resized to the image's); an all-black mask is a one-line error."""
    from PIL import Image

    from controlkit.demo.showcase import held_out_render

    grey = np.zeros((128, 128), np.uint8)
    grey[32:96, 16:80] = 255  # at 64 x 64: rows 16..47, columns 8..39
    Image.fromarray(grey).save(tmp_path / "mask.png")
    output = tmp_path / "inpaint.png"
    assert run_script("inpaint.py", "--mask", str(tmp_path / "mask.png"), "--steps", "2", "-o", str(output)) == 0
    panels = load_image(output)
    image, shown, generated = panels[:, :64], panels[:, 68:132], panels[:, 136:]
    repaint = np.zeros((64, 64), bool)
    repaint[16:48, 8:40] = True
    np.testing.assert_array_equal(image, held_out_render("inpaint", 3).image)
    assert (shown[repaint] == 0).all()
    np.testing.assert_array_equal(shown[~repaint], image[~repaint])
    np.testing.assert_array_equal(generated[~repaint], image[~repaint])
    assert not np.array_equal(generated[repaint], image[repaint])
    capsys.readouterr()

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "black.png")
    assert run_script("inpaint.py", "--mask", str(tmp_path / "black.png"), "-o", str(tmp_path / "x.png")) == 1
    error = capsys.readouterr().err
    assert "--mask is black everywhere" in error and len(error.splitlines()) == 1


def test_set_reaches_the_tile_shuffle_and_scribble_preprocessors(tmp_path):
    """--set over the example's defaults: another tile rate, another shuffle seed, and a hand-drawn scribble
    (dark strokes on white) through method=xdog, which makes it the white-on-black map."""
    import cv2
    from PIL import Image

    from controlkit.demo.models import load_demo_controlnet
    from controlkit.demo.showcase import held_out_render
    from preprocessors.registry import checkpoint_preprocessor

    image = held_out_render("tile", 3).image
    for name, setting, params in (("tile", "down_sampling_rate=2", {"down_sampling_rate": 2.0}),
                                  ("shuffle", "seed=5", {"seed": 5})):
        output = tmp_path / f"{name}.png"
        assert run_script(f"{name}.py", "--set", setting, "--steps", "1", "-o", str(output)) == 0
        expected = checkpoint_preprocessor(name, load_demo_controlnet(name)[1], params)(image)
        np.testing.assert_array_equal(load_image(output)[:, 68:132], np.asarray(expected))

    drawing = np.full((64, 64, 3), 255, np.uint8)
    cv2.line(drawing, (8, 50), (56, 12), (0, 0, 0), 2)
    cv2.circle(drawing, (20, 20), 10, (0, 0, 0), 2)
    Image.fromarray(drawing).save(tmp_path / "drawing.png")
    output = tmp_path / "scribble.png"
    assert run_script("scribble.py", str(tmp_path / "drawing.png"), "--set", "method=xdog", "--steps", "1",
                      "-o", str(output)) == 0
    scribble = load_image(output)[:, 68:132]
    xdog = checkpoint_preprocessor("scribble", load_demo_controlnet("scribble")[1], {"method": "xdog"})
    np.testing.assert_array_equal(scribble, np.asarray(xdog(drawing)))  # at the metadata's detect resolution
    strokes = drawing[..., 0] == 0
    assert (scribble[strokes] == 255).mean() > 0.9 and (scribble[~strokes] == 255).mean() < 0.1


def test_the_mlsd_example_annotates_without_a_controlnet_and_generates_with_one(tmp_path, capsys):
    """No demo MLSD ControlNet: input | line segments and a line saying what generating needs, exit 0. With
    --base/--controlnet (here the demo canny ControlNet relabelled as an MLSD one) it generates like the others."""
    import json

    from PIL import Image

    from controlkit.demo.showcase import held_out_render
    from preprocessors.registry import get_preprocessor

    render = held_out_render("mlsd", 3)
    output = tmp_path / "mlsd.png"
    assert run_script("mlsd.py", "-o", str(output)) == 0
    panels = load_image(output)
    assert panels.shape == (64, 2 * 64 + 4, 3)  # input | line segments
    np.testing.assert_array_equal(panels[:, :64], render.image)
    lines = np.asarray(get_preprocessor("mlsd", detect_resolution=None)(render.image))
    assert (lines == 255).sum() > 50  # the scene's straight edges, found at 64 px
    np.testing.assert_array_equal(panels[:, 68:], lines)
    out = capsys.readouterr().out.splitlines()
    assert str(output) in out[0] and len(out) == 2
    assert "needs --base and --controlnet" in out[1] and "control_v11p_sd15_mlsd" in out[1]

    relabelled = tmp_path / "mlsd-controlnet"
    relabelled.mkdir()
    config = json.loads((controlnet_path("canny") / "config.json").read_text())
    config["_controlkit"].update(condition="mlsd", preprocessor="mlsd", preprocessor_params={"detect_resolution": 64})
    (relabelled / "config.json").write_text(json.dumps(config))
    weights = "diffusion_pytorch_model.safetensors"
    (relabelled / weights).symlink_to(controlnet_path("canny") / weights)
    Image.fromarray(render.image).save(tmp_path / "scene.png")
    output = tmp_path / "mlsd-generated.png"
    assert run_script("mlsd.py", str(tmp_path / "scene.png"), "--base", str(base_path()), "--controlnet",
                      str(relabelled), "--steps", "1", "-o", str(output)) == 0
    panels = load_image(output)
    assert panels.shape == (64, 3 * 64 + 2 * 4, 3)  # input | line segments | generated
    np.testing.assert_array_equal(panels[:, 68:132], lines)  # the metadata's parameters: detect at 64
    assert "generated" in capsys.readouterr().out


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
