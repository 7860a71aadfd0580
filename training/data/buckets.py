"""Aspect-ratio buckets (`data.buckets = true`): each image trains at the bucket nearest its shape, not a square.

Buckets are (width, height) pairs with sides that are multiples of 64 and an area of at most, and about,
`data.resolution`^2 (width w takes the largest height h with w x h <= resolution^2), from 1:4 to 4:1. Each pair
goes to the bucket whose aspect ratio is nearest its image's (by log ratio; the image's size is read from its
header, EXIF orientation applied), and is resized to cover the bucket and cropped to it; image and condition map
get the same resize and crop, and the crop (top, left) in the resized image, the original size and the bucket
size are the sample's SDXL size/crop conditioning.

`BucketSampler` keeps the trainer's contract (training/data/batching.py): every optimizer step is one global
batch, now of one bucket, and the order is a pure function of (seed, step): per epoch each bucket's pairs are
permuted with (seed, epoch, bucket), cut into global batches (a bucket's tail that does not fill one is left
out), and the batches of all buckets are permuted with (seed, epoch). Resume is exact, as without buckets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from controlkit.errors import ConfigError
from training.data.batching import BatchLayout, StepSampler

if TYPE_CHECKING:
    import numpy as np

#: Bucket sides are multiples of this (the VAE's 8 x the U-Net's 8 of SD and SDXL).
STEP = 64
#: The most elongated bucket, long side over short side.
MAX_RATIO = 4.0


def bucket_sizes(resolution: int, *, step: int = STEP, max_ratio: float = MAX_RATIO) -> list[tuple[int, int]]:
    """Every (width, height) bucket for `resolution` (a multiple of `step`), sorted; (resolution, resolution)
    is one of them."""
    area = resolution * resolution
    sizes = set()
    for width in range(step, int(resolution * math.sqrt(max_ratio)) + step, step):
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            sizes.add((width, height))
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest width / height (ties: the larger area)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda size: (abs(math.log(size[0] / size[1]) - ratio), -size[0] * size[1]))


def image_size(source: Any) -> tuple[int, int] | None:
    """(width, height) of an image as `load_image` will return it, from its header (None: unreadable)."""
    import io

    from PIL import Image

    try:
        handle = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        width, height = handle.size
        orientation = handle.getexif().get(0x0112)
    except Exception:  # an unreadable pair is found and counted when it is read for training
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def fit(image: np.ndarray, condition: np.ndarray | None, bucket: tuple[int, int], center: bool,
        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """Resize (H, W, 3) uint8 `image` (and `condition`, the same size) to cover `bucket` = (width, height), then
    crop both to it: centred (the half offset rounded, as the square crop) or at one random offset.

    Returns:
        (image, condition, (top, left) of the crop in the resized image).
    """
    resized, resized_condition = cover(image, bucket), None if condition is None else cover(condition, bucket)
    top, left = crop_origin(resized.shape[:2], bucket, center, rng)
    width, height = bucket
    crop = (slice(top, top + height), slice(left, left + width))
    return resized[crop], None if resized_condition is None else resized_condition[crop], (top, left)


def cover(image: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """The image scaled (aspect ratio kept) to the smallest size that covers `bucket` (area filter when
    shrinking, bilinear when enlarging, as the square path)."""
    import cv2

    height, width = image.shape[:2]
    scale = max(bucket[0] / width, bucket[1] / height)
    size = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    if size == (width, height):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def crop_origin(shape: tuple[int, int], bucket: tuple[int, int], center: bool,
                rng: np.random.Generator) -> tuple[int, int]:
    height, width = shape
    if center:
        return int(round((height - bucket[1]) / 2.0)), int(round((width - bucket[0]) / 2.0))
    return int(rng.integers(0, height - bucket[1] + 1)), int(rng.integers(0, width - bucket[0] + 1))


def assign_buckets(sources: Sequence[Any], resolution: int) -> list[tuple[int, int]]:
    """The bucket of each image source (a path, bytes or a reader of them); unreadable ones get the square."""
    sizes = bucket_sizes(resolution)
    buckets = []
    for source in sources:
        size = image_size(source)
        buckets.append((resolution, resolution) if size is None or 0 in size else nearest_bucket(*size, sizes))
    return buckets


class BucketSampler(StepSampler):
    """Global batches of one bucket each, a pure function of (seed, step) (module docstring).

    Args:
        indices: the usable dataset indices. buckets: the bucket of every dataset index.
        layout, seed: as `StepSampler`.

    Raises:
        ConfigError: no bucket holds one global batch.
    """

    def __init__(self, indices: Sequence[int], buckets: Sequence[tuple[int, int]], layout: BatchLayout, seed: int):
        self.buckets = list(buckets)
        groups: dict[tuple[int, int], list[int]] = {}
        for index in indices:
            groups.setdefault(self.buckets[index], []).append(index)
        self.groups = dict(sorted(groups.items()))
        size = layout.global_batch
        self.indices, self.layout, self.seed = list(indices), layout, seed
        self.steps_per_epoch = sum(len(group) // size for group in self.groups.values())
        self._orders: dict[int, tuple[int, ...]] = {}
        if self.steps_per_epoch == 0:
            largest = max((len(group) for group in self.groups.values()), default=0)
            raise ConfigError(
                f"with data.buckets, one optimizer step takes {size} pairs of one bucket, and the fullest bucket "
                f"holds {largest} (of {len(self.indices)} pairs in {len(self.groups)} buckets); lower "
                "train.batch_size or train.gradient_accumulation_steps, add pairs, or set data.buckets=false"
            )

    def _epoch_order(self, epoch: int) -> tuple[int, ...]:
        import numpy as np

        if epoch not in self._orders:
            size, batches = self.layout.global_batch, []
            for number, group in enumerate(self.groups.values()):
                order = np.random.default_rng([self.seed, epoch, number]).permutation(len(group))
                shuffled = [group[i] for i in order]
                batches += [shuffled[start : start + size] for start in range(0, len(group) - size + 1, size)]
            order = np.random.default_rng([self.seed, epoch]).permutation(len(batches))
            self._orders = {epoch: tuple(index for i in order for index in batches[i])}  # one epoch at a time
        return self._orders[epoch]

    def step_size(self, step: int) -> tuple[int, int]:
        """(width, height) of the bucket of optimizer step `step`."""
        return self.buckets[self.step_indices(step)[0]]

    def state(self, step: int) -> dict[str, Any]:
        return {**super().state(step), "buckets": {f"{w}x{h}": len(group) for (w, h), group in self.groups.items()}}
