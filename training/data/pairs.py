"""What one training pair is, whatever its source: `Pair`, and `DatasetCell` for an image read on demand."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class DatasetCell:
    """One image cell of a Hugging Face dataset, read on demand (a dataset may not fit in memory).

    `read()` returns what `controlkit.image.load_image` takes: the encoded bytes (images are read without
    decoding, so the strict decoder of `load_image` sees the file), a path, or an array.
    """

    dataset: Any
    row: int
    column: str

    def read(self) -> Any:
        value = self.dataset[self.row][self.column]
        if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            return value.get("bytes") or value.get("path")
        return value


ImageRef = Union[str, os.PathLike, bytes, DatasetCell, Any]


@dataclass
class Pair:
    """One training example.

    Attributes:
        image: the target image: a path, encoded bytes, an in-memory image, or a `DatasetCell`.
        condition: the condition map (same kinds), or None when it is to be computed from the image.
        prompt: the caption.
        key: names the pair in reports (the image's path as written in the source, or `row N`).
        problem: what makes the pair unusable that reading the source already found (a caption file that is
            not UTF-8 text), or None; reported and skipped like any bad pair.
    """

    image: ImageRef
    condition: ImageRef | None
    prompt: str
    key: str
    problem: str | None = None
