"""Upscaling with the tile ControlNet: the image resized up, then img2img whose condition is that same image.

This is ControlNet 1.1 tile's workflow (its README: resize the image up, then img2img with the tile ControlNet
conditioned on the resized image) and A1111's "Ultimate SD upscale" with ControlNet tile: the low strength keeps
the content, the ControlNet keeps each part faithful to its own region, and the sampler adds the detail the
resize could not. The resized image is generated whole in one `generate` call, or in overlapping tiles (each one
`generate` call on its crop, all with one seed) blended with linear feathering across the overlaps.

Example:
    >>> from controlkit.checkpoint import load_controlnet
    >>> from controlkit.pipeline import load_base
    >>> from controlkit.upscale import upscale
    >>> base = load_base("models/sd15")
    >>> tile, _ = load_controlnet("models/controlnet-tile", unet=base.unet)
    >>> result = upscale(base, "photo.png", "a detailed photo", tile, scale=2, tile_size=512, seed=1)
    >>> result.image.save("photo-2x.png")
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from controlkit.control import check_integer, check_number
from controlkit.errors import ConfigError
from controlkit.generation_options import MAX_IMAGE_PIXELS, SIZE_MULTIPLE, check_generation_options

if TYPE_CHECKING:
    from diffusers import ControlNetModel, StableDiffusionPipeline
    from PIL import Image

#: Largest `scale`: past 8x each input pixel becomes over 64 output pixels, nearly all of them invented; upscale
#: twice for more.
MAX_SCALE = 8.0
#: Smallest tile side: at 64 pixels (8 latents for SD's VAE) SD's U-Net is down to 1 latent at its lowest level.
MIN_TILE = 64
#: Largest tile side: a tile is one generation, bounded as every generation is.
MAX_TILE = math.isqrt(MAX_IMAGE_PIXELS)
#: Most tiles of one call (16 x 16 tiles of 512 with overlap 64 cover about 7200 x 7200): more is a typo.
MAX_TILES = 256
#: Default img2img strength. With the tile ControlNet holding each region to its content, 0.5 re-draws enough to
#: add detail; higher lets neighbouring tiles (sampled independently) drift apart and seams show, lower mostly
#: keeps the resize's blur.
DEFAULT_STRENGTH = 0.5


@dataclass
class UpscaleResult:
    """What `upscale` returns.

    Attributes:
        image: the upscaled image, PIL mode RGB, (width, height) = the input's times `scale`, multiples of 8.
        seed: the seed of every generation (drawn at random when none was given).
        tiles: how many `generate` calls made it (1 when generated whole).
        settings: everything that determines the output (for the record and PNG metadata).
    """

    image: Image.Image
    seed: int
    tiles: int
    settings: dict[str, Any]


@dataclass(frozen=True)
class UpscalePlan:
    """The output's (width, height) `size`, each tile's (width, height) `tile` (the output's when generated whole)
    and the lefts `xs` and tops `ys` of the tiles' columns and rows, from sizes alone (no pixels)."""

    size: tuple[int, int]
    tile: tuple[int, int]
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @property
    def whole(self) -> bool:
        """One generation of the whole output."""
        return len(self.xs) == 1 and len(self.ys) == 1


def plan_upscale(
    input_size: tuple[int, int], scale: Any, tile_size: Any = None, overlap: Any = 64, *, name: str = "<image>",
    names: Mapping[str, str] | None = None,
) -> UpscalePlan:
    """Check the options and bound the output before anything is allocated; `input_size` is (width, height).

    Generated whole, the output is bounded as one generation is (`MAX_IMAGE_PIXELS`); in tiles, as every working
    image is (`controlkit.image.check_working_size`, ImageError), with at most `MAX_TILES` tiles. `names` says how
    to call the options in messages (the CLI passes its flags). Raises ConfigError, one line, for a bad option.
    """
    from controlkit.image import check_working_size

    def called(key: str) -> str:
        return (names or {}).get(key, f"`{key}`")

    scale = check_number(scale, called("scale"), 1.0, MAX_SCALE, low_open=True)
    size = tuple(max(SIZE_MULTIPLE, round(side * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE) for side in input_size)
    width, height = size
    shown = f"{width}x{height} ({input_size[0]}x{input_size[1]} x {scale:g})"
    if tile_size is not None:
        tile_size = _check_multiple(tile_size, called("tile_size"), MIN_TILE, MAX_TILE)
        overlap = _check_multiple(overlap, called("overlap"), 0, tile_size // 2 - 1,
                                  f" (under half of {called('tile_size')} {tile_size})")
    if tile_size is None or (tile_size >= width and tile_size >= height):
        if width * height > MAX_IMAGE_PIXELS:
            raise ConfigError(
                f"the upscaled size {shown} is over {MAX_IMAGE_PIXELS / 1e6:.1f} MP for one generation; use a "
                f"smaller {called('scale')}, or {called('tile_size')} (e.g. 512) to generate it in tiles"
            )
        return UpscalePlan(size, size, (0,), (0,))
    check_working_size(size, name, made_by=f"scaled by {scale:g}", fix=f"use a smaller {called('scale')}")
    tile = (min(tile_size, width), min(tile_size, height))
    xs, ys = tile_positions(width, tile[0], overlap), tile_positions(height, tile[1], overlap)
    if len(xs) * len(ys) > MAX_TILES:
        raise ConfigError(
            f"{shown} in tiles of {tile_size} with overlap {overlap} is {len(xs) * len(ys)} tiles, over "
            f"{MAX_TILES}; use a larger {called('tile_size')} or a smaller {called('scale')}"
        )
    return UpscalePlan(size, tile, tuple(xs), tuple(ys))


def _check_multiple(value: Any, what: str, low: int, high: int, hint: str = "") -> int:
    value = check_integer(value, what, low, high, hint)
    if value % SIZE_MULTIPLE:
        raise ConfigError(f"{what} must be a multiple of {SIZE_MULTIPLE}, got {value}")
    return value


def tile_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of `tile` pixels along a side of `length`, each overlapping the last by `overlap`; the last
    tile is shifted back to end at the edge (so it may overlap more), since padding would make content up."""
    if tile >= length:
        return [0]
    positions = [0]
    while positions[-1] + tile < length:
        positions.append(min(positions[-1] + tile - overlap, length - tile))
    return positions


def feather(positions: list[int] | tuple[int, ...], tile: int) -> list[np.ndarray]:
    """Float32 (tile,) weights of each tile along one side: 1 inside, ramping linearly to near 0 across each overlap
    with a neighbour; two tiles' ramps over one overlap sum to 1, and every weight is > 0."""
    weights = []
    for index, start in enumerate(positions):
        weight = np.ones(tile, np.float32)
        if index > 0:
            shared = positions[index - 1] + tile - start
            weight[:shared] = np.minimum(weight[:shared], (np.arange(shared) + 0.5) / shared)
        if index + 1 < len(positions):
            shared = start + tile - positions[index + 1]
            weight[tile - shared :] = np.minimum(weight[tile - shared :], (shared - np.arange(shared) - 0.5) / shared)
        weights.append(weight)
    return weights


def resize_up(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Uint8 (H, W, 3) RGB to `size` = (width, height) with Lanczos-4, as the reference resizes up."""
    import cv2

    return cv2.resize(image, tuple(size), interpolation=cv2.INTER_LANCZOS4)


def upscale(
    base: StableDiffusionPipeline,
    image: Any,
    prompt: str,
    controlnet: ControlNetModel,
    *,
    scale: float = 2.0,
    tile_size: int | None = None,
    overlap: int = 64,
    strength: float = DEFAULT_STRENGTH,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    negative_prompt: str | None = None,
    scheduler: str = "unipc",
    control_scale: float = 1.0,
    preprocessor: Callable[[Any], Any] | None = None,
    on_tile: Callable[[int, int], None] | None = None,
) -> UpscaleResult:
    """Upscale `image` by `scale` with the tile `controlnet` (on the base's device and dtype).

    Args:
        base, prompt, negative_prompt, steps, guidance_scale, scheduler: as `controlkit.pipeline.generate`.
        image: anything `controlkit.image.load_image` reads (never modified).
        controlnet: a tile ControlNet for the base (its condition is the image itself).
        scale: output side over input side, a finite number in (1, `MAX_SCALE`]; sides rounded to multiples of 8.
        tile_size: tile side, a multiple of 8 in `MIN_TILE`..`MAX_TILE`; None (or a tile covering the output)
            generates the output in one call.
        overlap: pixels shared by neighbouring tiles, a multiple of 8 under tile_size / 2.
        strength: img2img strength in (0, 1] (default `DEFAULT_STRENGTH`).
        seed: the seed of every tile's generation; None draws one.
        control_scale: the ControlNet's strength (`Control.scale`).
        preprocessor: makes the condition from the resized image (e.g. the registry's "tile"); None uses the
            resized image itself.
        on_tile: called as on_tile(tiles done, tiles in all) after each generation.
    """
    from controlkit.image import image_name, load_image, to_pil

    check_generation_options(steps=steps, guidance_scale=guidance_scale, seed=seed, strength=strength)
    pixels = load_image(image)
    plan = plan_upscale((pixels.shape[1], pixels.shape[0]), scale, tile_size, overlap, name=image_name(image))
    resized = resize_up(pixels, plan.size)
    condition = resized if preprocessor is None else _condition(preprocessor, resized)
    seed = secrets.randbelow(2**32) if seed is None else int(seed)
    generation = dict(prompt=prompt, controlnet=controlnet, control_scale=control_scale, seed=seed, steps=steps,
                      negative_prompt=negative_prompt, guidance_scale=guidance_scale, scheduler=scheduler,
                      strength=strength)
    if plan.whole:
        output, settings = _generate_tile(base, resized, condition, **generation)
        if on_tile is not None:
            on_tile(1, 1)
    else:
        output, settings = _tiled(plan, base, resized, condition, generation, on_tile)
    tiles = len(plan.xs) * len(plan.ys)
    settings = {
        **settings, "width": plan.size[0], "height": plan.size[1], "input_width": int(pixels.shape[1]),
        "input_height": int(pixels.shape[0]), "scale": float(scale), "tile_size": None if plan.whole else tile_size,
        "overlap": None if plan.whole else overlap, "tiles": tiles, "control_scale": control_scale,
        "preprocessor": None if preprocessor is None else getattr(preprocessor, "name", type(preprocessor).__name__),
    }
    return UpscaleResult(to_pil(output), seed, tiles, settings)


def _tiled(
    plan: UpscalePlan, base: Any, resized: np.ndarray, condition: np.ndarray, generation: dict[str, Any],
    on_tile: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Generate every tile of `plan` from its crops and blend them: uint8 (H, W, 3) and the last tile's settings.

    Each output pixel is the sum of the tiles over it times their feathering weights, divided by the weights'
    sum: a convex combination, exactly the one tile's value where only one covers it.
    """
    total = len(plan.xs) * len(plan.ys)
    canvas = np.zeros((*plan.size[::-1], 3), np.float32)
    weight_sum = np.zeros(plan.size[::-1], np.float32)
    across, down = feather(plan.xs, plan.tile[0]), feather(plan.ys, plan.tile[1])
    settings: dict[str, Any] = {}
    for row, top in enumerate(plan.ys):
        for column, left in enumerate(plan.xs):
            window = np.s_[top : top + plan.tile[1], left : left + plan.tile[0]]
            tile, settings = _generate_tile(base, resized[window], condition[window], **generation)
            weight = down[row][:, None] * across[column][None, :]
            canvas[window] += tile * weight[..., None]
            weight_sum[window] += weight
            if on_tile is not None:
                on_tile(row * len(plan.xs) + column + 1, total)
    return np.rint(canvas / weight_sum[..., None]).clip(0, 255).astype(np.uint8), settings


def _condition(preprocessor: Callable[[Any], Any], resized: np.ndarray) -> np.ndarray:
    """The preprocessor's map of the whole resized image, uint8 (H, W, 3) at its size: made once, so that the
    map does not depend on where the tiles fall."""
    from controlkit.control import fit_image
    from controlkit.image import load_image

    condition = load_image(preprocessor(resized))
    return fit_image(condition, (resized.shape[1], resized.shape[0]))


def _generate_tile(
    base: Any, init: np.ndarray, condition: np.ndarray, *, prompt: str, controlnet: Any, control_scale: float,
    **options: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One img2img generation of a crop (or the whole image) at its own size: uint8 (h, w, 3) and its settings."""
    from controlkit.control import Control
    from controlkit.pipeline import generate

    height, width = init.shape[:2]
    control = Control(np.ascontiguousarray(condition), controlnet, scale=control_scale)
    result = generate(base, prompt, [control], init_image=np.ascontiguousarray(init), width=width, height=height,
                      **options)
    return np.asarray(result.images[0].convert("RGB")), result.settings
