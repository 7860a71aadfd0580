"""The one contract every preprocessor keeps, enforced in one place.

- Input: anything `controlkit.image.load_image` accepts (path, bytes, PIL, numpy, tensor), or a list of them.
- Output: a PIL image, mode RGB (uint8), the same size as the input unless `output_size` is given; a list in
  gives a list out. Edge and line maps are white lines on black. A map with a masked region (inpaint) is mode
  RGBA, alpha 0 on the masked pixels (`controlkit.image.load_condition` reads it back, `condition_tensor` makes
  them -1).
- Deterministic: the same input and parameters give the same map.
- `detect_resolution`, where the reference annotator has one, is the size (short side, rounded to 64 by the
  reference `resize_image`) at which the detector runs; the map is then resized back with bilinear
  interpolation (ControlNet 1.1's rule).
- Bounded: the detect-resolution image and the output size are checked with `controlkit.image.check_working_size`
  before anything is allocated (`load_input`), so a thin strip (512x1 at 512 would be 262144x512) is one
  `ImageError` naming the file, not gigabytes.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from controlkit.image import (
    ImageInput,
    check_working_size,
    image_name,
    load_condition,
    load_image,
    reference_size,
    resize_image,
    resize_to,
    to_pil,
)

#: What a user can change when the detect-resolution image of an input is out of bounds.
_DETECT_FIX = "crop the image, or set detect_resolution=None (--set detect_resolution=none) to run at its size"


class EmptyMapWarning(UserWarning):
    """The map of an image is empty because the detector found nothing in it (pose: no person). The map is still
    right (black: nothing there); folder annotation lists these files. `reason` is the short form for a summary,
    e.g. 'no person found (black map)'."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Preprocessor(abc.ABC):
    """Base class: subclasses implement `detect` on RGB uint8 and inherit the contract."""

    #: Registry key of the entry (also the condition name written into checkpoints).
    name: ClassVar[str] = ""
    #: Resize the map back with nearest-neighbour instead of bilinear (binary or label-like maps); may be set
    #: per instance (softedge does for scribble maps).
    nearest_resize: bool = False
    #: The entry takes `mask=` when called (inpaint): `generate(..., mask=...)` hands it the generation's mask.
    takes_mask: ClassVar[bool] = False

    detect_resolution: int | None = None

    @classmethod
    def create(cls, **params: Any) -> Preprocessor:
        """Build from keyword parameters (the registry's entry point); learned models resolve weights here."""
        return cls(**params)

    @classmethod
    def check_ready(cls) -> str | None:
        """None when the entry can run on this machine with its defaults, else what the user must supply."""
        return None

    def __call__(
        self, image: ImageInput | Sequence[ImageInput], *, output_size: tuple[int, int] | None = None
    ) -> Image.Image | list[Image.Image]:
        """Annotate one image (or a list).

        Args:
            image: one input image or a list of them.
            output_size: (width, height) of the map; default the input's size.

        Returns:
            PIL image(s), mode RGB.
        """
        if isinstance(image, (list, tuple)):
            return [self(item, output_size=output_size) for item in image]
        rgb = self.load_input(image, output_size)
        condition = self.detect(rgb)
        target = output_size or (rgb.shape[1], rgb.shape[0])
        return to_pil(self._finish(condition, target))

    def load_input(self, image: ImageInput, output_size: tuple[int, int] | None = None) -> np.ndarray:
        """`load_image(image)` (RGB uint8 (H, W, 3); an entry that `takes_mask` reads it with `load_condition`,
        keeping a masked region as (H, W, 4)), after checking that what this preprocessor will make of it (its
        detect-resolution image, a map of `output_size` = (width, height)) is within bounds.

        Raises:
            ImageError: one line naming the input: unreadable, or a working size out of bounds.
        """
        rgb = (load_condition if self.takes_mask else load_image)(image)
        name = image_name(image)
        if self.detect_resolution is not None:
            size = reference_size((rgb.shape[1], rgb.shape[0]), self.detect_resolution)
            made_by = f"resized to detect_resolution={self.detect_resolution} on its short side"
            check_working_size(size, name, made_by=made_by, fix=_DETECT_FIX)
        if output_size is not None:
            check_working_size(output_size, name, made_by="the requested output_size")
        return rgb

    @abc.abstractmethod
    def detect(self, image: np.ndarray) -> np.ndarray:
        """Compute the map of one RGB uint8 (H, W, 3) image; any size, (h, w) or (h, w, 3), uint8."""

    def at_detect_resolution(self, image: np.ndarray) -> np.ndarray:
        """The image the detector sees: `resize_image(image, detect_resolution)`, or the image itself."""
        if self.detect_resolution is None:
            return image
        return resize_image(image, self.detect_resolution, fix=_DETECT_FIX)

    def to(self, device: Any) -> Preprocessor:
        """Move learned networks to `device`; returns self. Classical preprocessors ignore it."""
        return self

    def _finish(self, condition: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if condition.dtype != np.uint8:
            raise TypeError(f"{type(self).__name__}.detect returned {condition.dtype}, expected uint8")
        if condition.ndim == 2:
            condition = condition[..., None]
        if condition.ndim != 3 or condition.shape[2] not in (1, 3, 4):
            raise TypeError(f"{type(self).__name__}.detect returned shape {condition.shape}")
        condition = resize_to(condition, size, nearest=self.nearest_resize or condition.shape[2] == 4)
        if condition.shape[2] == 1:
            condition = np.repeat(condition, 3, axis=2)
        return np.ascontiguousarray(condition)


def check_detect_resolution(value: int | None) -> int | None:
    """Validate a `detect_resolution` parameter: None (run at input size) or a positive int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 64:
        raise ValueError(f"`detect_resolution` must be an integer >= 64 or None, got {value!r}")
    return value
