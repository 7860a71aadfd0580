"""The Ray engine of `annotate` and `dataset build`, on real local Ray clusters: the local engine's maps and
shards bitwise, its report, resume and bad-file lines; an actor killed mid-run retried with nothing lost or
doubled; `--address` joining a two-node cluster (ray.cluster_utils.Cluster); one line without Ray."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocessors.batch import annotate_paths

ray = pytest.importorskip("ray", reason="the Ray engine is an optional extra: pip install controlkit[ray]")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray with two CPUs (two actors) for the module; the two-node test replaces it at the end."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    Image.fromarray(data.astronaut()[:160, :128]).save(folder / "astronaut.png")
    Image.fromarray(data.coffee()[:96, :128]).save(folder / "coffee.jpg", quality=95)
    Image.fromarray(data.chelsea()[:80, :112]).save(folder / "sub" / "cat.png")
    Image.fromarray(data.rocket()[:100, :90]).save(folder / "sub" / "rocket.webp", lossless=True)
    (folder / "broken.jpg").write_bytes(b"<html>not found</html>")
    for name in ("astronaut", "coffee", "sub/cat", "sub/rocket", "broken"):
        (folder / f"{name}.txt").write_text(name.replace("sub/", "a "))
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def _lines(report, root: Path) -> tuple:
    """A report with the output folder taken out, to compare two runs into two folders."""
    def strip(path):
        return Path(path).relative_to(root).as_posix()

    return ([strip(path) for path in report.written], report.failed,
            [(strip(path), reason) for path, reason in report.empty], report.stopped)


@pytest.mark.parametrize(("name", "params"), [("canny", {"low_threshold": 60}), ("pose", {})])
def test_ray_maps_and_report_equal_the_local_engine(cluster, photos, tmp_path, name, params):
    local = annotate_paths([photos], name, tmp_path / "local", params=params, workers=2)
    on_ray = annotate_paths([photos], name, tmp_path / "ray", params=params, workers=2, engine="ray")
    assert _lines(on_ray, tmp_path / "ray") == _lines(local, tmp_path / "local")
    assert len(local.written) == 4 and [path for path, _ in on_ray.failed] == [photos / "broken.jpg"]
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")  # every map, byte for byte
    again = annotate_paths([photos], name, tmp_path / "ray", params=params, workers=2, engine="ray")
    assert not again.written and len(again.skipped) == 4  # the same skip rule: a re-run resumes


def test_dataset_build_on_ray_writes_the_local_pairs_and_shards(cluster, photos, tmp_path):
    from training.data.building import build_dataset
    from training.data.shard_writer import build_shards

    for engine in ("local", "ray"):
        built = build_dataset(photos, "canny", tmp_path / f"pairs-{engine}", workers=2, engine=engine)
        assert len(built.records) == 4 and not built.ok
        shards = build_shards(photos, "canny", tmp_path / f"shards-{engine}", shard_size=2, workers=2, engine=engine)
        assert shards.samples == 4 and [name for name, _ in shards.failed] == ["broken.jpg"]
    assert _files(tmp_path / "pairs-ray") == _files(tmp_path / "pairs-local")
    assert _files(tmp_path / "shards-ray") == _files(tmp_path / "shards-local")  # tar bytes and index alike


def _busy_actor():
    """A Ray actor process of this test's cluster that is running (annotating) now, or None."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if "MapWorker" in " ".join(child.cmdline()) and child.status() == psutil.STATUS_RUNNING:
                return child
        except psutil.Error:
            continue
    return None


def test_an_actor_killed_mid_run_is_retried_and_nothing_is_lost_or_doubled(cluster, tmp_path):
    from skimage import data

    folder, output = tmp_path / "many", tmp_path / "maps"
    folder.mkdir()
    base = np.tile(data.astronaut(), (2, 2, 1))[:768, :1024]
    for number in range(64):
        Image.fromarray(np.roll(base, 16 * number, axis=1)).save(folder / f"{number:02d}.jpg", quality=90)
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(report=annotate_paths([folder], "canny", output,
                                                                                workers=2, engine="ray")))
    worker.start()
    killed, maps_then = None, None
    deadline = time.monotonic() + 120
    while worker.is_alive() and killed is None and time.monotonic() < deadline:
        if any(output.glob("*.png")):
            actor = _busy_actor()
            if actor is not None:
                maps_then = len(list(output.glob("*.png")))
                actor.kill()  # SIGKILL, as the out-of-memory killer
                killed = actor.pid
        time.sleep(0.005)
    worker.join(300)
    assert killed is not None and maps_then < 64, "the run ended before an actor could be killed mid-run"
    report = done["report"]
    assert len(report.written) == len(set(report.written)) == 64 and not report.failed
    assert not [path for path in output.rglob("*") if path.name.startswith(".ck-")]  # no temporary left
    local = annotate_paths([folder], "canny", tmp_path / "local", workers=1)
    assert len(local.written) == 64 and _files(output) == _files(tmp_path / "local")


def _run_cli(*arguments: str, environment: dict | None = None, code: str | None = None):
    script = code or "import sys; from controlkit.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(environment or {}))
    return subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_without_ray_the_engine_is_one_line_with_the_install_command(photos, tmp_path):
    hide = "import sys; sys.modules['ray'] = None; from controlkit.cli import main; sys.exit(main(sys.argv[1:]))"
    result = _run_cli("annotate", str(photos), "-p", "canny", "-o", str(tmp_path / "maps"), "--engine", "ray",
                      "--quiet", code=hide)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("error: the Ray engine needs Ray Data: pip install "
                                                      "controlkit[ray] (or leave out --engine ray to use the local "
                                                      "engine)")
    usage = _run_cli("annotate", str(photos), "-p", "canny", "--address", "auto")
    assert usage.returncode == 2 and "--address and --gpus-per-worker need --engine ray" in usage.stderr


def test_address_joins_a_two_node_cluster(photos, tmp_path):
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the module's single-node Ray makes room for the two-node one
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        assert len(nodes.list_all_nodes()) == 2
        # two actors of one CPU each on nodes of one CPU each: one actor per node
        result = _run_cli("annotate", str(photos), "-p", "canny", "-o", str(tmp_path / "ray"), "--engine", "ray",
                          "--address", nodes.address, "--workers", "2", "--quiet")
        assert result.returncode == 1, result.stderr[-2000:]  # broken.jpg
        assert "failed: " in result.stderr and "broken.jpg" in result.stderr
        assert "canny: 4 written, 0 already there (skipped), 1 failed" in result.stdout
        annotate_paths([photos], "canny", tmp_path / "local")
        assert _files(tmp_path / "ray") == _files(tmp_path / "local")
        too_many = _run_cli("annotate", str(photos), "-p", "canny", "-o", str(tmp_path / "x"), "--engine", "ray",
                            "--address", nodes.address, "--workers", "3")
        assert too_many.returncode == 1 and "--workers 3: the Ray cluster has 2 CPUs" in too_many.stderr
    finally:
        nodes.shutdown()
