"""WebDataset shards as a source of pairs: where they are, what a sample holds, reading them as a stream.

A shard is a tar file of samples; the files of one sample share a key (`000000012.jpg`, `000000012.txt`, ...).
`controlkit dataset build --format webdataset` writes, per sample:

    KEY.jpg|png|webp|...   the image, its original encoded bytes
    KEY.condition.png      the condition map (lossless PNG, the image's size)
    KEY.txt                the caption (UTF-8)
    KEY.json               {"key", "source", "image": [width, height], "condition": [width, height],
                            "preprocessor", "params"} (plus the input's own record as "original")

and an index, `shards.json`: {"format": "controlkit-webdataset", "shards": [{"url", "samples", ...}], "samples"}
with shard URLs relative to the index. img2dataset's shards (KEY.jpg, KEY.txt, KEY.json) read the same way,
without condition maps (annotate them with `dataset build SHARDS --format webdataset -p NAME`).

A shard source (`is_shard_source`) is an index file, a folder holding one or holding .tar files, a brace pattern
(`pairs-{000000..000099}.tar`), or one .tar; local, or any fsspec URL (file://, s3://, gs://, hf://, http://).
Reading composes fsspec (opening any URL) with webdataset's tar expander and key grouping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from controlkit.errors import ConfigError, ControlkitError, MissingDependencyError, first_line
from training.data.pairs import Pair

#: The index `dataset build --format webdataset` writes beside its shards.
INDEX = "shards.json"
INDEX_FORMAT = "controlkit-webdataset"
#: The field of a sample that holds its condition map.
CONDITION_FIELD = "condition.png"
#: Fields that hold the image, in the order they are looked for.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "image")


@dataclass(frozen=True)
class Shard:
    """One shard: its URL (a local path or an fsspec URL) and its sample count (None: not known without reading
    it, i.e. no index lists it)."""

    url: str
    samples: int | None = None

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


def is_shard_source(source: str | os.PathLike) -> bool:
    """Whether `source` names shards (module docstring) rather than a manifest, layout or folder of images."""
    text = str(source)
    if _is_pattern(text) or text.endswith((".tar", f"/{INDEX}")) or text == INDEX or _is_url(text):
        return True
    local = _local(text)
    if os.path.isdir(local):
        return os.path.isfile(os.path.join(local, INDEX)) or any(name.endswith(".tar") for name in os.listdir(local))
    return False


def resolve_shards(source: str | os.PathLike) -> list[Shard]:
    """The shards `source` names, in order (an index's order; else sorted by name).

    Raises:
        ConfigError: nothing there, an index that cannot be read, or no .tar file found.
    """
    text = str(source)
    if _is_pattern(text):
        import braceexpand

        return [Shard(url) for url in braceexpand.braceexpand(text)]
    if text.endswith(".json"):
        return _read_index(text)
    if text.endswith(".tar"):
        if not _exists(text):
            raise ConfigError(f"{text}: no such shard")
        return [Shard(text)]
    if _exists(_join(text, INDEX)):
        return _read_index(_join(text, INDEX))
    found = _list_tars(text)
    if not found:
        raise ConfigError(f"{text}: no shards (.tar files or {INDEX}) found")
    return [Shard(url) for url in found]


def _read_index(url: str) -> list[Shard]:
    try:
        record = json.loads(_read_bytes(url))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{url}: the shard index cannot be read ({first_line(error)})") from None
    shards = record.get("shards") if isinstance(record, dict) else None
    if record.get("format") != INDEX_FORMAT or not isinstance(shards, list):
        raise ConfigError(f"{url}: not a shard index (expected {{'format': '{INDEX_FORMAT}', 'shards': [...]}})")
    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    listed = []
    for entry in shards:
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise ConfigError(f"{url}: every shard entry needs a 'url' (got {entry!r:.80})")
        listed.append(Shard(entry["url"] if _is_url(entry["url"]) or os.path.isabs(entry["url"])
                            else _join(folder, entry["url"]), _count(entry.get("samples"))))
    return listed


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def iter_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in file order: {"__key__": key, "__url__": url, field: bytes, ...}.

    Raises:
        ControlkitError: the shard cannot be opened or is not a tar file (one line naming it); a shard truncated
            part-way raises after the samples before the damage.
    """
    import fsspec

    tariterators = webdataset_module("tariterators")
    group_by_keys, tar_file_expander = tariterators.group_by_keys, tariterators.tar_file_expander
    try:
        with fsspec.open(url, "rb") as stream:
            files = tar_file_expander([{"url": url, "stream": stream}])
            yield from group_by_keys(files)
    except ControlkitError:
        raise
    except Exception as error:  # tarfile's, fsspec's or the storage's own failure: this shard's one line
        reason = f"{type(error).__name__}: {first_line(error)}"
        raise ControlkitError(f"{url}: the shard cannot be read ({reason})") from None


def webdataset_module(name: str = "") -> Any:
    """`webdataset` (or its submodule `name`).

    Raises:
        MissingDependencyError: it is not installed (one line with the install command).
    """
    import importlib

    try:
        return importlib.import_module(f"webdataset.{name}" if name else "webdataset")
    except ImportError:
        raise MissingDependencyError("WebDataset shards need webdataset: pip install controlkit[shards]") from None


def sample_pair(sample: dict[str, Any], shard: str) -> Pair:
    """A shard sample as a `Pair`: the image and condition as encoded bytes, the caption from `txt` (or the JSON
    record's "caption"); named `SHARD:KEY` in reports."""
    key = f"{shard}:{sample.get('__key__')}"
    image_field = next((name for name in IMAGE_FIELDS if name in sample), None)
    prompt, problem = _caption(sample)
    if image_field is None:
        fields = ", ".join(sorted(name for name in sample if not name.startswith("__"))) or "none"
        problem = problem or f"no image in the sample (fields: {fields}; expected one of {', '.join(IMAGE_FIELDS)})"
    image = sample.get(image_field, b"") if image_field else b""
    return Pair(image=image, condition=sample.get(CONDITION_FIELD), prompt=prompt, key=key, problem=problem)


def _caption(sample: dict[str, Any]) -> tuple[str, str | None]:
    if "txt" in sample:
        try:
            return sample["txt"].decode("utf-8").strip(), None
        except UnicodeDecodeError as error:
            return "", f"empty caption: its txt is not UTF-8 text (byte {error.start})"
    try:
        record = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        record = {}
    text = next((record[name] for name in ("caption", "prompt", "text") if isinstance(record.get(name), str)), "")
    return text.strip(), None


class ShardPairs(Sequence):
    """The pairs of a shard source, read as they are needed: `pairs[:n]` reads only the first n samples, and
    iterating streams every shard once (memory: one sample at a time). `len()` uses the index's counts, reading
    (and counting) the shards only where no index lists them."""

    def __init__(self, shards: Sequence[Shard]):
        self.shards = list(shards)
        self._length: int | None = None

    def __iter__(self) -> Iterator[Pair]:
        for shard in self.shards:
            for sample in iter_samples(shard.url):
                yield sample_pair(sample, shard.name)

    def __len__(self) -> int:
        if self._length is None:
            self._length = sum(shard.samples if shard.samples is not None else count_samples(shard.url)
                               for shard in self.shards)
        return self._length

    @property
    def known_length(self) -> int | None:
        """The number of pairs when the index gives every shard's count (no shard is read), else None."""
        counts = [shard.samples for shard in self.shards]
        return None if None in counts else sum(counts)

    def __bool__(self) -> bool:
        return next(iter(self), None) is not None

    def __getitem__(self, index: Any) -> Any:
        import itertools

        if isinstance(index, slice):
            if index.step not in (None, 1) or (index.start or 0) < 0 or (index.stop or 0) < 0:
                return list(self)[index]
            return list(itertools.islice(iter(self), index.start, index.stop))
        if index < 0:
            index += len(self)
        found = next(itertools.islice(iter(self), index, None), None)
        if found is None:
            raise IndexError(index)
        return found


def count_samples(url: str) -> int:
    """Samples in one shard, by reading it (the index holds the counts of shards `dataset build` wrote)."""
    return sum(1 for _ in iter_samples(url))


def shard_counts(shards: Sequence[Shard]) -> list[int]:
    """Every shard's sample count: the index's, else counted by reading the shard."""
    return [shard.samples if shard.samples is not None else count_samples(shard.url) for shard in shards]


def _is_pattern(text: str) -> bool:
    return "{" in text and ".." in text and "}" in text


def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


def _exists(url: str) -> bool:
    if not _is_url(url):
        return os.path.exists(_local(url))
    import fsspec

    filesystem, path = fsspec.core.url_to_fs(url)
    return bool(filesystem.exists(path))


def _read_bytes(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as stream:
        return stream.read()


def _list_tars(folder: str) -> list[str]:
    if not _is_url(folder):
        local = _local(folder)
        if not os.path.isdir(local):
            raise ConfigError(f"{folder}: no such folder of shards")
        return sorted(_join(folder, name) for name in os.listdir(local) if name.endswith(".tar"))
    import fsspec

    filesystem, path = fsspec.core.url_to_fs(folder)
    protocol = filesystem.protocol if isinstance(filesystem.protocol, str) else filesystem.protocol[0]
    return sorted(f"{protocol}://{name}" for name in filesystem.glob(f"{path.rstrip('/')}/*.tar"))
