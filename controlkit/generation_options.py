"""What `controlkit.pipeline.generate` accepts: every option's allowed range, the working-size bounds, the defaults
a base records, and the note for a size far from what the base was made for.

All of it is checked before a model runs or a latent is allocated, each failure one `ConfigError` line naming the
option (the command line passes its flags as the names), its range and the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlkit.control import RESIZE_MODES, Control, check_integer, check_number
from controlkit.errors import ConfigError
from controlkit.base_families import family_of
from controlkit.sampling import DEFAULT_STEPS, MAX_SEED, MAX_STEPS
from controlkit.sd_pipelines import SETTINGS_ATTRIBUTE

#: Output sides must be multiples of this (SD's VAE downsamples by 8).
SIZE_MULTIPLE = 8
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: Most pixels of one output image, and of one batch (num_images x width x height): 2048 x 2048 (4.2 MP), i.e. one
#: 2048 x 2048 image, 4 of 1024 x 1024 or 16 of 512 x 512. SD1.5 was trained at 512 x 512 and SDXL at 1024 x 1024.
#: The VAE decoder's full-resolution features alone take about 1.5 KiB a pixel in float32 (6 GiB at this bound) and
#: each U-Net step grows with the pixels too, so a larger request is a typo (an extra digit, a batch of hundreds) or
#: a photo's size taken as the output size; it is refused before anything is allocated. Make several calls instead.
MAX_IMAGE_PIXELS = 2048 * 2048
MAX_BATCH_PIXELS = 2048 * 2048
#: An output area this many times larger or smaller than the base's native one gets a `GenerationWarning`.
FAR_FROM_NATIVE = 2.0


class GenerationWarning(UserWarning):
    """Generation runs but likely not as meant (a size far from what the base was trained at); the CLI prints it
    as a one-line note."""


def generation_defaults(base: Any) -> dict[str, Any]:
    """{"steps": ..., "guidance_scale": ...}: what the base records (`load_base` reads its `SETTINGS_FILE`), else
    `DEFAULT_STEPS` and the family's `default_guidance` (7.5 for SD1.x/SD2.x, 5.0 for SDXL)."""
    recorded = getattr(base, SETTINGS_ATTRIBUTE, None) or {}
    return {"steps": DEFAULT_STEPS, "guidance_scale": family_of(base).default_guidance, **recorded}


def check_generation_options(
    *,
    steps: Any = None,
    guidance_scale: Any = None,
    seed: Any = None,
    num_images: Any = 1,
    width: Any = None,
    height: Any = None,
    strength: Any = 0.75,
    eta: Any = 0.0,
    output_type: Any = "pil",
    resize_mode: Any = "resize",
    names: Mapping[str, str] | None = None,
) -> None:
    """Raise ConfigError, one line naming the option, its allowed range and the value, for the first option of
    `generate` out of range; nothing is loaded or allocated. `names` says how to call each option in the message
    (the CLI passes its flags, {"guidance_scale": "--guidance"}); by default `steps`, `guidance_scale`, ...

    `steps` and `guidance_scale` None stand for the base's defaults (always in range). The size is checked here
    when both sides are given; `generate` checks the size it takes from an image.
    """
    def name(key: str) -> str:
        return (names or {}).get(key, f"`{key}`")

    if steps is not None:
        check_integer(steps, name("steps"), 1, MAX_STEPS)
    if guidance_scale is not None:  # NaN would switch guidance off without a word
        check_number(guidance_scale, name("guidance_scale"), 0.0)
    if seed is not None:
        check_integer(seed, name("seed"), 0, MAX_SEED, "; leave it out for a random seed")
    check_integer(num_images, name("num_images"), 1, MAX_BATCH_PIXELS // SIZE_MULTIPLE**2)
    check_number(strength, name("strength"), 0.0, 1.0, low_open=True)
    check_number(eta, name("eta"), 0.0, 1.0)
    choices_of = {"output_type": (output_type, OUTPUT_TYPES), "resize_mode": (resize_mode, RESIZE_MODES)}
    for key, (value, choices) in choices_of.items():
        if value not in choices:
            raise ConfigError(f"{name(key)} must be one of {', '.join(choices)}, got {value!r}")
    for key, value in (("width", width), ("height", height)):
        if value is not None:
            _check_side(value, name(key))
    if width is not None and height is not None:
        check_working_size((width, height), num_images, names=names)


def check_working_size(
    size: tuple[int, int], num_images: int, *, origin: str = "", names: Mapping[str, str] | None = None
) -> None:
    """ConfigError unless width x height is at most `MAX_IMAGE_PIXELS` and num_images x width x height at most
    `MAX_BATCH_PIXELS`; `origin` says where a size not given by the caller came from ("the control image's")."""
    def name(key: str) -> str:
        return (names or {}).get(key, f"`{key}`")

    width, height = size
    shown = f"{width}x{height}" + (f" ({origin} size)" if origin else "")
    if width * height > MAX_IMAGE_PIXELS:
        raise ConfigError(
            f"the output size {shown} is over {_megapixels(MAX_IMAGE_PIXELS)} per image; set a smaller "
            f"{name('width')} and {name('height')}"
        )
    if num_images * width * height > MAX_BATCH_PIXELS:
        most = max(1, MAX_BATCH_PIXELS // (width * height))
        raise ConfigError(
            f"{name('num_images')} {num_images} at {shown} is {_megapixels(num_images * width * height)} in one "
            f"batch, over {_megapixels(MAX_BATCH_PIXELS)}; use at most {most} images at this size, or several calls"
        )


def native_size(base: Any) -> tuple[int, int]:
    """(width, height) in pixels the base's U-Net was made for: its sample size times the VAE's factor."""
    sample = base.unet.config.sample_size
    height, width = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return width * base.vae_scale_factor, height * base.vae_scale_factor


def size_note(size: tuple[int, int], native: tuple[int, int]) -> str | None:
    """A one-line note when `size` = (width, height) is far (`FAR_FROM_NATIVE`) in area from the base's `native`
    size, else None: far larger is slower in proportion and tends to repeat the subject, far smaller breaks it."""
    ratio = (size[0] * size[1]) / (native[0] * native[1])
    if 1 / FAR_FROM_NATIVE <= ratio <= FAR_FROM_NATIVE:
        return None
    times = f"{ratio:.0f}x the area and about {ratio:.0f}x the time" if ratio > 1 else f"1/{1 / ratio:.0f} of the area"
    return (
        f"the output is {size[0]}x{size[1]} but the base was made for {native[0]}x{native[1]} ({times}); "
        f"set the width and height to {native[0]}x{native[1]} for its native size"
    )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} pixels"


def check_inputs(prompt: Any, negative_prompt: Any, controls: Any) -> list[Control]:
    """`controls` as a list, after checking the prompts are strings and every control a `Control`."""
    if not isinstance(prompt, str):
        raise ConfigError(f"`prompt` must be a string, got {type(prompt).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ConfigError(f"`negative_prompt` must be a string or None, got {type(negative_prompt).__name__}")
    items = list(controls) if isinstance(controls, (list, tuple)) else None
    if items is None or not all(isinstance(control, Control) for control in items):
        raise ConfigError("`controls` must be a list of controlkit.Control objects (Control.from_pretrained(...))")
    return items


def _check_side(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE:
        lower = max(SIZE_MULTIPLE, (value // SIZE_MULTIPLE) * SIZE_MULTIPLE) if isinstance(value, int) else 512
        raise ConfigError(
            f"{what} must be a positive multiple of {SIZE_MULTIPLE}, got {value!r}; use {lower} or "
            f"{lower + SIZE_MULTIPLE}"
        )


def output_size(
    width: int | None, height: int | None, reference: tuple[int, int] | None, native: tuple[int, int]
) -> tuple[int, int]:
    """(width, height) of the output: the sides given, else the reference image's (its (height, width): the first
    control image, else the init image), else the base's `native` (width, height), rounded to multiples of 8."""
    ref_h, ref_w = reference if reference is not None else native[::-1]
    return width or _round_side(ref_w), height or _round_side(ref_h)


def _round_side(pixels: int) -> int:
    return max(SIZE_MULTIPLE, int(round(pixels / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
