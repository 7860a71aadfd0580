"""What a shard build will write: one `ShardTask` per output shard, and the `ShardReport` of what it did.

A task is plain data (JSON-able: it travels to worker processes and Ray actors) and knows how to read its
samples: the image files of a folder (cut in `image_files` order into shards of `shard_size`), or the samples of
one input shard. Its `plan` digest names everything that decides the shard's content, so a re-run can tell a
finished shard from one planned differently (more images, another preprocessor or parameter).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from controlkit.errors import ConfigError

#: Image file suffixes -> the WebDataset field that holds their bytes.
FIELDS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".tif": "tiff",
          ".tiff": "tiff", ".gif": "gif"}


@dataclass(frozen=True)
class ShardTask:
    """One output shard.

    Attributes:
        index: its number in the plan. url: its file name in the output folder. output: its absolute path.
        plan: digest of what decides its content. preprocessor, params: the annotation.
        inputs: folder input: [key, absolute image path, caption, name in reports] per sample.
        source: shard input: the URL of the input shard (its samples, keys and captions are kept).
    """

    index: int
    url: str
    output: str
    plan: str
    preprocessor: str
    params: dict[str, Any]
    inputs: list[list[str]] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ShardTask:
        return cls(**values)

    def samples(self) -> Iterator[dict[str, Any]]:
        """{"key", "name", "image" (encoded bytes), "field", "caption", "original", "problem"} per sample."""
        if self.source:
            yield from _shard_samples(self.source)
            return
        for key, path, caption, name in self.inputs:
            try:
                data = Path(path).read_bytes()
                problem = None
            except OSError as error:
                data, problem = b"", f"cannot be read ({error.strerror or error})"
            yield {"key": key, "name": name, "image": data, "field": FIELDS.get(Path(path).suffix.lower(), "png"),
                   "caption": caption, "original": None, "problem": problem}


def _shard_samples(url: str) -> Iterator[dict[str, Any]]:
    from training.data.shards import IMAGE_FIELDS, Shard, iter_samples, sample_pair

    shard = Shard(url).name
    for sample in iter_samples(url):
        pair = sample_pair(sample, shard)
        try:
            original = json.loads(sample["json"]) if "json" in sample else None
        except ValueError:
            original = None
        field_name = next((name for name in IMAGE_FIELDS if name in sample), "jpg")
        yield {"key": str(sample["__key__"]), "name": pair.key, "image": pair.image, "field": field_name,
               "caption": pair.prompt, "original": original, "problem": pair.problem}


@dataclass
class ShardReport:
    """What a shard build did.

    Attributes:
        index: the shard index written. written / skipped: shard names written now / already there.
        samples: samples in the shards the index lists. failed: (sample or shard name, one-line reason).
        empty: (sample, reason) of maps where nothing was found. uncaptioned: samples written without a caption.
        stopped: why the build stopped early (a shard could not be written). not_started: shards not written.
    """

    index: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    samples: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    empty: list[tuple[str, str]] = field(default_factory=list)
    uncaptioned: list[str] = field(default_factory=list)
    stopped: str | None = None
    not_started: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and self.stopped is None

    def add(self, task: ShardTask, outcome: dict[str, Any], *, skipped: bool = False) -> None:
        (self.skipped if skipped else self.written).append(task.url)
        self.samples += int(outcome.get("samples", 0))
        self.failed += [tuple(item) for item in outcome.get("failed", [])]
        self.empty += [tuple(item) for item in outcome.get("empty", [])]
        self.uncaptioned += list(outcome.get("uncaptioned", []))


def plan_folder(images: Path, output: Path, preprocessor: str, params: dict[str, Any], shard_size: int,
                caption_from: str) -> list[ShardTask]:
    """Shards of `shard_size` samples from a folder of images, in `image_files` order.

    Raises:
        ConfigError: not a folder, `output` inside it, a bad shard size or caption source, or no caption at all.
    """
    from preprocessors.batch import image_files
    from training.data.building import CAPTION_SOURCES, caption

    if not images.is_dir():
        raise ConfigError(f"{images}: not a folder of images nor shards")
    if output.resolve().is_relative_to(images.resolve()):
        raise ConfigError(f"output {output} lies inside {images}: its shards would be read as input the next "
                          "time; choose a folder outside it")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"--shard-size must be a positive number of samples, got {shard_size!r}")
    if caption_from not in CAPTION_SOURCES:
        raise ConfigError(f"caption_from must be one of {', '.join(CAPTION_SOURCES)}, got {caption_from!r}")
    files = image_files(images)
    if not files:
        raise ConfigError(f"{images}: no image files found")
    inputs = [[f"{number:09d}", os.path.abspath(path), caption(path, caption_from),
               path.relative_to(images).as_posix()] for number, path in enumerate(files)]
    if not any(item[2] for item in inputs):
        raise ConfigError(f"no image in {images} has a caption: caption_from 'txt' reads same-stem .txt files "
                          f"(e.g. {files[0].with_suffix('.txt').name}) and there are none, so every pair would be "
                          "unusable; write them, or use the file names (--caption-from filename)")
    tasks = []
    for number, start in enumerate(range(0, len(inputs), shard_size)):
        chunk = inputs[start : start + shard_size]
        url = f"pairs-{number:06d}.tar"
        plan = digest(chunk, preprocessor, params, [_identity(item[1]) for item in chunk])
        tasks.append(ShardTask(number, url, os.path.abspath(output / url), plan, preprocessor, params, chunk))
    return tasks


def plan_shards(source: Any, output: Path, preprocessor: str, params: dict[str, Any]) -> list[ShardTask]:
    """One output shard per input shard, named as it is.

    Raises:
        ConfigError: no shards there, two with one name, or `output` the folder they are in.
    """
    from training.data.shards import resolve_shards

    shards = resolve_shards(source)
    names = [shard.name for shard in shards]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: several input shards share a name; their output shards would collide")
    output_real = os.path.realpath(output)
    if any(os.path.realpath(os.path.dirname(shard.url)) == output_real for shard in shards if "://" not in shard.url):
        raise ConfigError(f"output {output} holds the input shards; choose another folder")
    return [ShardTask(number, shard.name, os.path.abspath(output / shard.name),
                      digest(shard.url, preprocessor, params, _identity(shard.url)), preprocessor, params,
                      source=shard.url) for number, shard in enumerate(shards)]


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _identity(path: str) -> Any:
    """(size, modification time) of a local input, so that a replaced file makes its shard planned anew."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]
