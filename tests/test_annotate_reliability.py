"""`controlkit annotate` when things go wrong: outputs that cannot be written, colliding names, an output folder
inside the input, stale temporaries, missing inputs, empty pose maps, parameters of the wrong type, and worker
processes killed (one on a file, or the main process itself)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


def _image(path: Path, size: tuple[int, int] = (24, 16), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _big(path: Path, seed: int = 0, side: int = 2048) -> Path:
    """A side x side PNG that line art takes about a second on at 2048 (3 s at 4096): stripes, which PNG encodes
    fast (unlike noise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stripes = ((np.arange(side) // (8 + seed)) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.broadcast_to(stripes[None, :, None], (side, side, 3)).copy()).save(path, compress_level=1)
    return path


def _annotate(*argv: str) -> int:
    return main(["annotate", *argv, "--quiet"])


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporaries and empty files: what a failed write must never leave."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and (p.name.startswith(".ck-") or not p.stat().st_size))


# ---- outputs -------------------------------------------------------------------------------------------------


def test_an_output_that_is_a_file_or_under_one_is_refused_before_any_work(tmp_path, capsys):
    photo = _image(tmp_path / "in" / "a.png")
    (tmp_path / "taken").write_text("a file")
    assert _annotate(str(photo), "-p", "canny", "-o", str(tmp_path / "taken")) == 1
    assert "taken: is a file, not a folder" in capsys.readouterr().err
    assert _annotate(str(photo), "-p", "canny", "-o", str(tmp_path / "taken" / "maps")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a part of the path is a file" in err and "Traceback" not in err


def test_a_map_that_cannot_be_written_stops_the_run_and_a_rerun_resumes(tmp_path, capsys):
    inputs = tmp_path / "in"
    _image(inputs / "a" / "x.png")
    _image(inputs / "b" / "y.png", seed=1)
    _image(inputs / "b" / "z.png", seed=2)
    out = tmp_path / "maps"
    out.mkdir()
    (out / "a").write_text("a file where the folder of a/x.png must go")
    assert _annotate(str(inputs), "-p", "canny", "-o", str(out)) == 1
    captured = capsys.readouterr()
    assert "failed: " in captured.err and "x.png: could not be written" in captured.err
    assert "stopped: a map could not be written, so 2 input(s) were not started" in captured.err
    assert "0 written, 0 already there (skipped), 1 failed, 2 not started" in captured.out
    assert "Traceback" not in captured.err and _leftovers(out) == []
    (out / "a").unlink()
    assert _annotate(str(inputs), "-p", "canny", "-o", str(out)) == 0
    assert "3 written, 0 already there" in capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a/x.png", "b/y.png", "b/z.png"]


def test_temporaries_of_a_killed_run_are_removed_at_the_start(tmp_path):
    photo = _image(tmp_path / "in" / "a.png")
    out = tmp_path / "maps"
    out.mkdir()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid belongs to no running process now
    stale = out / f".ck-a.{finished.pid}.tmp.png"
    stale.write_bytes(b"half a PNG")
    assert _annotate(str(photo), "-p", "canny", "-o", str(out)) == 0
    assert not stale.exists() and (out / "a.png").stat().st_size > 0


# ---- where maps go ---------------------------------------------------------------------------------------------


def test_same_named_files_of_two_folders_get_two_maps(tmp_path, capsys):
    first = _image(tmp_path / "shoot1" / "IMG_1.png", (24, 16), seed=1)
    second = _image(tmp_path / "shoot2" / "IMG_1.png", (32, 20), seed=2)
    out = tmp_path / "maps"
    assert _annotate(str(first), str(second), "-p", "canny", "-o", str(out)) == 0
    assert Image.open(out / "shoot1" / "IMG_1.png").size == (24, 16)
    assert Image.open(out / "shoot2" / "IMG_1.png").size == (32, 20)
    assert _annotate(str(tmp_path / "shoot1"), str(tmp_path / "shoot2"), "-p", "canny", "-o", str(out)) == 0
    assert "0 written, 2 already there" in capsys.readouterr().out  # the same layout for the two folders


def test_files_of_one_folder_stay_flat(tmp_path):
    a, b = _image(tmp_path / "in" / "a.png"), _image(tmp_path / "in" / "b.png", seed=1)
    assert _annotate(str(a), str(b), "-p", "canny", "-o", str(tmp_path / "maps")) == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["a.png", "b.png"]


def test_an_output_folder_inside_the_input_is_not_annotated_again(tmp_path, capsys):
    photos = tmp_path / "photos"
    _image(photos / "a.png")
    _image(photos / "sub" / "b.png", seed=1)
    out = photos / "maps"
    assert _annotate(str(photos), "-p", "canny", "-o", str(out)) == 0
    assert _annotate(str(photos), "-p", "canny", "-o", str(out)) == 0
    assert "0 written, 2 already there (skipped), 0 failed" in capsys.readouterr().out.splitlines()[-1]
    assert not (out / "maps").exists()


def test_linked_folders_are_followed_once_and_a_link_loop_ends(tmp_path, capsys):
    photos = tmp_path / "photos"
    _image(photos / "a.png")
    _image(tmp_path / "elsewhere" / "b.png", seed=1)
    (photos / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (photos / "loop").symlink_to(photos, target_is_directory=True)
    out = tmp_path / "maps"
    assert _annotate(str(photos), "-p", "canny", "-o", str(out)) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a.png", "linked/b.png"]


def test_maps_never_overwrite_an_input(tmp_path, capsys):
    photos = tmp_path / "photos"
    photo = _image(photos / "a.png")
    before = photo.read_bytes()
    assert _annotate(str(photos), "-p", "canny", "-o", str(photos)) == 1
    assert "the output folder is this input folder" in capsys.readouterr().err
    assert _annotate(str(photo), "-p", "canny", "-o", str(photos)) == 1
    assert "would overwrite this input" in capsys.readouterr().err
    assert photo.read_bytes() == before


# ---- bad inputs ----------------------------------------------------------------------------------------------------


def test_a_missing_input_among_several_is_reported_and_the_rest_written(tmp_path, capsys):
    photo = _image(tmp_path / "in" / "a.png")
    out = tmp_path / "maps"
    assert _annotate(str(photo), str(tmp_path / "in" / "typo.png"), "-p", "canny", "-o", str(out)) == 1
    captured = capsys.readouterr()
    assert "failed: " + str(tmp_path / "in" / "typo.png") + ": no such file or folder" in captured.err
    assert "1 written, 0 already there (skipped), 1 failed" in captured.out
    assert (out / "a.png").exists()


def test_a_corrupt_exif_block_with_workers_fails_that_file_only(tmp_path, capsys):
    from tests.test_image_fuzz import BAD_EXIF

    inputs = tmp_path / "in"
    for index in range(3):
        _image(inputs / f"good{index}.png", seed=index)
    Image.new("RGB", (8, 4)).save(inputs / "camera.jpg", exif=BAD_EXIF)
    out = tmp_path / "maps"
    assert _annotate(str(inputs), "-p", "canny", "-o", str(out), "--workers", "2") == 1
    captured = capsys.readouterr()
    assert "camera.jpg: truncated or corrupt image" in captured.err and "Traceback" not in captured.err
    assert "3 written, 0 already there (skipped), 1 failed" in captured.out


@pytest.mark.parametrize(
    "setting, message",
    [
        ("low_threshold=abc", "preprocessor 'canny': parameter `low_threshold` must be an integer, got 'abc'"),
        ("detect_resolution=5.5", "parameter `detect_resolution` must be an integer or none, got 5.5"),
        ("high_threshold=true", "parameter `high_threshold` must be an integer, got True"),
    ],
)
def test_parameters_of_the_wrong_type_are_usage_errors_naming_them(tmp_path, capsys, setting, message):
    photo = _image(tmp_path / "a.png")
    assert _annotate(str(photo), "-p", "canny", "--set", setting, "-o", str(tmp_path / "maps")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()


def test_a_boolean_parameter_takes_only_true_or_false(tmp_path, capsys):
    photo = _image(tmp_path / "a.png")
    assert _annotate(str(photo), "-p", "softedge", "--set", "safe=maybe", "-o", str(tmp_path / "maps")) == 2
    assert "preprocessor 'softedge': parameter `safe` must be true or false, got 'maybe'" in capsys.readouterr().err


def test_pose_maps_with_no_person_are_listed_per_file(tmp_path, capsys):
    from skimage import data

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(data.astronaut()[::2, ::2]).save(inputs / "astronaut.png")
    Image.new("RGB", (96, 64), (128, 128, 128)).save(inputs / "wall.png")
    out = tmp_path / "poses"
    assert _annotate(str(inputs), "-p", "pose", "-o", str(out)) == 0
    captured = capsys.readouterr()
    assert (f"pose: 2 written (1 with no person found (black map): {out / 'wall.png'}), 0 already there"
            in captured.out)
    assert "UserWarning" not in captured.err
    assert not np.asarray(Image.open(out / "wall.png")).any()


# ---- worker processes ------------------------------------------------------------------------------------------


def _state(pid: int) -> str | None:
    """The process state letter from /proc (R, S, Z, ...), None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _workers_of(parent: int) -> list[int]:
    """Live spawned multiprocessing workers whose parent is `parent` (the resource tracker excepted)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] not in "ZX" and b"spawn_main" in command:
            pids.append(int(entry.name))
    return pids


def _until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@linux_only
def test_a_worker_killed_on_a_file_is_reported_with_it_and_the_others_are_written(tmp_path, monkeypatch):
    from preprocessors.batch import annotate_paths

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per worker: the slow file stays slow enough to be killed on

    inputs = tmp_path / "in"
    fast = [_image(inputs / f"a{index}.png", (16, 16), seed=index) for index in range(4)]
    slow = _big(inputs / "z_slow.png", side=4096)  # last in order: handed out when the fast ones are done
    out = tmp_path / "maps"
    result = {}
    run = threading.Thread(target=lambda: result.update(report=annotate_paths(
        [inputs], "lineart", out, params={"detect_resolution": None}, workers=2)))
    run.start()
    try:
        # Once the fast maps exist and the idle worker has been let go, the one worker left is on z_slow.png.
        on_slow = _until(lambda: all((out / p.name).exists() for p in fast) and len(_workers_of(os.getpid())) == 1,
                         timeout=120)
        assert on_slow, "the workers did not reach the slow file"
        os.kill(_workers_of(os.getpid())[0], signal.SIGKILL)
    finally:
        run.join(120)
    report = result["report"]
    assert [source.name for source, _ in report.failed] == ["z_slow.png"]
    reason = report.failed[0][1]
    assert reason.startswith(f"{slow}: the worker process died while on it (killed by SIGKILL")
    assert sorted(p.name for p in report.written) == [p.name for p in fast]
    assert not (out / "z_slow.png").exists()


@linux_only
def test_workers_end_when_the_main_process_is_killed(tmp_path):
    inputs = tmp_path / "in"
    for index in range(4):
        _big(inputs / f"big{index}.png", seed=index)
    command = [sys.executable, "-m", "controlkit", "annotate", str(inputs), "-p", "lineart", "--set",
               "detect_resolution=none", "--workers", "2", "-o", str(tmp_path / "maps"), "--quiet"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    main_process = subprocess.Popen(command, cwd=ROOT, env=environment, stderr=subprocess.DEVNULL)
    try:
        assert _until(lambda: len(_workers_of(main_process.pid)) == 2, timeout=120), "workers did not start"
        workers = _workers_of(main_process.pid)
        main_process.kill()  # SIGKILL: no clean-up code of the main process runs
        main_process.wait(30)
        assert _until(lambda: all(_state(pid) in (None, "Z", "X") for pid in workers), timeout=5), (
            f"workers still running: {[pid for pid in workers if _state(pid) not in (None, 'Z', 'X')]}")
    finally:
        if main_process.poll() is None:
            main_process.kill()
