"""Line art: the weight-free reference formula, polarity, and the learned networks' contracts and loading."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage import data

from controlkit.errors import CheckpointError, UnsafeCheckpointError, WeightsNotFoundError
from preprocessors import get_preprocessor
from preprocessors.lineart import LineartPreprocessor, build_lineart_network, load_lineart_network
from preprocessors.nets.lineart_nets import AnimeUnet, LineartGenerator


def reference_standard_lineart(rgb: np.ndarray, sigma: float = 6.0, threshold: float = 8) -> np.ndarray:
    """The reference formula, written out independently of the module."""
    x = rgb.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), sigma)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > threshold]))
    intensity *= 127
    return intensity.clip(0, 255).astype(np.uint8)


def random_network(model: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_lineart_network(model).eval()


def test_standard_matches_reference_formula_on_photos():
    astronaut = data.astronaut()  # 512x512: the detect resolution, so no resize happens
    produced = np.asarray(LineartPreprocessor()(astronaut))
    expected = reference_standard_lineart(astronaut)
    assert produced.shape == (512, 512, 3)
    assert np.array_equal(produced[..., 0], expected)
    assert np.array_equal(produced[..., 0], produced[..., 2])

    coffee = data.coffee()
    produced = np.asarray(LineartPreprocessor(detect_resolution=None, gaussian_sigma=3.0)(coffee))
    assert np.array_equal(produced[..., 1], reference_standard_lineart(coffee, sigma=3.0))
    assert produced.max() == 255 and 5 < produced.mean() < 80  # a real drawing, not empty, not saturated


def test_standard_polarity_white_lines_on_black():
    page = np.full((256, 256, 3), 255, dtype=np.uint8)
    cv2.rectangle(page, (64, 64), (192, 192), (0, 0, 0), thickness=3)
    lines = np.asarray(LineartPreprocessor(detect_resolution=None)(page))[..., 0]
    on_stroke = lines[62:67, 70:186]  # the 5 px stroke of the top side
    assert np.median(lines) == 0 and lines.mean() < 10  # background black
    # The formula scales the median line to 127: the stroke sits there, far above the background
    assert on_stroke.min() > 100 and lines[100:150, 100:150].max() == 0


def test_standard_flat_image_is_black_without_warnings():
    with np.errstate(all="raise"):
        lines = np.asarray(LineartPreprocessor()(np.full((100, 80, 3), 90, dtype=np.uint8)))
    assert lines.shape == (100, 80, 3) and lines.max() == 0


def test_standard_through_registry_and_bad_parameters():
    assert np.array_equal(np.asarray(get_preprocessor("lineart")(data.astronaut())),
                          np.asarray(LineartPreprocessor()(data.astronaut())))
    with pytest.raises(ValueError, match="standard"):
        get_preprocessor("lineart", model="nope")
    with pytest.raises(ValueError, match="takes no `weights`"):
        get_preprocessor("lineart", weights="sk_model.pth")
    with pytest.raises(ValueError, match="create"):
        LineartPreprocessor(model="realistic")
    with pytest.raises(ValueError, match="gaussian_sigma"):
        LineartPreprocessor(gaussian_sigma=0)


def test_an_80_byte_thin_png_is_one_line_not_gigabytes(tmp_path):
    from PIL import Image

    from controlkit.errors import ImageError

    path = tmp_path / "strip.png"
    Image.new("RGB", (512, 1), (30, 30, 30)).save(path)
    assert path.stat().st_size < 100  # at detect_resolution 512 it would be a 262144x512 working image (5.7 GB)
    with pytest.raises(ImageError, match="more elongated than the limit of 16:1") as info:
        get_preprocessor("lineart")(path)
    assert str(info.value).startswith(f"{path}: the working image (resized to detect_resolution=512")
    # Run at its own size it is no bigger than it is: a map of the same size.
    assert get_preprocessor("lineart", detect_resolution=None)(path).size == (512, 1)


def test_parameters_are_checked_against_their_declared_types():
    with pytest.raises(ValueError, match=r"preprocessor 'lineart': parameter `gaussian_sigma` must be a number, "
                                         r"got '6'"):
        get_preprocessor("lineart", gaussian_sigma="6")
    with pytest.raises(ValueError, match=r"parameter `model` must be a string, got 3"):
        get_preprocessor("lineart", model=3)
    assert get_preprocessor("lineart", gaussian_sigma=3, detect_resolution=None).gaussian_sigma == 3.0  # int is a number


@pytest.mark.parametrize("model", ["realistic", "anime"])
def test_learned_contract_size_dtype_determinism(model):
    photo = data.coffee()[::4, ::4]  # 100x150, not a multiple of 64 nor 256
    preprocessor = LineartPreprocessor(model=model, network=random_network(model), detect_resolution=None)
    first, second = preprocessor(photo), preprocessor(photo)
    assert first.mode == "RGB" and first.size == (150, 100)
    assert np.asarray(first).dtype == np.uint8
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert preprocessor([photo, photo])[1].size == (150, 100)


def test_learned_output_is_inverted_to_white_on_black():
    """The networks draw dark lines on white paper; the map must be the inverse."""
    network = LineartGenerator()
    head = network.model4[1]
    torch.nn.init.zeros_(head.weight)
    photo = data.astronaut()[:128, :128]
    torch.nn.init.constant_(head.bias, 30.0)  # sigmoid = 1: white paper everywhere, no line
    assert np.asarray(LineartPreprocessor(model="coarse", network=network)(photo)).max() == 0
    torch.nn.init.constant_(head.bias, -30.0)  # sigmoid = 0: ink everywhere
    assert np.asarray(LineartPreprocessor(model="coarse", network=network)(photo)).min() == 255


def test_learned_map_equals_inverted_network_output():
    network = random_network("realistic", seed=3)
    photo = data.astronaut()[::4, ::4]  # 128x128, multiples of 4: the generator keeps the size
    produced = np.asarray(LineartPreprocessor(model="realistic", network=network, detect_resolution=None)(photo))
    with torch.no_grad():
        direct = network(torch.from_numpy(photo).float().permute(2, 0, 1)[None] / 255.0)[0, 0].numpy()
    expected = 255 - (direct * 255).clip(0, 255).astype(np.uint8)
    assert np.array_equal(produced[..., 0], expected)


def test_anime_resizes_through_multiples_of_256():
    network = random_network("anime", seed=1)
    seen = []
    network.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape)))
    photo = data.coffee()[::2, ::2]  # 200x300
    preprocessor = LineartPreprocessor(model="anime", network=network, detect_resolution=None)
    assert preprocessor(photo).size == (300, 200)
    assert seen == [(1, 3, 256, 512)]


@pytest.mark.parametrize("model, file_name", [("realistic", "sk_model.pth"), ("coarse", "sk_model2.pth"),
                                              ("anime", "netG.pth")])
def test_weights_round_trip_pth_safetensors_folder_and_models_dir(tmp_path, monkeypatch, model, file_name):
    original = random_network(model, seed=7)
    state = original.state_dict()
    pth = tmp_path / "pth" / file_name
    pth.parent.mkdir()
    torch.save(state, pth)
    safetensors = tmp_path / "weights.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, safetensors)
    monkeypatch.setenv("CONTROLKIT_MODELS", str(pth.parent))
    for weights in (pth, safetensors, pth.parent, None):
        loaded = get_preprocessor("lineart", model=model, weights=weights).network
        assert loaded.state_dict().keys() == state.keys()
        assert all(torch.equal(loaded.state_dict()[key], value) for key, value in state.items())


def test_wrong_or_missing_keys_raise_checkpoint_error_listing_them(tmp_path):
    state = LineartGenerator().state_dict()
    state["model4.9.weight"] = state.pop("model4.1.weight")
    del state["model0.1.bias"]
    path = tmp_path / "sk_model.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        load_lineart_network("realistic", path)
    message = str(caught.value)
    assert "model4.1.weight" in message and "model0.1.bias" in message and "model4.9.weight" in message
    assert "\n" not in message

    anime_file = tmp_path / "netG.pth"
    torch.save(AnimeUnet(levels=6).state_dict(), anime_file)  # the wrong depth: keys differ
    with pytest.raises(CheckpointError, match="missing keys"):
        load_lineart_network("anime", anime_file)


class _NotATensor:
    pass


def test_pickles_that_run_code_and_non_weight_files_are_refused(tmp_path):
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"object": _NotATensor()}, unsafe)
    with pytest.raises(UnsafeCheckpointError):
        LineartPreprocessor.create(model="realistic", weights=unsafe)
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match="not a weights file"):
        LineartPreprocessor.create(model="realistic", weights=text)


def test_missing_weights_say_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLKIT_MODELS", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="sk_model2.pth"):
        get_preprocessor("lineart", model="coarse")
    with pytest.raises(WeightsNotFoundError, match="has no netG.pth"):
        get_preprocessor("lineart", model="anime", weights=tmp_path)
