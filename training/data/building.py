"""Building paired data from a folder of images: condition maps by a preprocessor, captions, a manifest.

    >>> from training.data.building import build_dataset
    >>> report = build_dataset("photos/", "canny", "pairs/", params={"low_threshold": 50}, caption_from="txt")
    >>> report.manifest, len(report.records), report.ok
    (PosixPath('pairs/manifest.jsonl'), 120, True)

The maps go to OUT/conditions/ with the images' relative layout (preprocessors.batch: resumable, in worker
processes); OUT/manifest.jsonl gets one record per image whose map exists, {"image", "condition", "prompt"}
with paths relative to OUT, which `training.data.dataset.load_pairs(OUT)` reads. `engine="ray"` runs the
annotation as a Ray Data pipeline (preprocessors/ray_engine.py): the same maps. WebDataset shards instead of a
folder: training/data/shard_writer.py (`controlkit dataset build --format webdataset`).
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
        uncaptioned: images whose caption is empty (their records are written with prompt ""; `dataset check`
            reports them and training skips them until a re-run with their captions).
    """

    annotation: AnnotateReport
    manifest: Path
    records: list[dict[str, str]]
    uncaptioned: list[Path]

    @property
    def ok(self) -> bool:
        """Every image got its map (uncaptioned images are listed in `uncaptioned`, and `dataset check` reports
        them as bad pairs)."""
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
    engine: str = "local",
    address: str | None = None,
    gpus_per_worker: float = 0.0,
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
        engine, address, gpus_per_worker: where the maps are computed (`preprocessors.batch.annotate_paths`).

    The captions follow the rule `controlkit dataset check` and training apply: a pair without one is unusable.
    So a build in which no image has a caption is refused before any work; images without one are listed in
    `uncaptioned` (their records are written, so that adding the captions and re-running completes them).

    Raises:
        ConfigError: `images_dir` is not a folder, `output` lies inside it (its maps would be taken for images
            on the next run), an unknown `caption_from`, or no image has a caption.
        OutputError: `output` cannot be written (checked before any work).
        ValueError: an unknown preprocessor or parameter (from the registry).
    """
    from controlkit.files import check_output_folder
    from preprocessors.batch import annotate_paths, plan_jobs, progress_bar
    from preprocessors.registry import get_preprocessor

    images, output = Path(images_dir), Path(output)
    if not images.is_dir():
        raise ConfigError(f"images_dir must be a folder, got {images}")
    if caption_from not in CAPTION_SOURCES:
        raise ConfigError(f"caption_from must be one of {', '.join(CAPTION_SOURCES)}, got {caption_from!r}")
    if output.resolve().is_relative_to(images.resolve()):
        raise ConfigError(f"output {output} lies inside images_dir {images}: its maps would be read as images "
                          "the next time; choose a folder outside it")
    conditions = output / "conditions"
    # Built once here so that a bad name or parameter fails before anything is written; pose: keep its JSON too.
    keypoints = hasattr(get_preprocessor(preprocessor, **(params or {})), "keypoints")
    jobs = plan_jobs([images], conditions, keypoints=keypoints)
    prompts = {job.source: caption(job.source, caption_from) for job in jobs}
    if not any(prompts.values()):
        example = jobs[0].source.with_suffix(".txt").name
        raise ConfigError(
            f"no image in {images} has a caption: caption_from 'txt' reads same-stem .txt files (e.g. {example}) "
            "and there are none, so every pair would be unusable; write them, or use the file names "
            "(--caption-from filename)"
        )
    check_output_folder(output, "output")
    report = annotate_paths(
        [images], preprocessor, conditions, params=params, workers=workers, overwrite=overwrite,
        keypoints=keypoints, progress=progress_bar if progress else None, engine=engine, address=address,
        gpus_per_worker=gpus_per_worker,
    )
    # no record without its map: inputs that failed, and those a stopped run never started
    failed = {Path(source) for source, _ in report.failed} | {Path(source) for source in report.not_started}
    records, uncaptioned = [], []
    for job in jobs:
        if job.source in failed:
            continue
        prompt = prompts[job.source]
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
