"""One image normaliser and the reference resize rules, used by every part of controlkit.

Every input image (a path, bytes, a PIL image, a numpy array or a torch tensor; any PIL mode; 8 or 16 bit;
EXIF-rotated; with or without alpha) goes through `load_image`, which returns RGB uint8 of shape (H, W, 3).
Transparent pixels are composited over white, as the reference annotators' `HWC3` does. Whatever goes wrong while
reading one (a decoder's own exception, a corrupt EXIF block, too little memory) is one `ImageError` line naming it.

Condition maps are read by `load_condition`, the same reader with one difference: a map with transparent pixels
(alpha below `MASK_ALPHA`) keeps them as its masked region, (H, W, 4) with alpha 0 (masked) or 255. That is how the
inpaint condition (ControlNet 1.1: the image with its masked pixels set to -1) lives in PNG files and uint8 arrays;
`controlkit.control.condition_tensor` turns the masked pixels into -1.

Every working image is bounded before it is allocated: an input by its pixels (`max_image_pixels`), and an image
that a resize helper or a caller (a preprocessor's detect size, `generate`'s control images) is about to make by
`check_working_size` (the same pixel cap, and at most `MAX_ASPECT_RATIO` : 1, since resizing a thin strip to a
short side multiplies its pixels: 512x1 at 512 would be 262144x512).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from controlkit.errors import ImageError, first_line

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, Any]

#: Raster formats users feed; everything else (FITS, PSD, ICO, ...) is refused before decoding.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
#: Default pixel cap (8192 x 8192), well under Pillow's own decompression-bomb limit. Override per call or
#: with the CONTROLKIT_MAX_IMAGE_PIXELS environment variable.
DEFAULT_MAX_PIXELS = 8192 * 8192
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
#: The longest side of a working image over its shortest. Beyond it the reference resize (short side to the
#: detect resolution) turns a few pixels into gigabytes; panoramas up to 16:1 pass.
MAX_ASPECT_RATIO = 16
_METADATA_BYTES = 64 * 2**20  # room for metadata (EXIF, ICC, text chunks) in a file at the pixel cap
#: A condition map's pixel with alpha below this is masked (`load_condition`); PIL's mask rule (`> 127` is opaque).
MASK_ALPHA = 128


def max_image_pixels() -> int:
    """The pixel cap in force: CONTROLKIT_MAX_IMAGE_PIXELS if set, else `DEFAULT_MAX_PIXELS`."""
    value = os.environ.get("CONTROLKIT_MAX_IMAGE_PIXELS")
    if value is None:
        return DEFAULT_MAX_PIXELS
    try:
        return int(value)
    except ValueError:
        raise ImageError(f"CONTROLKIT_MAX_IMAGE_PIXELS must be an integer, got {value!r}") from None


def load_image(source: ImageInput, *, max_pixels: int | None = None) -> np.ndarray:
    """Normalise any image input to RGB uint8.

    Args:
        source: a file path, encoded bytes, a PIL image (any mode), a numpy array (H, W), (H, W, 1|3|4) of
            uint8, uint16 (scaled by 1/257), bool or float in [0, 1], or a torch tensor (3, H, W), (1, 3, H, W)
            or (H, W, 3) float in [0, 1].
        max_pixels: refuse images with more pixels than this (default `max_image_pixels()`).

    Returns:
        np.ndarray of shape (H, W, 3), dtype uint8, RGB, EXIF orientation applied, alpha composited over white.

    Raises:
        ImageError: one line naming the input and the problem (missing, empty, truncated, not an image,
            unsupported format, too many pixels, unsupported array shape or range).
    """
    return _read(source, max_pixels, keep_mask=False)


def load_condition(source: ImageInput, *, max_pixels: int | None = None) -> np.ndarray:
    """Normalise a condition map: `load_image`, except that transparent pixels (alpha < `MASK_ALPHA`) are kept as
    the map's masked region.

    Returns:
        np.ndarray uint8: (H, W, 3) RGB when no pixel is masked (partly transparent ones composited over white),
        else (H, W, 4) RGBA with alpha 0 on masked pixels and 255 elsewhere (the RGB of masked pixels is kept
        but not used).
    """
    return _read(source, max_pixels, keep_mask=True)


def _read(source: ImageInput, max_pixels: int | None, *, keep_mask: bool) -> np.ndarray:
    limit = max_image_pixels() if max_pixels is None else max_pixels
    name = image_name(source)
    try:
        image = _load(source, name, limit)
        if image.shape[2] == 3:
            return image
        if keep_mask and (image[..., 3] < MASK_ALPHA).any():
            return np.concatenate([image[..., :3], np.where(image[..., 3:] < MASK_ALPHA, 0, 255).astype(np.uint8)], 2)
        return _composite_over_white(image)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode this image; resize it or free memory") from None
    except Exception as error:  # any decoder's own failure (EXIF parsing: struct.error, TypeError, ...) is this file's
        raise ImageError(f"{name}: truncated or corrupt image ({type(error).__name__}: {first_line(error)})") from None


def image_name(source: ImageInput) -> str:
    """How messages name an image input: its path, or '<bytes>', '<PIL image>', '<tensor>', '<array>'."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return "<PIL image>"
    if hasattr(source, "detach") and hasattr(source, "cpu"):
        return "<tensor>"
    return "<array>"


def _load(source: ImageInput, name: str, limit: int) -> np.ndarray:
    if isinstance(source, (str, os.PathLike)):
        return _pil_pixels(_open_file(Path(source), limit), name)
    if isinstance(source, (bytes, bytearray)):
        return _pil_pixels(_open_stream(io.BytesIO(source), name, limit), name)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, name, limit)
        return _pil_pixels(_transpose(source), name)
    if hasattr(source, "detach") and hasattr(source, "cpu"):
        return _array_pixels(_tensor_to_hwc(source, limit), name, limit)
    if isinstance(source, np.ndarray):
        return _array_pixels(source, name, limit)
    raise ImageError(
        f"`image` must be a path, bytes, PIL image, numpy array or tensor, but got {type(source).__name__}"
    )


def _transpose(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; PIL's warnings about damaged EXIF are not the user's to read (the pixels are)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ImageOps.exif_transpose(image)


def _open_file(path: Path, limit: int) -> Image.Image:
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    size = path.stat().st_size
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    if size > 8 * limit + _METADATA_BYTES:  # more than 16-bit RGBA at the pixel cap: not read into memory
        raise ImageError(f"{path}: {size} bytes, more than an image within the limit of {limit} pixels can hold")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ImageError(f"{path}: cannot be read ({error.strerror or error})") from None
    return _open_stream(io.BytesIO(data), str(path), limit)


def _open_stream(stream: io.BytesIO, name: str, limit: int) -> Image.Image:
    head = stream.getvalue()[:64]
    if not head:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's notes on damaged metadata; a real failure raises
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=ALLOWED_FORMATS)
            _check_pixels(image.size, name, limit)
            image.seek(0)  # GIF/TIFF: the first frame
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: image has too many pixels (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: {_describe_non_image(head)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"{name}: truncated or corrupt image ({error})") from None
    return _transpose(image)


def _describe_non_image(head: bytes) -> str:
    text = head.lstrip().lower()
    supported = "PNG, JPEG, WebP, BMP, TIFF or GIF"
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not an image; run `git lfs pull` to fetch the real file"
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg")):
        return f"an HTML/XML page, not an image; save the image itself ({supported})"
    if text.startswith(b"%pdf"):
        return f"a PDF, not a raster image; export it as {supported}"
    return f"not a supported image; expected {supported}"


def _check_pixels(size: tuple[int, int], name: str, limit: int) -> None:
    width, height = size
    if width * height > limit:
        raise ImageError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {limit}; "
            "resize it, or raise the limit with max_pixels= or CONTROLKIT_MAX_IMAGE_PIXELS"
        )
    if width == 0 or height == 0:
        raise ImageError(f"{name}: image has zero size ({width}x{height})")


def _pil_pixels(image: Image.Image, name: str) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (and 32-bit integer) samples are scaled to 8 bit, never wrapped or clipped at 255.
        return _array_pixels(np.asarray(image).astype(np.int64).clip(0, 65535).astype(np.uint16), name, None)
    if mode == "F":
        return _array_pixels(_float_to_unit(np.asarray(image, dtype=np.float32)), name, None)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("RGBA"), dtype=np.uint8).copy()  # composited (or kept) by `_read`
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (ValueError, OSError) as error:
        raise ImageError(f"{name}: cannot convert PIL mode {mode!r} to RGB ({error})") from None


def _float_to_unit(values: np.ndarray) -> np.ndarray:
    """Float images: [0, 1] is kept; anything larger is read as 0..255."""
    return values if float(np.nanmax(values, initial=0.0)) <= 1.0 else values / 255.0


def _composite_over_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return rgb.round().clip(0, 255).astype(np.uint8)


def _tensor_to_hwc(tensor: Any, limit: int) -> np.ndarray:
    if tensor.ndim == 4:
        if tensor.shape[0] != 1:
            raise ImageError(f"<tensor>: expected one image, got a batch of {tensor.shape[0]}; pass them as a list")
        tensor = tensor[0]
    channels_first = tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4) and tensor.shape[-1] not in (1, 3, 4)
    if tensor.ndim in (2, 3):  # checked before the float copy below is made
        _check_pixels(tuple(tensor.shape[2:0:-1] if channels_first else tensor.shape[1::-1]), "<tensor>", limit)
    array = tensor.detach().cpu().float().numpy()
    return array.transpose(1, 2, 0) if channels_first else array


def _array_pixels(array: np.ndarray, name: str, limit: int | None) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    if limit is not None:
        _check_pixels((array.shape[1], array.shape[0]), name, limit)
    array = _to_uint8(array, name)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array)  # RGBA: composited (or kept) by `_read`


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{name}: float image contains NaN or infinity")
        low, high = float(array.min()), float(array.max())
        if low < -1e-3 or high > 1.0 + 1e-3:
            raise ImageError(f"{name}: float image must be in [0, 1], got [{low:.3g}, {high:.3g}]; divide by 255")
        return (array.clip(0.0, 1.0) * 255.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        high = int(array.max(initial=0))
        if array.min(initial=0) < 0 or high > 65535:
            raise ImageError(f"{name}: integer image values must be in 0..65535, got up to {high}")
        if high > 255:
            return _to_uint8(array.astype(np.uint16), name)
        return array.astype(np.uint8)
    raise ImageError(f"{name}: unsupported dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1]")


def to_pil(image: np.ndarray) -> Image.Image:
    """RGB uint8 (H, W, 3) array to a PIL image, mode RGB; a masked condition map (H, W, 4) to mode RGBA."""
    return Image.fromarray(np.ascontiguousarray(image), mode="RGBA" if image.shape[-1] == 4 else "RGB")


def reference_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) that `resize_image` gives an image of `size` = (width, height): the short side scaled to
    `resolution`, each side rounded to the nearest multiple of 64 (at least 64). Pure arithmetic, no pixels."""
    width, height = size
    scale = float(resolution) / max(1, min(height, width))
    return max(64, int(np.round(width * scale / 64.0)) * 64), max(64, int(np.round(height * scale / 64.0)) * 64)


def check_working_size(
    size: tuple[int, int], name: str, *, made_by: str = "", fix: str = ""
) -> tuple[int, int]:
    """Refuse, before it is allocated, a working image of `size` = (width, height) that is too large or too thin.

    The one bound of every image controlkit makes from an input (a detector's resized input, a map's output
    size, a control image resized for generation): at most `max_image_pixels()` pixels (the input cap, one knob:
    CONTROLKIT_MAX_IMAGE_PIXELS) and at most `MAX_ASPECT_RATIO` : 1.

    Args:
        size: (width, height) of the image about to be made.
        name: the input it comes from, for the message (a path, or e.g. '<array>').
        made_by: how it is made, for the message (e.g. "resized to 512 on its short side").
        fix: what the user can change, appended to the message (default: crop or resize the input).

    Returns:
        `size` as ints, when it is within bounds.

    Raises:
        ImageError: one line naming the input, the size, the limit and the fix.
    """
    width, height = (int(side) for side in size)
    what = f"{name}: the working image{f' ({made_by})' if made_by else ''} would be {width}x{height}"
    if width < 1 or height < 1:
        raise ImageError(f"{what}; both sides must be at least 1")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"{what}, more elongated than the limit of {MAX_ASPECT_RATIO}:1; "
            f"{fix or 'crop the image to a less elongated shape'}"
        )
    limit = max_image_pixels()
    if width * height > limit:
        raise ImageError(
            f"{what} = {width * height} pixels, over the limit of {limit}; "
            f"{fix or 'use a smaller size'}, or raise the limit with CONTROLKIT_MAX_IMAGE_PIXELS"
        )
    return width, height


def resize_image(image: np.ndarray, resolution: int, *, name: str = "<image>", fix: str = "") -> np.ndarray:
    """The reference annotators' `resize_image`.

    The short side is scaled to `resolution`, then each side is rounded to the nearest multiple of 64.
    Upscaling uses Lanczos-4, downscaling area interpolation (lllyasviel/ControlNet `annotator/util.py`).
    The result is checked with `check_working_size` before it is allocated.

    Args:
        image: (H, W, C) uint8.
        resolution: target length of the short side, before rounding.
        name, fix: the input and what the user can change, for the message of a refused size.

    Returns:
        (H', W', C) uint8 with H' and W' multiples of 64.

    Raises:
        ImageError: the result would be over the pixel cap or more elongated than `MAX_ASPECT_RATIO` : 1.
    """
    import cv2

    height, width = image.shape[:2]
    new_width, new_height = reference_size((width, height), resolution)
    check_working_size((new_width, new_height), name, made_by=f"resized to {resolution} on its short side", fix=fix)
    scale = float(resolution) / min(height, width)
    interpolation = cv2.INTER_LANCZOS4 if scale > 1 else cv2.INTER_AREA
    return cv2.resize(image, (new_width, new_height), interpolation=interpolation)


def resize_to(image: np.ndarray, size: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """Resize (H, W, C) uint8 to `size` = (width, height) with bilinear (CN1.1) or nearest interpolation."""
    import cv2

    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    resized = cv2.resize(image, tuple(size), interpolation=interpolation)
    return resized[..., None] if resized.ndim == 2 and image.ndim == 3 else resized


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Pad (H, W, C) at the bottom and right with edge pixels so both sides are multiples of `multiple`.

    Use `crop_to(result, image.shape[:2])` to bring a map computed on the padded image back to exactly the
    input size.
    """
    height, width = image.shape[:2]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return image
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, widths, mode="edge")


def crop_to(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop the top-left (H, W) = `shape` of an image padded by `pad_to_multiple`."""
    return image[: shape[0], : shape[1]]


def is_image_file(path: Path) -> bool:
    """True for file names with a supported image suffix (case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES
