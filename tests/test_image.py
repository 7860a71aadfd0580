"""The one image normaliser: every input kind and PIL mode, bad files, and the reference resize rules."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from controlkit.errors import ImageError
from controlkit.image import crop_to, load_image, pad_to_multiple, resize_image, resize_to


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return data.coffee()[:120, :160].copy()  # (120, 160, 3) uint8


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_rgb_uint8_array_passes_through(photo):
    out = load_image(photo)
    assert out.dtype == np.uint8 and out.shape == photo.shape
    np.testing.assert_array_equal(out, photo)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_formats_from_path_and_bytes(tmp_path, photo, fmt):
    data = _encode(Image.fromarray(photo), fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    from_path, from_bytes = load_image(path), load_image(data)
    assert from_path.shape == (120, 160, 3) and from_path.dtype == np.uint8
    np.testing.assert_array_equal(from_path, from_bytes)
    if fmt in ("PNG", "BMP", "TIFF"):
        np.testing.assert_array_equal(from_path, photo)  # lossless formats are exact
    else:
        assert np.abs(from_path.astype(int) - photo).mean() < 20  # lossy / palette formats are close


def test_mode_1_is_black_and_white_not_near_black():
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    np.testing.assert_array_equal(load_image(bits)[..., 0], [[0, 255], [255, 0]])


def test_grey_modes_repeat_to_three_channels(photo):
    grey = Image.fromarray(photo).convert("L")
    out = load_image(grey)
    np.testing.assert_array_equal(out[..., 0], np.asarray(grey))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparent_pixels_become_white(mode):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    image = Image.fromarray(rgba, "RGBA")
    image = image.convert(mode) if mode != "PA" else image.convert("P").convert("PA")
    out = load_image(image)
    assert (out[2:] == 255).all()
    assert out[:2, :, 0].min() > 0 and out[:2].tolist() != out[2:].tolist()


def test_half_transparent_pixel_is_blended_over_white():
    rgba = np.array([[[0, 0, 0, 128]]], np.uint8)
    assert load_image(rgba)[0, 0].tolist() == [127, 127, 127]


def test_palette_with_and_without_transparency():
    base = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)).convert("P")
    np.testing.assert_array_equal(load_image(base)[0], [[255, 0, 0], [0, 0, 255]])
    transparent_index = base.getpixel((1, 0))
    base.info["transparency"] = transparent_index
    assert load_image(base)[0, 1].tolist() == [255, 255, 255]


def test_cmyk_converts_to_rgb(photo):
    cmyk = Image.fromarray(photo).convert("CMYK")
    out = load_image(cmyk)
    assert out.shape == photo.shape
    assert np.abs(out.astype(int) - photo).mean() < 3


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_is_scaled_never_wrapped(tmp_path, mode):
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    if mode == "I;16":
        image = Image.fromarray(ramp)
        image.save(tmp_path / "deep.png")
        sources = (image, tmp_path / "deep.png")
    else:
        sources = (Image.fromarray(ramp.astype(np.int32), "I"),)
    for source in sources:
        grey = load_image(source)[..., 0].astype(int)
        assert grey.min() == 0 and grey.max() == 255
        assert (np.diff(grey.ravel()) >= 0).all()  # monotonic: no wrap-around at 256
        np.testing.assert_allclose(grey.ravel(), ramp.ravel() / 257.0, atol=0.51)


def test_float_mode_F_and_float_arrays():
    values = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(load_image(Image.fromarray(values, "F"))[..., 0], (values * 255).round())
    np.testing.assert_array_equal(load_image(values)[..., 0], (values * 255).round())
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(values * 300)


def test_uint16_and_bool_arrays():
    assert load_image(np.full((2, 2), 65535, np.uint16)).max() == 255
    assert load_image(np.full((2, 2), 257, np.uint16)).max() == 1
    np.testing.assert_array_equal(load_image(np.eye(2, dtype=bool))[..., 1], [[255, 0], [0, 255]])


def test_tensors_chw_batched_and_hwc(photo):
    chw = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    np.testing.assert_array_equal(load_image(chw), photo)
    np.testing.assert_array_equal(load_image(chw[None]), photo)
    np.testing.assert_array_equal(load_image(chw.permute(1, 2, 0)), photo)
    with pytest.raises(ImageError, match="batch of 2"):
        load_image(torch.stack([chw, chw]))


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = 255  # left half white
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100)
    out = load_image(path)
    assert out.shape == (40, 20, 3)
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the white half is now on top


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_image(path)[0, 0].tolist() == [255, 0, 0]


BAD_FILES = {
    "empty.png": (b"", "empty file"),
    "page.jpg": (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
    "notes.png": (b"just some text, not pixels", "not a supported image"),
    "model.png": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS"),
    "doc.png": (b"%PDF-1.4 ...", "PDF"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_give_one_line_naming_the_file(tmp_path, name):
    content, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=expected) as info:
        load_image(path)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_truncated_image_is_an_error_not_a_grey_fill(tmp_path, photo):
    data = _encode(Image.fromarray(photo), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(path)


def test_unsupported_raster_format_is_refused(tmp_path, photo):
    path = tmp_path / "icon.png"
    Image.fromarray(photo[:32, :32]).save(path, format="ICO")
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def test_pixel_limit_is_a_hard_error_read_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(path)
    with pytest.raises(ImageError, match="exceeds the limit of 1000000"):
        load_image(path, max_pixels=1_000_000)
    monkeypatch.setenv("CONTROLKIT_MAX_IMAGE_PIXELS", "4000000")
    with pytest.raises(ImageError, match="exceeds"):
        load_image(path)
    assert load_image(path, max_pixels=10_000_000).shape == (3000, 3000, 3)


def test_wrong_types_and_shapes():
    with pytest.raises(ImageError, match="got int"):
        load_image(3)
    with pytest.raises(ImageError, match="expected shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))


def test_resize_image_matches_the_reference_rule(photo):
    # short side 120 -> 512: k = 4.2667; 120*k = 512, 160*k = 682.7 -> rounded to 704; upscaling = Lanczos-4.
    out = resize_image(photo, 512)
    assert out.shape == (512, 704, 3)
    np.testing.assert_array_equal(out, cv2.resize(photo, (704, 512), interpolation=cv2.INTER_LANCZOS4))
    small = resize_image(photo, 64)
    np.testing.assert_array_equal(small, cv2.resize(photo, (64, 64), interpolation=cv2.INTER_AREA))


def test_pad_then_crop_restores_the_exact_size(photo):
    odd = photo[:101, :67]
    padded = pad_to_multiple(odd, 64)
    assert padded.shape == (128, 128, 3)
    np.testing.assert_array_equal(crop_to(padded, odd.shape[:2]), odd)
    assert resize_to(odd, (67, 101)) is odd


def test_reference_size_is_the_size_resize_image_makes(photo):
    from controlkit.image import reference_size

    assert reference_size((160, 120), 512) == (704, 512)
    assert resize_image(photo, 512).shape[:2] == (512, 704)
    assert reference_size((160, 120), 64) == (64, 64)


def test_a_thin_strip_is_refused_before_the_resize_allocates():
    strip = np.zeros((1, 512, 3), np.uint8)  # resized to 512 on its short side: 262144x512, 400 MB
    with pytest.raises(ImageError, match=r"^<image>: the working image \(resized to 512 on its short side\) would "
                                         r"be 262144x512, more elongated than the limit of 16:1; crop"):
        resize_image(strip, 512)


def test_check_working_size_bounds_pixels_and_aspect_ratio(monkeypatch):
    from controlkit.image import MAX_ASPECT_RATIO, check_working_size

    assert check_working_size((16 * 64, 64), "x.png") == (1024, 64)  # exactly 16:1 passes
    with pytest.raises(ImageError, match=rf"^x.png: the working image would be 1025x64, .* {MAX_ASPECT_RATIO}:1"):
        check_working_size((1025, 64), "x.png")
    with pytest.raises(ImageError, match="at least 1"):
        check_working_size((0, 5), "x.png")
    monkeypatch.setenv("CONTROLKIT_MAX_IMAGE_PIXELS", "10000")
    with pytest.raises(ImageError, match=r"^x.png: the working image \(a control image\) would be 200x200 = 40000 "
                                         r"pixels, over the limit of 10000; .*CONTROLKIT_MAX_IMAGE_PIXELS"):
        check_working_size((200, 200), "x.png", made_by="a control image")


def test_a_file_larger_than_any_image_within_the_cap_is_not_read(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as handle:
        handle.truncate(8 * 1000 + 65 * 2**20)  # sparse: no disk or memory is used
    with pytest.raises(ImageError, match=r"huge.png: \d+ bytes, more than an image within the limit of 1000 pixels"):
        load_image(path, max_pixels=1000)


@contextlib.contextmanager
def _address_space_headroom(extra: int):
    """Linux: allow this process only `extra` more bytes of address space, so a big allocation fails."""
    import resource

    status = Path("/proc/self/status").read_text().splitlines()
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the address space size from /proc")
def test_a_tensor_over_the_cap_is_refused_before_its_float_copy():
    strip = torch.zeros(1, dtype=torch.uint8).expand(3, 9000, 9000)  # a view: no memory until it is copied
    with _address_space_headroom(256 * 2**20):  # the float copy would need 972 MB
        with pytest.raises(ImageError, match=r"<tensor>: 9000x9000 = 81000000 pixels exceeds the limit of 67108864"):
            load_image(strip)
        with pytest.raises(ImageError, match=r"<tensor>: 9000x9000 = 81000000 pixels exceeds"):
            load_image(strip[None].permute(0, 2, 3, 1)[:, :, :, :1])  # (1, H, W, 1)


def test_a_decoder_failure_of_any_kind_names_the_input(tmp_path):
    # A PNG whose EXIF chunk is not a TIFF structure: PIL raises SyntaxError while applying the orientation.
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", exif=b"Exif\x00\x00XX*\x00\x08\x00\x00\x00")
    path = tmp_path / "odd.png"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ImageError, match=r"odd.png: truncated or corrupt image \(SyntaxError: not a TIFF file"):
        load_image(path)
