"""Write toy-world samples as a paired dataset folder that `training.data.dataset` reads.

Layout of `directory` (sample i is rendered from the seed (seed, i), so it never depends on `n`)::

    dataset.json            the settings (kind, condition, size, seed); a folder holds one setting only
    manifest.jsonl          one line per sample: {"image", "condition", "prompt", "truth"} plus "objects"
                            (scenes and figures) and "keypoints" (figures); paths relative to the folder
    images/000000.png       the target image (RGB)
    conditions/000000.png   the condition map (depth, normal, pose, outline; absent for "image" and "none")
    truth/000000.npz        ground truth for evaluation: depth (H, W) float32 metres, normals (H, W, 3) float32
                            camera space, masks (H, W) uint8, focal () pixels; figures add keypoints (18, 3);
                            circles hold mask (H, W) bool, centre (2,) and radius () in pixels
    keypoints/000000.json   figures only: the pose as OpenPose JSON (missing points are 0, 0, 0)

Writing is resumable and idempotent: every file is written atomically and a manifest line is appended only once
its files exist, so an interrupted run continues where it stopped, and running again with the same settings
(or a larger `n`) reuses what is there.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from controlkit.demo.toyworld.world import (
    CircleSample,
    ToyScene,
    check_size,
    depth_map,
    normal_map,
    pose_json,
    pose_map,
    render_circles,
    render_figure,
    render_scene,
)
from controlkit.errors import ConfigError
from controlkit.files import atomic_path, write_bytes_atomic

#: The conditions each kind of sample can be written with. "image": the condition is the target image itself;
#: "none": no condition file (the trainer computes one with a preprocessor, e.g. canny).
CONDITIONS = {
    "scene": ("depth", "normal", "image", "none"),
    "figure": ("pose", "depth", "normal", "image", "none"),
    "figure_anywhere": ("pose", "depth", "normal", "image", "none"),
    "circles": ("outline", "image", "none"),
}
_RENDERERS = {"scene": render_scene, "figure": render_figure, "circles": render_circles,
              "figure_anywhere": partial(render_figure, anywhere=True)}
MANIFEST, SETTINGS = "manifest.jsonl", "dataset.json"


def write_dataset(
    directory: str | os.PathLike,
    n: int,
    *,
    kind: str = "scene",
    condition: str = "none",
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Render `n` toy-world samples into `directory` and return the path of its manifest.jsonl.

    Args:
        directory: the dataset folder (created if missing).
        n: number of samples (the manifest lists samples 0..n-1).
        kind: "scene", "figure", "figure_anywhere" (`render_figure(..., anywhere=True)`) or "circles" (see
            `controlkit.demo.toyworld.world`).
        condition: the condition map to write; allowed per kind in `CONDITIONS`.
        size: side of the square images in pixels (a multiple of 8).
        seed: dataset seed; sample i uses the seed (seed, i).

    Raises:
        ConfigError: an unknown kind or condition, a bad `n` or `size`, or a folder written with other settings.

    Example:
        >>> manifest = write_dataset("data/toy_depth", 1000, kind="scene", condition="depth")
    """
    settings = _check_settings(kind, condition, size, seed, n)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    _claim(root, settings)
    records = _completed(root, n)
    partial = root / (MANIFEST + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        for index in range(len(records), n):
            sample = _RENDERERS[kind]((seed, index), size=size)
            record = _write_sample(root, _stem(index), sample, condition)
            handle.write(json.dumps(record) + "\n")
            handle.flush()
    os.replace(partial, root / MANIFEST)
    return root / MANIFEST


def _check_settings(kind: str, condition: str, size: int, seed: int, n: int) -> dict[str, Any]:
    if kind not in CONDITIONS:
        raise ConfigError(f"`kind` must be one of {', '.join(CONDITIONS)} (got {kind!r})")
    if condition not in CONDITIONS[kind]:
        allowed = ", ".join(CONDITIONS[kind])
        raise ConfigError(f"`condition` for kind {kind!r} must be one of {allowed} (got {condition!r})")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"`n` must be a whole number of samples, 0 or more (got {n!r})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"`seed` must be an integer, 0 or more (got {seed!r})")
    return {"kind": kind, "condition": condition, "size": check_size(size), "seed": seed}


def _claim(root: Path, settings: dict[str, Any]) -> None:
    """Record the settings in a new folder, or check that an existing one was written with the same ones."""
    path = root / SETTINGS
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            existing = None
        if existing != settings:
            raise ConfigError(
                f"{root}: holds a toy dataset written with other settings ({existing}); "
                f"write {settings} to another folder, or delete this one"
            )
        return
    if root.is_dir() and any(root.iterdir()):
        raise ConfigError(f"{root}: is not empty and is not a toy dataset; write to a new or empty folder")
    path.write_text(json.dumps(settings), encoding="utf-8")


def _stem(index: int) -> str:
    """File name of sample `index`: zero-padded to 6 digits, so names sort and never depend on `n`."""
    return f"{index:06d}"


def _completed(root: Path, n: int) -> list[dict[str, Any]]:
    """The leading manifest records (up to n) of earlier runs whose files all exist, in sample order."""
    source = root / MANIFEST
    if not source.is_file():
        source = root / (MANIFEST + ".partial")
    if not source.is_file():
        return []
    records: list[dict[str, Any]] = []
    for line in source.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by an interruption: the sample is written again
        paths = [record.get(key) for key in ("image", "condition", "truth", "keypoints") if record.get(key)]
        expected = f"images/{_stem(len(records))}.png"
        if len(records) == n or record.get("image") != expected or not all((root / p).is_file() for p in paths):
            break
        records.append(record)
    return records


def condition_map(sample: ToyScene | CircleSample, condition: str) -> np.ndarray:
    """The condition map of a sample, uint8 (H, W, 3): "depth", "normal", "pose" (drawn with the OpenPose
    colours) or "outline" (circles)."""
    if condition == "outline" and isinstance(sample, CircleSample):
        return sample.outline
    if condition == "depth" and isinstance(sample, ToyScene):
        return depth_map(sample.depth)
    if condition == "normal" and isinstance(sample, ToyScene):
        return normal_map(sample.normals)
    if condition == "pose" and isinstance(sample, ToyScene) and sample.keypoints is not None:
        return pose_map(sample)
    raise ConfigError(f"condition {condition!r} does not apply to this {type(sample).__name__}")


def _write_sample(root: Path, stem: str, sample: ToyScene | CircleSample, condition: str) -> dict[str, Any]:
    """Write one sample's files; returns its manifest record."""
    record: dict[str, Any] = {"image": f"images/{stem}.png"}
    _write_png(root / record["image"], sample.image)
    if condition == "image":
        record["condition"] = record["image"]
    elif condition != "none":
        record["condition"] = f"conditions/{stem}.png"
        _write_png(root / record["condition"], condition_map(sample, condition))
    record["prompt"] = sample.caption
    record["truth"] = f"truth/{stem}.npz"
    if isinstance(sample, CircleSample):
        truth = {"mask": sample.mask, "centre": np.array(sample.centre), "radius": np.array(sample.radius)}
    else:
        truth = {"depth": sample.depth, "normals": sample.normals, "masks": sample.masks.astype(np.uint8),
                 "focal": np.array(sample.focal)}  # fmt: skip
        if sample.keypoints is not None:
            truth["keypoints"] = sample.keypoints
            record["keypoints"] = f"keypoints/{stem}.json"
            write_bytes_atomic(root / record["keypoints"], json.dumps(pose_json(sample)).encode())
    with atomic_path(root / record["truth"]) as temporary:
        np.savez_compressed(temporary, **truth)
    if isinstance(sample, ToyScene):
        record["objects"] = [asdict(thing) for thing in sample.objects]
    return record


def _write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    write_bytes_atomic(path, encoded.tobytes())


