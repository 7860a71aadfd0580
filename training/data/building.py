"""Building paired data from a folder of images: condition maps by a preprocessor, captions, a manifest.

    >>> from training.data.building import build_dataset
    >>> report = build_dataset("photos/", "canny", "pairs/", params={"low_threshold": 50}, caption_from="txt")
    >>> report.manifest, len(report.records), report.ok
    (PosixPath('pairs/manifest.jsonl'), 120, True)

The maps go to OUT/conditions/ with the images' relative layout (preprocessors.batch: resumable, in worker
processes); OUT/manifest.jsonl gets one record per image whose map exists, {"image", "condition", "prompt"}
with paths relative to OUT, which `training.data.dataset.load_pairs(OUT)` reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.errors import ConfigError

if TYPE_CHECKING:
    from preprocessors.batch import AnnotateReport

#: The manifest file written into the output folder.
MANIFEST = "manifest.jsonl"
#: Where captions come from: same-stem .txt files, or the file names themselves.
CAPTION_SOURCES = ("txt", "filename")


@dataclass(frozen=True)
class BuildReport:
    """What `build_dataset` did.

    Attributes:
        annotation: the maps written, skipped (already there) and failed (source, reason).
        manifest: the manifest written.
        records: its records, in the order of the images (sorted per folder); a failed image has none.
        uncaptioned: images whose caption is empty (their records are written with prompt "").
    """

    annotation: AnnotateReport
    manifest: Path
    records: list[dict[str, str]]
    uncaptioned: list[Path]

    @property
    def ok(self) -> bool:
        """Every image got its map (uncaptioned images are not failures: the check reports them)."""
        return self.annotation.ok


def build_dataset(
    images_dir: str | os.PathLike,
    preprocessor: str,
    output: str | os.PathLike,
    *,
    params: dict[str, Any] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    caption_from: str = "txt",
    progress: bool = False,
) -> BuildReport:
    """Annotate `images_dir` (searched recursively) into `output`/conditions and write `output`/manifest.jsonl.

    Args:
        images_dir: folder of images.
        preprocessor: registry name, e.g. "canny"; preprocessors with keypoints (pose) also write their
            OpenPose JSON next to each map.
        output: the dataset folder (created).
        params: keyword parameters of the preprocessor.
        workers: annotating processes.
        overwrite: recompute maps that already exist (default: keep them, so a re-run resumes).
        caption_from: "txt" (same-stem .txt files, stripped) or "filename" (underscores and dashes as spaces).
        progress: show a progress bar on stderr.

    Raises:
        ConfigError: `images_dir` is not a folder, or an unknown `caption_from`.
        ValueError: an unknown preprocessor or parameter (from the registry).
    """
    from preprocessors.batch import annotate_paths, plan_jobs, progress_bar
    from preprocessors.registry import get_spec

    images, output = Path(images_dir), Path(output)
    if not images.is_dir():
        raise ConfigError(f"images_dir must be a folder, got {images}")
    if caption_from not in CAPTION_SOURCES:
        raise ConfigError(f"caption_from must be one of {', '.join(CAPTION_SOURCES)}, got {caption_from!r}")
    conditions = output / "conditions"
    keypoints = hasattr(get_spec(preprocessor).load_class(), "keypoints")  # pose: keep the JSON too
    report = annotate_paths(
        [images], preprocessor, conditions, params=params, workers=workers, overwrite=overwrite,
        keypoints=keypoints, progress=progress_bar if progress else None,
    )
    failed = {Path(source) for source, _ in report.failed}
    records, uncaptioned = [], []
    for job in plan_jobs([images], conditions, keypoints=keypoints):
        if job.source in failed:
            continue
        prompt = caption(job.source, caption_from)
        if not prompt:
            uncaptioned.append(job.source)
        records.append({
            "image": Path(os.path.relpath(job.source, output)).as_posix(),
            "condition": job.output.relative_to(output).as_posix(),
            "prompt": prompt,
        })
    manifest = output / MANIFEST
    _write_manifest(manifest, records)
    return BuildReport(annotation=report, manifest=manifest, records=records, uncaptioned=uncaptioned)


def caption(image: Path, caption_from: str) -> str:
    """The caption of one image: its same-stem .txt file ("" when absent or not UTF-8), or its file name."""
    if caption_from == "filename":
        return " ".join(image.stem.replace("_", " ").replace("-", " ").split())
    try:
        return image.with_suffix(".txt").read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return ""


def _write_manifest(path: Path, records: list[dict[str, str]]) -> None:
    """All lines at once, through a temporary file renamed into place (never a half-written manifest)."""
    from controlkit.files import write_bytes_atomic

    write_bytes_atomic(path, "".join(json.dumps(record) + "\n" for record in records).encode("utf-8"))
