"""Reading paired training data from the formats users bring, into one list of `Pair`s.

Formats `load_pairs` accepts (detected from the path, in this order):

1. A JSON-lines manifest (`*.jsonl`, or a folder holding `manifest.jsonl`, as `controlkit dataset build`
   writes): one object per line, `{"image": ..., "condition": ..., "prompt": ...}`; `condition` may be
   left out when condition maps are computed with a preprocessor.
2. The fill50k `prompt.json` (also JSON lines): `{"source": <condition>, "target": <image>, "prompt": ...}`.
   A folder holding `prompt.json` is read the same way. Paths in both are relative to the file's folder.
3. A Hugging Face `datasets` dataset written with `save_to_disk` (a folder with `dataset_info.json` and
   `state.json`, or a `DatasetDict` folder with `dataset_dict.json`, whose `train` split is used), with
   diffusers' column names `image`, `conditioning_image`, `text` (override with the `*_column` arguments).
   Needs `pip install datasets`.
4. A folder layout::

       ROOT/images/<stem>.png|jpg|...      target images
       ROOT/conditions/<stem>.png|jpg|...  condition maps with the same stems (leave the folder out to
                                           compute them with a preprocessor)
       ROOT/images/<stem>.txt              the caption of <stem>, or instead
       ROOT/captions.jsonl                 one {"stem": "<stem>", "prompt": "..."} per line

5. A folder of images with same-stem `.txt` captions (`photo.jpg` + `photo.txt`), for conditions computed
   with a preprocessor.
6. WebDataset shards (training/data/shards.py): a `shards.json` index, a folder of .tar files, a brace pattern
   or one .tar, local or any fsspec URL. They are read as they are needed (`ShardPairs`): `pairs[:n]` reads
   n samples, and training streams them (training/data/streaming.py).

Folders are searched recursively everywhere, as `controlkit dataset build` searches them: in a layout a stem
is the path below `images/` without its suffix (`sub/cat` pairs `images/sub/cat.jpg` with
`conditions/sub/cat.png`).

Structural problems (a line that is not JSON, a line without an image) raise `ConfigError` listing every
such line; problems with single pairs (a missing or corrupt file, an empty caption) are left for
`PairedDataset` and `controlkit dataset check` to report, pair by pair.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from controlkit.errors import ConfigError, ControlkitError
from training.data.pairs import DatasetCell, ImageRef, Pair

__all__ = ["DatasetCell", "ImageRef", "Pair", "find_images", "json_lines", "load_pairs"]

#: The most structural problems listed in one error message.
_MAX_LISTED = 10


def load_pairs(
    source: str | os.PathLike,
    *,
    image_column: str = "image",
    conditioning_column: str = "conditioning_image",
    caption_column: str = "text",
) -> list[Pair]:
    """Read every pair of a dataset (formats in the module docstring).

    Args:
        source: a manifest file, a fill50k `prompt.json`, or a folder (manifest, HF dataset, layout, flat).
        image_column, conditioning_column, caption_column: column names of a Hugging Face dataset.

    Returns:
        The pairs, in file order (folders: sorted by file name). Files are not opened here.

    Raises:
        ConfigError: the source does not exist, has no pairs, or has malformed lines.
        ControlkitError: a Hugging Face dataset without the `datasets` package installed.
    """
    from training.data.shards import ShardPairs, is_shard_source, resolve_shards

    if is_shard_source(source):
        pairs: Any = ShardPairs(resolve_shards(source))
        if not pairs:
            raise ConfigError(f"{source}: the shards hold no sample")
        return pairs
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder; give a manifest (.jsonl), prompt.json, shards or a "
                          "folder")
    if path.is_file():
        pairs = _read_json_lines(path)
    elif (path / "manifest.jsonl").is_file():
        pairs = _read_json_lines(path / "manifest.jsonl")
    elif (path / "prompt.json").is_file():
        pairs = _read_json_lines(path / "prompt.json")
    elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        pairs = _read_hf_dataset(path, image_column, conditioning_column, caption_column)
    elif (path / "images").is_dir():
        pairs = _read_layout(path)
    else:
        pairs = _read_flat_folder(path)
    if not pairs:
        raise ConfigError(f"{path}: no pairs found; see `controlkit dataset check --help` for the formats")
    return pairs


def json_lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, record, problem) of every non-blank line of a JSON-lines file; `problem` is None for a line
    that parsed, else why it did not (record None).

    Lines end at b"\n" only (a trailing "\r" is dropped): U+2028, U+0085 and the other characters that
    `str.splitlines` also breaks at are valid inside a JSON string, e.g. in a caption. Each line is decoded as UTF-8
    on its own, so one bad byte is that line's problem (a byte-order mark at the start of the file is ignored).

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield number, None, f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
            continue
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as error:
            yield number, None, f"not JSON ({error.msg})"


def _read_json_lines(path: Path) -> list[Pair]:
    """A JSON-lines file with either manifest keys (image/condition/prompt) or fill50k keys."""
    root = path.parent
    pairs: list[Pair] = []
    problems: list[str] = []
    for number, record, problem in json_lines(path):
        pair = _pair_from_record(record, root) if isinstance(record, dict) else None
        if problem is None and pair is None:
            problem = "needs an 'image' (or fill50k 'target') path"
        if problem is not None:
            problems.append(f"line {number}: {problem}")
            continue
        pairs.append(pair)
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise ConfigError(f"{path}: {listed}{more}")
    return pairs


def _pair_from_record(record: dict, root: Path) -> Pair | None:
    image = record.get("image", record.get("target"))
    if not isinstance(image, str) or not image:
        return None
    condition = record.get("condition", record.get("source"))
    prompt = record.get("prompt", "")
    return Pair(
        image=str(root / image),
        condition=str(root / condition) if isinstance(condition, str) and condition else None,
        prompt=prompt if isinstance(prompt, str) else "",
        key=image,
    )


def find_images(folder: Path) -> list[Path]:
    """Every image file under `folder`, by the rule `controlkit dataset build` annotates them with
    (`preprocessors.batch.image_files`: recursive, sorted by path), so that `dataset check` of a folder sees the
    same pairs as a build of it."""
    from preprocessors.batch import image_files

    return image_files(folder)


def _relative(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def _images_by_stem(folder: Path) -> dict[str, Path]:
    """Image files under `folder` (recursively) by their path relative to it without the suffix ('sub/cat')."""
    found: dict[str, Path] = {}
    duplicates: list[str] = []
    for path in find_images(folder):
        stem = _relative(path.with_suffix(""), folder)
        if stem in found:
            duplicates.append(f"{_relative(found[stem], folder)} and {_relative(path, folder)}")
        found[stem] = path
    if duplicates:
        raise ConfigError(f"{folder}: several images share a stem ({'; '.join(duplicates[:_MAX_LISTED])}); rename one")
    return found


def _read_layout(root: Path) -> list[Pair]:
    images = _images_by_stem(root / "images")
    conditions_dir = root / "conditions"
    conditions = _images_by_stem(conditions_dir) if conditions_dir.is_dir() else None
    captions = _read_captions_jsonl(root / "captions.jsonl") if (root / "captions.jsonl").is_file() else None
    pairs = []
    for stem, image in images.items():
        if conditions is None:
            condition = None
        else:  # a missing map stays a (missing) path so that the pair is reported, not silently dropped
            condition = str(conditions.get(stem, conditions_dir / f"{stem}.*"))
        prompt, problem = (captions.get(stem, ""), None) if captions is not None else _read_caption(image)
        key = f"images/{_relative(image, root / 'images')}"
        pairs.append(Pair(str(image), condition, prompt, key=key, problem=problem))
    return pairs


def _read_captions_jsonl(path: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    for number, record, problem in json_lines(path):
        if problem is not None:
            raise ConfigError(f"{path} line {number}: {problem}")
        if not isinstance(record, dict) or not isinstance(record.get("stem"), str):
            raise ConfigError(f'{path} line {number}: expected {{"stem": "<image stem>", "prompt": "..."}}')
        prompt = record.get("prompt", "")
        captions[record["stem"]] = prompt if isinstance(prompt, str) else ""
    return captions


def _read_caption(image: Path) -> tuple[str, str | None]:
    """(caption, problem) from the image's same-stem .txt file: its text, stripped; an absent file gives ""
    (reported as an empty caption); an unreadable one gives "" and the problem, for that pair alone."""
    path = image.with_suffix(".txt")
    try:
        return path.read_text(encoding="utf-8").strip(), None
    except FileNotFoundError:
        return "", None
    except UnicodeDecodeError as error:
        return "", f"empty caption: {path.name} is not UTF-8 text (byte {error.start}); re-save it as UTF-8"
    except OSError as error:
        return "", f"empty caption: {path.name} cannot be read ({error.strerror or error})"


def _read_flat_folder(root: Path) -> list[Pair]:
    """Images found as `dataset build` finds them (recursively), each with its same-stem .txt caption."""
    pairs = []
    for image in find_images(root):
        prompt, problem = _read_caption(image)
        pairs.append(Pair(str(image), None, prompt, key=_relative(image, root), problem=problem))
    return pairs


def _read_hf_dataset(path: Path, image_column: str, conditioning_column: str, caption_column: str) -> list[Pair]:
    try:
        import datasets
    except ImportError:
        raise ControlkitError(
            f"{path} is a Hugging Face dataset; reading it needs the `datasets` package: pip install datasets"
        ) from None
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset and len(dataset) != 1:
            raise ConfigError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(dataset)})")
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    missing = [name for name in (image_column, caption_column) if name not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"{path}: no column(s) {', '.join(missing)} (columns: {', '.join(dataset.column_names)}); "
            "name them with image_column= / caption_column="
        )
    has_conditions = conditioning_column in dataset.column_names
    for column in (image_column, conditioning_column):
        if column in dataset.column_names and isinstance(dataset.features[column], datasets.Image):
            # Undecoded bytes: our own strict decoder then reports corrupt images pair by pair.
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    captions = dataset[caption_column]
    return [
        Pair(
            image=DatasetCell(dataset, row, image_column),
            condition=DatasetCell(dataset, row, conditioning_column) if has_conditions else None,
            prompt=_caption_text(caption),
            key=f"row {row}",
        )
        for row, caption in enumerate(captions)
    ]


def _caption_text(caption: Any) -> str:
    """A caption cell: a string, or a list of strings (the first one is used, as a fixed choice)."""
    if isinstance(caption, (list, tuple)):
        caption = next((item for item in caption if isinstance(item, str) and item.strip()), "")
    return caption.strip() if isinstance(caption, str) else ""
