"""Depth from transformers models (tiny random networks, injected or saved); normals from depth vs analytic ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from controlkit.errors import CheckpointError, WeightsNotFoundError
from preprocessors.depth import DepthPreprocessor, depth_to_map
from preprocessors.normal import NormalPreprocessor, normals_from_depth
from preprocessors.registry import get_preprocessor

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(autouse=True)
def _empty_models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLKIT_MODELS", str(tmp_path / "models"))


def _tiny_dpt():
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=64,
        patch_size=16, backbone_out_indices=[0, 1], neck_hidden_sizes=[16, 32], fusion_hidden_size=16,
        reassemble_factors=[4, 2],
    )
    torch.manual_seed(0)
    return DPTForDepthEstimation(config).eval()


def _tiny_depth_anything():
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, patch_size=14,
        image_size=56, out_indices=[1, 2], reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[16, 32], fusion_hidden_size=16,
        head_hidden_size=8, reassemble_factors=[4, 2],
    )
    torch.manual_seed(0)
    return DepthAnythingForDepthEstimation(config).eval()


def _tiny_dpt_hybrid():
    """DPT-Hybrid (the reference annotator's architecture) at toy size: a BiT backbone, input fixed at 64 x 64."""
    from transformers import BitConfig, DPTConfig, DPTForDepthEstimation

    backbone = BitConfig(
        global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[16, 32, 64],
        out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True, num_groups=2,
    )
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=64,
        patch_size=16, is_hybrid=True, backbone_config=backbone, backbone_featmap_shape=[1, 64, 4, 4],
        neck_hidden_sizes=[16, 32, 32, 32], reassemble_factors=[1, 1, 1, 0.5], backbone_out_indices=[0, 1, 2, 3],
        fusion_hidden_size=16, neck_ignore_stages=[0, 1], readout_type="project",
    )
    torch.manual_seed(0)
    return DPTForDepthEstimation(config).eval()


def _photo(height: int = 100, width: int = 150) -> np.ndarray:
    return (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)


# ---- depth -------------------------------------------------------------------------------------------------------


def test_depth_map_is_min_max_normalised_and_grey():
    depth = DepthPreprocessor(_tiny_dpt(), detect_resolution=128)
    photo = _photo()
    at_detect = depth.detect(photo)
    assert at_detect.dtype == np.uint8 and at_detect.shape == (128, 192)  # resize_image(100x150, 128)
    assert (at_detect.min(), at_detect.max()) == (0, 255)
    output = np.asarray(depth(photo))
    assert output.shape == (100, 150, 3)
    assert (output[..., 0] == output[..., 1]).all() and (output[..., 1] == output[..., 2]).all()


def test_depth_feeds_the_reference_normalisation():
    model = _tiny_dpt()
    depth = DepthPreprocessor(model, detect_resolution=None)  # no image processor: the reference's [-1, 1]
    photo = _photo(64, 64)
    pixels = torch.from_numpy(photo.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = model(pixel_values=pixels).predicted_depth[0].numpy()
    np.testing.assert_allclose(depth.predict(photo), expected, rtol=1e-5, atol=1e-12)


def test_depth_anything_non_square_with_its_processor_normalisation():
    from transformers import DPTImageProcessor

    model = _tiny_depth_anything()
    processor = DPTImageProcessor(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    depth = DepthPreprocessor(model, processor, detect_resolution=None)
    photo = _photo(98, 154)  # multiples of the patch size 14
    normalised = (photo.astype(np.float32) / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(normalised).permute(2, 0, 1)[None]).predicted_depth[0].numpy()
    np.testing.assert_allclose(depth.predict(photo), expected, rtol=1e-5, atol=1e-12)
    assert np.asarray(DepthPreprocessor(model, processor, detect_resolution=64)(_photo())).shape == (100, 150, 3)


def test_dpt_hybrid_runs_at_its_fixed_input_size():
    model = _tiny_dpt_hybrid()
    depth = DepthPreprocessor(model, detect_resolution=128)
    assert depth.pixel_values_of(_photo(128, 192)).shape == (1, 3, 64, 64)  # transformers' hybrid takes no other
    at_detect = depth.detect(_photo())
    assert at_detect.shape == (128, 192) and (at_detect.min(), at_detect.max()) == (0, 255)
    assert np.asarray(depth(_photo())).shape == (100, 150, 3)


def test_near_is_bright():
    inverse_depth = np.tile(np.linspace(1.0, 5.0, 50), (20, 1))  # nearer to the right
    relative = depth_to_map(inverse_depth)
    assert relative[0, 0] == 0 and relative[0, -1] == 255 and (np.diff(relative[0].astype(int)) >= 0).all()
    metres = 1.0 / inverse_depth  # metric depth: far is large
    metric = depth_to_map(metres, metric=True)
    assert metric[0, -1] == 255 and metric[0, 0] == 0 and (np.diff(metric[0].astype(int)) >= 0).all()
    assert not depth_to_map(np.ones((4, 4))).any()  # constant prediction: black, not NaN


def test_depth_loads_a_saved_model_folder(tmp_path):
    from transformers import DPTImageProcessor

    model = _tiny_dpt()
    model.save_pretrained(tmp_path / "dpt")
    DPTImageProcessor().save_pretrained(tmp_path / "dpt")
    loaded = get_preprocessor("depth", model=str(tmp_path / "dpt"), detect_resolution=64)
    injected = DepthPreprocessor(model, detect_resolution=64)
    assert np.array_equal(np.asarray(loaded(_photo())), np.asarray(injected(_photo())))


def test_depth_without_a_model_says_how_to_supply_one(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"--set model=PATH_OR_HUB_ID.*CONTROLKIT_MODELS"):
        get_preprocessor("depth")
    assert "--set model=" in DepthPreprocessor.check_ready()
    (tmp_path / "models" / "depth").mkdir(parents=True)
    assert DepthPreprocessor.check_ready() is None
    (tmp_path / "weights.pt").write_bytes(b"not a folder")
    with pytest.raises(CheckpointError, match="transformers folder"):
        get_preprocessor("depth", model=str(tmp_path / "weights.pt"))


# ---- normals from depth ---------------------------------------------------------------------------------------------


def _encode(vector: np.ndarray) -> np.ndarray:
    """The reference's storage of a unit vector: v * 127.5 + 127.5, truncated."""
    return (vector / np.linalg.norm(vector, axis=-1, keepdims=True) * 127.5 + 127.5).astype(np.uint8)


def test_plane_tilted_in_x_against_the_analytic_normal():
    slope = 1.0  # one grey level per pixel, nearer (brighter) to the right
    ramp = np.tile(np.arange(200, dtype=np.float32) * slope + 40, (60, 1))
    depth_map = np.repeat(ramp.astype(np.uint8)[..., None], 3, axis=2)
    normal = NormalPreprocessor(from_depth=True, detect_resolution=None).detect(depth_map)
    x, y, z = _encode(np.array([8.0 * slope, 0.0, 2.0 * math.pi]))  # Sobel 3x3 of a unit slope is 8
    interior = normal[1:-1, 100:-1]  # background-free, away from the border
    assert (interior == [z, y, x]).all()  # default order: what control_sd15_normal was fed, (z, y, x)
    assert x > 127  # nearer to the right: positive x
    xyz = NormalPreprocessor(from_depth=True, detect_resolution=None, channel_order="xyz").detect(depth_map)
    assert np.array_equal(xyz, normal[:, :, ::-1])


def test_background_threshold():
    ramp = np.tile(np.arange(101, dtype=np.float32), (10, 1))  # relative depth = column / 100
    flat = [255, 127, 127]  # x = y = 0: facing the camera, (z, y, x)
    normal = normals_from_depth(ramp, bg_threshold=0.4)
    assert (normal[:, 1:40] == flat).all() and (normal[:, 40:-1, 2] > 127).all()
    assert (normals_from_depth(ramp, bg_threshold=0.0)[:, 1:-1, 2] > 127).all()
    assert (normals_from_depth(ramp, bg_threshold=1.0) == flat).all()


def test_sphere_against_analytic_normals():
    radius, size = 90.0, 201
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64) - 100.0
    inside = rows**2 + cols**2 < radius**2
    height = np.where(inside, np.sqrt(np.clip(radius**2 - rows**2 - cols**2, 0, None)), 0.0)  # near = large
    normal = normals_from_depth(height.astype(np.float32), alpha=2.0 * math.pi, bg_threshold=0.0)
    core = rows**2 + cols**2 < (0.7 * radius) ** 2
    gx = np.where(core, -cols / np.maximum(height, 1e-9), 0)  # analytic d(height)/dx, d/dy
    gy = np.where(core, -rows / np.maximum(height, 1e-9), 0)
    expected = _encode(np.stack([8 * gx, 8 * gy, np.full_like(gx, 2.0 * math.pi)], axis=-1))[..., ::-1]
    error = np.abs(normal.astype(int) - expected.astype(int))[core]
    assert error.max() <= 3, error.max()
    centre = normal[100, 100]
    assert centre.tolist() == [255, 127, 127]
    assert normal[100, 150, 2] < 127 < normal[100, 50, 2]  # x: falls off to the right, rises to the left
    assert normal[50, 100, 1] > 127 > normal[150, 100, 1]  # y (image rows down): rises from the top


def test_normals_from_a_photo_compose_the_depth_model():
    model = _tiny_dpt()
    estimator = DepthPreprocessor(model, detect_resolution=None)
    normal = NormalPreprocessor(estimator, detect_resolution=64)
    photo = _photo()
    small = normal.at_detect_resolution(photo)
    assert np.array_equal(normal.detect(photo), normals_from_depth(estimator.predict(small), bg_threshold=0.4))
    assert np.asarray(normal(photo)).shape == (100, 150, 3)


def test_normal_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="from_depth=true"):
        get_preprocessor("normal")
    with pytest.raises(WeightsNotFoundError, match="weights"):
        get_preprocessor("normal", model="bae")
    state_dict = tmp_path / "scannet.pt"
    torch.save({"model": {"weight": torch.zeros(2)}}, state_dict)
    with pytest.raises(CheckpointError, match="not a torch.export or TorchScript"):
        get_preprocessor("normal", model="bae", weights=str(state_dict))
    with pytest.raises(ValueError, match="channel_order"):
        get_preprocessor("normal", from_depth=True, channel_order="rgb")
    assert "from_depth" in NormalPreprocessor.check_ready()


class _ConstantNormals(torch.nn.Module):
    """NNET-shaped output: ([coarse, fine], ...), 4 channels (normal + kappa), facing the camera (0, 0, -1)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, image: torch.Tensor):
        normal = torch.zeros_like(image[:, :1]).repeat(1, 4, 1, 1)
        normal[:, 2] = -1.0 * self.scale
        return (normal[:, :, ::2, ::2], normal), (normal,), (normal,)


def test_normalbae_from_an_export(tmp_path):
    traced = tmp_path / "normalbae.ts"
    torch.jit.trace(_ConstantNormals().eval(), torch.zeros(1, 3, 64, 64), check_trace=False).save(str(traced))
    exported = tmp_path / "normalbae.pt2"
    side = torch.export.Dim("side", min=1, max=32)
    program = torch.export.export(
        _ConstantNormals().eval(), (torch.zeros(1, 3, 64, 64),), dynamic_shapes={"image": {2: 32 * side, 3: 32 * side}}
    )
    torch.export.save(program, str(exported))
    for path in (traced, exported):
        bae = get_preprocessor("normal", model="bae", weights=str(path), detect_resolution=64)
        output = np.asarray(bae(np.zeros((64, 64, 3), np.uint8)))
        assert output.shape == (64, 64, 3) and (output == [127, 127, 0]).all()  # (n + 1) / 2 * 255, network order
    bae = get_preprocessor("normal", model="bae", weights=str(exported), detect_resolution=128)
    assert (np.asarray(bae(np.zeros((100, 100, 3), np.uint8))) == [127, 127, 0]).all()  # dynamic size
