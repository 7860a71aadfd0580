"""Paired training data: (target image, condition map, caption) -> tensors, with bad pairs skipped or fatal.

    >>> from training.data.dataset import PairedDataset, collate_pairs, load_pairs, make_condition_fn
    >>> pairs = load_pairs("fill50k/prompt.json")                      # formats: training/data/sources.py
    >>> dataset = PairedDataset(pairs, resolution=512)
    >>> batch = collate_pairs([dataset[0], dataset[1]])
    >>> batch["pixel_values"].shape, batch["conditioning_pixel_values"].shape
    (torch.Size([2, 3, 512, 512]), torch.Size([2, 3, 512, 512]))

Every image and condition goes through `controlkit.image.load_image` (one normaliser: EXIF orientation,
16-bit, alpha, corrupt files). Both get the same spatial transform, as diffusers' `train_controlnet.py`: the
short side resized to `resolution`, then a centre crop (or one random crop, shared by the pair). Maps
computed by a preprocessor are computed on the resized, uncropped image, i.e. at the resolution the model
sees, as users annotate at generation size; see training/data/conditions.py for the cache and randomisation.

A bad pair (missing or corrupt file, a condition whose aspect ratio differs from the image's, an empty
caption, no condition and no preprocessor) is skipped: `__getitem__` returns None, the pair is appended to
`dataset.bad_pairs`, and `collate_pairs` counts it in `batch["skipped"]`. With `on_bad_pair="fail"` it
raises a `ControlkitError` naming the pair. In DataLoader worker processes each worker has its own copy of
`bad_pairs`; the per-batch `skipped` count is what reaches the training loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controlkit.errors import ConfigError, ControlkitError, OutputError, first_line
from training.data.conditions import ConditionCache, make_condition_fn, source_identity
from training.data.sources import DatasetCell, Pair, load_pairs

if TYPE_CHECKING:
    import numpy as np

    from training.config import DataConfig

__all__ = ["Pair", "PairedDataset", "collate_pairs", "load_pairs", "load_training_pairs", "make_condition_fn",
           "check_pair", "read_image", "read_source"]

logger = logging.getLogger(__name__)

#: How far (in pixels of the larger of the two) a condition may be from the image's aspect ratio: sizes
#: that differ only by a uniform scale (a 1024 photo with a 512 map) align after resizing.
ASPECT_TOLERANCE_PX = 1.0

BAD_PAIR_POLICIES = ("skip", "fail")


class PairedDataset:
    """A map-style dataset of pairs for `torch.utils.data.DataLoader` (use `collate_fn=collate_pairs`).

    Args:
        pairs: from `load_pairs`.
        resolution: side of the square crop, a multiple of 8.
        center_crop: centre crop (default, as diffusers); False takes one random crop per (seed, epoch, index).
        condition_fn: computes the map for pairs without one: `fn(rgb (H, W, 3) uint8, rng) -> (H, W, 3)
            uint8`, e.g. from `make_condition_fn`. Pairs that have a map keep it.
        cache_dir: where computed maps are cached (only for functions with a `cache_key`).
        on_bad_pair: "skip" (return None and record it) or "fail" (raise).
        seed: with `epoch` and the index, seeds the random crop and randomised condition parameters.
        buckets: (width, height) per pair to resize and crop it to instead of the square (training/data/buckets.py).

    Items: dict(pixel_values=(3, R, R) float32 in [-1, 1], conditioning_pixel_values=(3, R, R) float32 in
    [0, 1], prompt=str, index=int, original_size=(height, width) of the image as read, before resizing,
    crop_top_left=(top, left) of the crop in the resized image, target_size=(height, width) of the crop), or None
    for a skipped bad pair. The last three are SDXL's size/crop conditioning of the sample (Podell et al.
    2307.01952, section 2.2). With buckets, R x R above is the pair's bucket.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        *,
        resolution: int,
        center_crop: bool = True,
        condition_fn: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
        cache_dir: str | os.PathLike | None = None,
        on_bad_pair: str = "skip",
        seed: int = 0,
        buckets: Sequence[tuple[int, int]] | None = None,
    ):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 or resolution % 8:
            raise ConfigError(f"`resolution` must be a positive multiple of 8, got {resolution!r}")
        if on_bad_pair not in BAD_PAIR_POLICIES:
            raise ConfigError(f"`on_bad_pair` must be one of {', '.join(BAD_PAIR_POLICIES)}, got {on_bad_pair!r}")
        self.pairs = list(pairs)
        self.resolution = resolution
        self.center_crop = center_crop
        self.condition_fn = condition_fn
        self.cache = ConditionCache(cache_dir) if cache_dir is not None else None
        self.on_bad_pair = on_bad_pair
        self.seed = seed
        self.epoch = 0
        self.bad_pairs: list[tuple[str, str]] = []
        self.buckets = list(buckets) if buckets is not None else None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops and condition parameters `__getitem__` draws.

        Call it before each epoch (DataLoader workers copy the dataset when an epoch's iteration starts, so
        use `persistent_workers=False`, the default, for the new value to reach them).
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        bucket = self.buckets[index] if self.buckets is not None else None
        return self.item(self.pairs[index], index, self.generators(index), bucket)

    def stream_item(self, pair: Pair | None, index: int, seed: tuple[int, ...]) -> dict[str, Any] | None:
        """The item of a pair read from a stream (training/data/streaming.py): `index` is its position in the
        step's global batch, `seed` (reader, position in its stream) seeds its crop and condition draws. None:
        a bad pair, or a slot a damaged shard left empty (counted as skipped)."""
        import numpy as np

        if pair is None:
            return None
        crop_seed, condition_seed = np.random.SeedSequence([self.seed, *seed]).spawn(2)
        return self.item(pair, index, (np.random.default_rng(crop_seed), np.random.default_rng(condition_seed)))

    def item(self, pair: Pair, index: int, generators: tuple[Any, Any], bucket: tuple[int, int] | None = None,
             ) -> dict[str, Any] | None:
        """The item of one pair (class docstring), with the bad-pair policy applied."""
        try:
            return self._item(pair, index, generators, bucket)
        except ControlkitError as error:
            if self.on_bad_pair == "fail":
                raise ControlkitError(
                    f"bad pair {pair.key!r}: {error}; fix or remove it, or skip bad pairs (on_bad_pair='skip')"
                ) from None
            self.bad_pairs.append((pair.key, str(error)))
            logger.warning("skipping bad pair %r: %s", pair.key, error)
            return None

    def generators(self, index: int) -> tuple[np.random.Generator, np.random.Generator]:
        """Independent (crop, condition) generators for one (seed, epoch, index)."""
        import numpy as np

        crop_seed, condition_seed = np.random.SeedSequence([self.seed, self.epoch, index]).spawn(2)
        return np.random.default_rng(crop_seed), np.random.default_rng(condition_seed)

    def _item(self, pair: Pair, index: int, generators: tuple[Any, Any], bucket: tuple[int, int] | None,
              ) -> dict[str, Any]:
        import numpy as np
        import torch

        from controlkit.control import condition_tensor

        if pair.problem is not None:
            raise ControlkitError(pair.problem)
        prompt = _check_caption(pair.prompt)
        crop_rng, condition_rng = generators
        image_source = read_source(pair.image, "image")
        image = read_image(image_source, "image")
        original_size = (int(image.shape[0]), int(image.shape[1]))
        if bucket is not None:
            image, condition, (top, left) = self._bucketed(pair, image, image_source, bucket, generators)
        else:
            image, condition, (top, left) = self._square(pair, image, image_source, crop_rng, condition_rng)
        pixel_values = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 127.5 - 1.0
        conditioning = condition_tensor(condition)[0]  # the models' input convention, defined once
        return {
            "pixel_values": pixel_values, "conditioning_pixel_values": conditioning, "prompt": prompt, "index": index,
            "original_size": original_size, "crop_top_left": (int(top), int(left)),
            "target_size": (int(image.shape[0]), int(image.shape[1])),
        }

    def _square(self, pair: Pair, image: np.ndarray, image_source: Any, crop_rng: Any, condition_rng: Any,
                ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Short side to `resolution`, then the square crop (diffusers' rule)."""
        if pair.condition is not None:
            condition = read_image(read_source(pair.condition, "condition"), "condition")
            check_alignment(image, condition)
            condition = _resize_short_side(_match_size(condition, image), self.resolution)
            image = _resize_short_side(image, self.resolution)
        elif self.condition_fn is not None:
            image = _resize_short_side(image, self.resolution)
            condition = self._computed_condition(image, image_source, condition_rng)
        else:
            raise ControlkitError("no condition map, and no preprocessor configured to compute one")
        top, left = self._crop_origin(image.shape[:2], crop_rng)
        size = self.resolution
        image = image[top : top + size, left : left + size]
        condition = condition[top : top + size, left : left + size]
        return image, condition, (top, left)

    def _bucketed(self, pair: Pair, image: np.ndarray, image_source: Any, bucket: tuple[int, int],
                  generators: tuple[Any, Any]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Resized to cover `bucket` and cropped to it, image and map alike (training/data/buckets.py)."""
        from training.data.buckets import cover, fit

        crop_rng, condition_rng = generators
        if pair.condition is not None:
            condition = read_image(read_source(pair.condition, "condition"), "condition")
            check_alignment(image, condition)
            return fit(image, _match_size(condition, image), bucket, self.center_crop, crop_rng)
        if self.condition_fn is None:
            raise ControlkitError("no condition map, and no preprocessor configured to compute one")
        image = cover(image, bucket)  # maps are computed at the size the model sees, as in the square path
        condition = self._computed_condition(image, image_source, condition_rng)
        return fit(image, condition, bucket, self.center_crop, crop_rng)

    def _computed_condition(self, image: np.ndarray, source: Any, rng: np.random.Generator) -> np.ndarray:
        function_key = getattr(self.condition_fn, "cache_key", None)
        source_id = source_identity(source)
        cache_path = None
        if self.cache is not None and function_key is not None and source_id is not None:
            cache_path = self.cache.path_for(function_key, source_id, self.resolution)
            cached = self.cache.get(cache_path)
            if cached is not None and cached.shape == image.shape:
                return cached
        condition = _as_map(self.condition_fn(image, rng), image)
        if cache_path is not None:
            try:
                self.cache.put(cache_path, condition, function_key)
            except OutputError as error:  # a cache that cannot be written is no reason to drop the pair
                logger.warning("condition cache off: %s", error)
                self.cache = None
        return condition

    def _crop_origin(self, shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
        height, width = shape
        if self.center_crop:  # torchvision's CenterCrop (diffusers' trainers): the half offset rounded, not floored
            return int(round((height - self.resolution) / 2.0)), int(round((width - self.resolution) / 2.0))
        return int(rng.integers(0, height - self.resolution + 1)), int(rng.integers(0, width - self.resolution + 1))


def image_as_condition(image: Any, rng: Any) -> Any:
    """The condition function of runs whose pairs need no map (the base model, the VAE): the image stands in."""
    return image


def load_training_pairs(data: DataConfig) -> list[Pair]:
    """The training pairs a `[data]` config names: `data.source` read with its column names, cut to the first
    `data.max_samples` when that is set."""
    pairs = load_pairs(data.source, image_column=data.image_column, conditioning_column=data.conditioning_column,
                       caption_column=data.caption_column)
    return pairs[: data.max_samples] if data.max_samples else pairs


def collate_pairs(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack dataset items into a batch, dropping skipped (None) ones.

    Returns:
        dict(pixel_values=(B, 3, R, R), conditioning_pixel_values=(B, 3, R, R), prompts=list[str],
        indices=list[int], original_sizes=list[(height, width)], crop_top_lefts=list[(top, left)],
        target_sizes=list[(height, width)], skipped=int).
        A batch whose items were all bad has B = 0 (tensors of shape (0, 3, 0, 0)); the training step should
        skip it.
    """
    import torch

    kept = [item for item in items if item is not None]
    if not kept:
        empty = torch.zeros((0, 3, 0, 0))
        return {
            "pixel_values": empty, "conditioning_pixel_values": empty.clone(), "prompts": [], "indices": [],
            "original_sizes": [], "crop_top_lefts": [], "target_sizes": [], "skipped": len(items),
        }
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in kept]),
        "conditioning_pixel_values": torch.stack([item["conditioning_pixel_values"] for item in kept]),
        "prompts": [item["prompt"] for item in kept],
        "indices": [int(item["index"]) for item in kept],
        "original_sizes": [tuple(item["original_size"]) for item in kept],
        "crop_top_lefts": [tuple(item["crop_top_left"]) for item in kept],
        "target_sizes": [tuple(item["target_size"]) for item in kept],
        "skipped": len(items) - len(kept),
    }


@dataclass
class PairCheck:
    """What `check_pair` found: problems make the pair unusable; warnings are worth a look."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_pair(pair: Pair, *, conditions_computed: bool = False) -> PairCheck:
    """Every problem of one pair, found by decoding its files fully (what `controlkit dataset check` runs).

    Args:
        pair: the pair.
        conditions_computed: a preprocessor will compute missing maps, so a pair without one is fine.

    Returns:
        One line per problem (none: a usable pair), and warnings: a condition map of one flat colour (a
        preprocessor that found nothing, e.g. no person for pose), which teaches the model to ignore it.
    """
    found = PairCheck()
    if pair.problem is not None:
        found.problems.append(pair.problem)
    else:
        try:
            _check_caption(pair.prompt)
        except ControlkitError as error:
            found.problems.append(str(error))
    image = condition = None
    try:
        image = read_image(read_source(pair.image, "image"), "image")
    except ControlkitError as error:
        found.problems.append(str(error))
    if pair.condition is None:
        if not conditions_computed:
            found.problems.append("no condition map, and no preprocessor configured to compute one")
    else:
        try:
            condition = read_image(read_source(pair.condition, "condition"), "condition")
        except ControlkitError as error:
            found.problems.append(str(error))
    if condition is not None and condition.min() == condition.max():
        found.warnings.append(f"blank condition map (every pixel {int(condition.flat[0])}): nothing was detected")
    if image is not None and condition is not None:
        try:
            check_alignment(image, condition)
        except ControlkitError as error:
            found.problems.append(str(error))
    return found


def read_source(reference: Any, role: str) -> Any:
    """What `load_image` reads for one image of a pair: a path, bytes or array as given, or a Hugging Face
    dataset cell read now.

    Raises:
        ControlkitError: the cell could not be read (any error of the dataset library), named with `role`.
    """
    if not isinstance(reference, DatasetCell):
        return reference
    try:
        return reference.read()
    except Exception as error:  # a broken Arrow file or cell is this pair's problem, not the run's
        raise ControlkitError(f"{role}: row {reference.row}, column {reference.column!r} cannot be read "
                              f"({type(error).__name__}: {first_line(error)})") from None


def read_image(source: Any, role: str) -> np.ndarray:
    """`load_image` (a "condition": `load_condition`) with the role in the error message: every failure to read or
    decode one file (an `ImageError`) is that pair's one-line problem.

    Returns:
        (H, W, 3) uint8 RGB; a condition with a masked region (inpaint) (H, W, 4).
    """
    from controlkit.image import load_condition, load_image

    try:
        return (load_condition if role == "condition" else load_image)(source)
    except ControlkitError as error:
        raise ControlkitError(f"{role}: {error}") from None


def check_alignment(image: np.ndarray, condition: np.ndarray) -> None:
    """Raise unless the condition is the image's size or a uniform scale of it (same aspect ratio)."""
    image_h, image_w = image.shape[:2]
    cond_h, cond_w = condition.shape[:2]
    if (image_h, image_w) == (cond_h, cond_w):
        return
    # Scale the smaller onto the larger and allow one pixel of rounding on the other side.
    scale = max(image_w, cond_w) / min(image_w, cond_w)
    small_h, large_h = (image_h, cond_h) if image_w <= cond_w else (cond_h, image_h)
    if abs(small_h * scale - large_h) > ASPECT_TOLERANCE_PX * max(1.0, scale):
        raise ControlkitError(
            f"size mismatch: image is {image_w}x{image_h} but condition is {cond_w}x{cond_h} (different aspect "
            "ratio, so they cannot be aligned); recompute the map from this image"
        )


def _check_caption(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ControlkitError("empty caption; write one for this image")
    return prompt.strip()


def _match_size(condition: np.ndarray, image: np.ndarray) -> np.ndarray:
    from controlkit.image import resize_to

    return resize_to(condition, (image.shape[1], image.shape[0]))


def _resize_short_side(image: np.ndarray, resolution: int) -> np.ndarray:
    """Short side to `resolution` (area when shrinking, bilinear when enlarging), aspect ratio kept; the long side
    is `int(resolution * long / short)`, torchvision's `Resize(resolution)` (diffusers' trainers), so that the
    crop offsets SDXL is conditioned on are the ones diffusers computes."""
    import cv2

    height, width = image.shape[:2]
    short = min(height, width)
    size = (max(resolution, int(resolution * width / short)), max(resolution, int(resolution * height / short)))
    if size == (width, height):
        return image
    interpolation = cv2.INTER_AREA if resolution < short else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation)


def _as_map(condition: Any, image: np.ndarray) -> np.ndarray:
    """A condition function's output as uint8 of the image's size: RGB, or RGBA with a masked region."""
    import numpy as np

    from controlkit.image import load_condition

    condition = load_condition(np.asarray(condition))
    return _match_size(condition, image)
