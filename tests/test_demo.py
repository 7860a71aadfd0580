"""The embedded demo: shipped models (size, metadata, loading) and `controlkit demo` end to end, with each demo
ControlNet beating control off on its controllability metric by a wide margin."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from controlkit.cli import main
from controlkit.demo.models import (
    DEMO_CONDITIONS,
    DEMO_DIR,
    base_path,
    controlnet_path,
    load_demo_base,
    load_demo_controlnet,
)
from controlkit.errors import ConfigError


def test_the_shipped_models_fit_the_budget_and_say_what_they_expect():
    total = sum(path.stat().st_size for path in DEMO_DIR.rglob("*") if path.is_file())
    assert total <= 36 * 2**20, f"{total / 2**20:.1f} MiB"  # ten ControlNets of 2.5 MiB, the base, the estimator
    assert (base_path() / "tokenizer" / "tokenizer.json").is_file()
    for condition in DEMO_CONDITIONS:
        config = json.loads((controlnet_path(condition) / "config.json").read_text())
        assert config["_controlkit"]["condition"] == condition
        assert config["_controlkit"]["preprocessor"] == condition


def test_demo_models_load_in_float32_and_fit_each_other():
    from controlkit.controlnet import check_fits

    base = load_demo_base()
    assert base.unet.dtype == base.vae.dtype == base.text_encoder.dtype == __import__("torch").float32
    assert base.vae_scale_factor == 4 and base.unet.config.sample_size == 16
    controlnet, metadata = load_demo_controlnet("canny", unet=base.unet)
    check_fits(controlnet.state_dict(), controlnet.config, base.unet)
    assert metadata.condition == "canny" and controlnet.dtype == base.unet.dtype
    with pytest.raises(ConfigError, match="no demo ControlNet for 'mlsd'"):
        load_demo_controlnet("mlsd")


def test_demo_usage_errors_are_one_line(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path), "--conditions", "canny,mlsd"]) == 2
    error = capsys.readouterr().err
    assert "--conditions 'canny,mlsd': choose from canny, lineart" in error and len(error.splitlines()) == 1
    assert main(["demo", "-o", str(tmp_path), "--count", "0"]) == 2
    assert "--count must be at least 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written before the arguments were checked


#: Held-out toy scenes per condition in the test run of `controlkit demo`.
COUNT = 6
#: Measured with `controlkit demo --count 6` on the shipped models (2 CPU threads): (with control, control off).
MEASURED = {
    "canny": (0.673, 0.340),  # edge F1, higher is better
    "lineart": (0.687, 0.553),  # SSIM of line-art maps, higher is better
    "softedge": (0.548, 0.262),  # SSIM of HED maps, higher is better
    "pose": (0.119, 0.213),  # keypoint distance over the image diagonal, lower is better
    "depth": (23.9, 35.7),  # depth-map RMSE in grey levels, lower is better
    "normal": (18.5, 27.4),  # normal angle in degrees, lower is better
    "scribble": (0.819, 0.618),  # edge F1 of HED scribbles, higher is better
    "tile": (0.749, 0.396),  # SSIM of the image to the truth its 4x downsampled map came from, higher is better
    "shuffle": (0.844, 0.867),  # colour-histogram distance to the reference, lower is better
    "inpaint": (38.0, 51.8),  # RGB RMSE inside the mask against the truth, lower is better
}
#: The least improvement over control off that the test accepts, in the metric's units: about half the measured
#: gap, so that another CPU's rounding cannot fail it while a ControlNet that lost its control always does.
MARGINS = {"canny": 0.2, "lineart": 0.07, "softedge": 0.15, "pose": 0.05, "depth": 6.0, "normal": 4.5,
           "scribble": 0.1, "tile": 0.17, "shuffle": 0.01, "inpaint": 6.5}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output, printed = tmp_path_factory.mktemp("demo"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["demo", "-o", str(output), "--count", str(COUNT)])
    rows = json.loads((output / "controllability.json").read_text())
    return status, output, {row["condition"]: row for row in rows}, printed.getvalue()


def test_the_demo_annotates_generates_and_writes_its_sheet_and_table(demo_run):
    from controlkit.image import load_image

    status, output, rows, printed = demo_run
    assert status == 0 and list(rows) == list(DEMO_CONDITIONS)
    assert (output / "photo" / "astronaut_canny.png").is_file() and (output / "photo" / "astronaut_pose.png").is_file()
    sheet = load_image(output / "contact_sheet.png")
    cell, gap, band = 128, 4, 96  # 64 x 64 cells enlarged twice, white gaps, the label band
    assert sheet.shape == (len(DEMO_CONDITIONS) * (cell + gap), band + COUNT * (4 * cell + gap), 3)
    for row in rows.values():
        assert row["images"] == COUNT and len(row["per_image_with_control"]) == COUNT
    assert "photo: astronaut 512x512" in printed
    assert "contact sheet (condition | with control | control off | ground truth)" in printed


def test_the_contact_sheet_shows_condition_with_control_control_off_and_ground_truth(tmp_path):
    """Geometry of the sheet, and each of its four cells per case is the image it names (enlarged twice)."""
    from controlkit.demo.showcase import SHEET_BAND, SHEET_GAP, ConditionRun, DemoCase, contact_sheet
    from controlkit.image import load_image
    from training.metrics import MetricResult

    rng = np.random.default_rng(0)

    def images(count: int) -> list[np.ndarray]:
        return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(count)]

    score = MetricResult("edge_f1", 0.5, True, [0.5])
    runs = []
    for condition, count in (("canny", 3), ("depth", 2)):  # the shorter row is padded with white
        cases = [DemoCase(truth, drawn, drawn, "") for truth, drawn in zip(images(count), images(count))]
        runs.append(ConditionRun(condition, cases, images(count), images(count), score, score, 0.0))
    sheet = load_image(contact_sheet(runs, tmp_path / "sheet.png", zoom=2))
    cell = 128
    assert sheet.shape == (2 * (cell + SHEET_GAP), SHEET_BAND + 3 * (4 * cell + SHEET_GAP), 3)
    for row, run in enumerate(runs):
        top = row * (cell + SHEET_GAP)
        for index, case in enumerate(run.cases):
            left = SHEET_BAND + index * (4 * cell + SHEET_GAP)
            shown = [case.condition_map, run.controlled[index], run.uncontrolled[index], case.truth]
            for column, image in enumerate(shown):
                found = sheet[top: top + cell, left + column * cell: left + (column + 1) * cell]
                np.testing.assert_array_equal(found, np.kron(image, np.ones((2, 2, 1), np.uint8)))
    assert (sheet[cell + SHEET_GAP:, SHEET_BAND + 2 * (4 * cell + SHEET_GAP):] == 255).all()  # depth's padding


@pytest.mark.parametrize("condition", DEMO_CONDITIONS)
def test_each_demo_controlnet_beats_control_off_by_a_wide_margin(demo_run, condition):
    row = demo_run[2][condition]
    gain = row["with_control"] - row["control_off"]
    if not row["higher_is_better"]:
        gain = -gain
    assert row["control_wins"] and gain >= MARGINS[condition], (row["metric"], row["with_control"], row["control_off"])


def test_inpaint_cases_keep_every_pixel_outside_the_mask_and_show_the_hole_black():
    from controlkit.demo.showcase import demo_cases, run_condition, shown_map

    base = load_demo_base()
    run = run_condition(base, "inpaint", 2, steps=4)
    assert run.with_control.extra["rmse_outside"] == 0.0 and run.without_control.extra["rmse_outside"] == 0.0
    for case, generated in zip(run.cases, run.controlled):
        masked = case.condition_map[..., 3] == 0
        assert masked.any() and (shown_map(case.condition_map)[masked] == 0).all()
        np.testing.assert_array_equal(generated[~masked], case.truth[~masked])
    assert len(demo_cases("tile", 1, metadata=load_demo_controlnet("tile")[1])) == 1  # drawn without `annotate`
