"""The image loader under hostile bytes: every mutated PNG/JPEG/WebP/TIFF/GIF either loads or raises ImageError.

Seeded and offline; the seed files are made with PIL itself (tiny, with EXIF where the format carries it), so
thousands of cases run in about a second.
"""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from controlkit.errors import ImageError
from controlkit.image import load_image

FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "GIF")
#: A valid big-endian EXIF block (orientation 6, x-resolution 72/1) with its second tag rewritten to
#: ImageWidth typed RATIONAL: PIL parses it, then exif_transpose fails with struct.error.
BAD_EXIF = bytes.fromhex(
    "4578696600004d4d002a000000080002011200030000000100060000010000050000000100000026000000000000004800000001"
)


def _image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _exif(image: Image.Image) -> Image.Exif:
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: makes exif_transpose parse and rewrite the block
    exif[0x010F] = "camera"
    exif[0x011A] = TiffImagePlugin.IFDRational(72, 1)
    exif[0x0132] = "2020:01:01 00:00:00"
    return exif


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _seeds() -> dict[str, bytes]:
    image = _image()
    return {fmt: _encode(image, fmt, **({} if fmt == "GIF" else {"exif": _exif(image)})) for fmt in FORMATS}


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """1-4 of: overwrite a byte, truncate, insert random bytes, insert an extreme 32-bit integer."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        at = rng.randrange(len(out) + 1)
        if kind < 0.5 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif kind < 0.65:
            del out[at:]
        elif kind < 0.85:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            out[at:at] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00"])
        if not out:
            out = bytearray(data[:1])
    return bytes(out)


def _outcome(data: bytes) -> str:
    try:
        image = load_image(data)
    except ImageError as error:
        assert "\n" not in str(error) and str(error).startswith("<bytes>: ")
        return "refused"
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    return "loaded"


def test_mutated_files_load_or_raise_image_error():
    rng = random.Random(1234)
    seeds = _seeds()
    outcomes = [_outcome(_mutate(seeds[rng.choice(FORMATS)], rng)) for _ in range(2500)]
    # Both outcomes occur: the mutations reach past the header without breaking every file.
    assert outcomes.count("loaded") > 200 and outcomes.count("refused") > 200


def test_mutated_exif_blocks_load_or_raise_image_error():
    rng = random.Random(99)
    image, raw = _image(), _exif(_image()).tobytes()
    cases = 0
    for _ in range(1000):
        block = bytearray(raw)
        for _ in range(rng.randint(1, 6)):
            block[rng.randrange(len(block))] = rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the writer's notes on the block it is given
                data = _encode(image, rng.choice(("JPEG", "PNG", "WEBP", "TIFF")), exif=bytes(block))
        except Exception:  # PIL's writer refuses some blocks: those are not inputs anyone can have
            continue
        _outcome(data)
        cases += 1
    assert cases > 800


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_corrupt_exif_block_is_one_line_naming_the_file(tmp_path, fmt):
    path = tmp_path / f"camera.{fmt.lower()}"
    path.write_bytes(_encode(Image.new("RGB", (8, 4), (10, 20, 30)), fmt, exif=BAD_EXIF))
    with pytest.raises(ImageError, match="truncated or corrupt image") as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_a_pil_image_with_a_corrupt_exif_block_is_an_image_error():
    image = Image.open(io.BytesIO(_encode(Image.new("RGB", (8, 4)), "PNG", exif=b"Exif\x00\x00XX*\x00\x08\x00\x00\x00")))
    with pytest.raises(ImageError, match=r"<PIL image>: truncated or corrupt image \(SyntaxError"):
        load_image(image)
