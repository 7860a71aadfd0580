"""The M-LSD network of the `mlsd` entry (model="mlsd"): the released file's key layout, loading through
`weights=`, the reference decoding on hand-built tp maps, its thresholds, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from controlkit.errors import CheckpointError, UnsafeCheckpointError, WeightsNotFoundError
from preprocessors import get_preprocessor
from preprocessors.mlsd import WEIGHT_NAME, MlsdPreprocessor
from preprocessors.nets.mlsd import MLSDLarge, decode_segments, load_mlsd, network_input_size, predict_segments

# The reference checkpoint's layout, from the reference model definition (annotator/mlsd/models/mbv2_mlsd_large.py):
# MobileNetV2 layers 0..13 (stem ConvBNReLU(4, 32, s2); inverted residuals t,c,n,s = 1,16,1,1 / 6,24,2,2 /
# 6,32,3,2 / 6,64,4,2 / 6,96,3,1), BlockTypeA/B x4 (block15..block22), BlockTypeC(64, 16) (block23).
# Counts: backbone 1 + 2 + 12 * 3 = 39 conv (no bias) + 39 BN; decoder 8 * 2 + 2 conv + BN (with bias) and one
# plain 1x1 conv: 234 + 128 = 362 tensors (57 BN step counters), 117 + 74 = 191 parameters, 542,816 + 990,864
# = 1,533,680 weights (the paper's 1.5M).
REFERENCE_TENSORS = 362
REFERENCE_BATCHNORMS = 57
REFERENCE_PARAMETERS = 191
REFERENCE_WEIGHTS = 1_533_680
REFERENCE_SHAPES = {
    "backbone.features.0.0.weight": (32, 4, 3, 3),
    "backbone.features.0.1.running_var": (32,),
    "backbone.features.1.conv.0.0.weight": (32, 1, 3, 3),  # t = 1: depthwise first
    "backbone.features.1.conv.1.weight": (16, 32, 1, 1),
    "backbone.features.1.conv.2.bias": (16,),
    "backbone.features.2.conv.0.0.weight": (96, 16, 1, 1),
    "backbone.features.2.conv.1.0.weight": (96, 1, 3, 3),
    "backbone.features.2.conv.2.weight": (24, 96, 1, 1),
    "backbone.features.2.conv.3.running_mean": (24,),
    "backbone.features.7.conv.2.weight": (64, 192, 1, 1),
    "backbone.features.11.conv.2.weight": (96, 384, 1, 1),
    "backbone.features.13.conv.1.0.weight": (576, 1, 3, 3),
    "backbone.features.13.conv.3.weight": (96,),
    "block15.conv1.0.weight": (64, 96, 1, 1),
    "block15.conv2.0.weight": (64, 64, 1, 1),
    "block15.conv2.0.bias": (64,),
    "block16.conv1.0.weight": (128, 128, 3, 3),
    "block16.conv2.0.weight": (64, 128, 3, 3),
    "block16.conv2.1.num_batches_tracked": (),
    "block17.conv2.0.weight": (64, 32, 1, 1),
    "block19.conv2.0.weight": (64, 24, 1, 1),
    "block21.conv2.0.weight": (64, 16, 1, 1),
    "block22.conv2.1.weight": (64,),
    "block23.conv1.0.weight": (64, 64, 3, 3),
    "block23.conv2.1.running_var": (64,),
    "block23.conv3.weight": (16, 64, 1, 1),
    "block23.conv3.bias": (16,),
}
#: Every name of one decoder refine block (BlockTypeB): two Sequential(Conv2d, BatchNorm2d, ReLU).
REFINE_BLOCK_KEYS = {f"block18.conv{i}.{part}" for i in (1, 2) for part in (
    "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")}


def random_mlsd(seed: int) -> MLSDLarge:
    """M-LSD large with seeded random weights and BatchNorm statistics (so that loading them matters)."""
    torch.manual_seed(seed)
    network = MLSDLarge()
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        network.block23.conv3.weight[8:12].mul_(300.0)  # displacements of pixels, not hundredths: lines to draw
    return network.eval()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()[40:190, 100:300].copy()


def test_state_dict_has_the_reference_checkpoint_layout():
    network = MLSDLarge()
    state = network.state_dict()
    assert len(state) == REFERENCE_TENSORS
    assert sum(key.endswith(".num_batches_tracked") for key in state) == REFERENCE_BATCHNORMS
    assert len(list(network.parameters())) == REFERENCE_PARAMETERS
    assert sum(parameter.numel() for parameter in network.parameters()) == REFERENCE_WEIGHTS
    assert {key: tuple(state[key].shape) for key in REFERENCE_SHAPES} == REFERENCE_SHAPES
    assert {key for key in state if key.startswith("block18.")} == REFINE_BLOCK_KEYS
    assert {key.split(".")[0] for key in state} == {"backbone", *(f"block{i}" for i in range(15, 24))}
    assert {int(key.split(".")[2]) for key in state if key.startswith("backbone.")} == set(range(14))


def test_output_is_the_tp_map_at_half_resolution():
    with torch.inference_mode():
        assert MLSDLarge().eval()(torch.zeros(1, 4, 64, 96)).shape == (1, 9, 32, 48)
    assert network_input_size(512, 768) == (512, 768)  # the reference sizes run as they are
    assert network_input_size(150, 200) == (144, 208) and network_input_size(3, 2048) == (16, 2048)


def test_saved_weights_load_through_weights_and_give_the_injected_map(tmp_path, monkeypatch, photo):
    original = random_mlsd(seed=3)
    state = original.state_dict()
    pth = tmp_path / "pth" / WEIGHT_NAME
    pth.parent.mkdir()
    torch.save(state, pth)
    safetensors = tmp_path / "mlsd.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, safetensors)
    old_style = tmp_path / "no_counters.pth"  # files without BatchNorm step counters load too
    torch.save({key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}, old_style)
    monkeypatch.setenv("CONTROLKIT_MODELS", str(pth.parent))
    expected = np.asarray(MlsdPreprocessor(model="mlsd", network=original, detect_resolution=128)(photo))
    assert expected.any()
    for weights in (pth, safetensors, old_style, pth.parent, None):
        loaded = get_preprocessor("mlsd", model="mlsd", weights=weights, detect_resolution=128)
        assert all(torch.equal(loaded.network.state_dict()[key], value) for key, value in state.items())
        np.testing.assert_array_equal(np.asarray(loaded(photo)), expected)


def _tp_map(peaks: list[tuple[int, int, float, tuple[float, float, float, float]]], size: int = 16) -> torch.Tensor:
    """A (1, 9, size, size) tp map: centre logit -10 except at the peaks (y, x, logit, displacements)."""
    tp_map = torch.zeros(1, 9, size, size)
    tp_map[0, 0] = -10.0
    tp_map[0, 5:] = 7.0  # the channels after the displacements play no part
    for y, x, logit, displacement in peaks:
        tp_map[0, 0, y, x] = logit
        tp_map[0, 1:5, y, x] = torch.tensor(displacement)
    return tp_map


class FixedTpMap(nn.Module):
    """Returns a fixed tp map whatever the input, and records the inputs it was given."""

    def __init__(self, tp_map: torch.Tensor) -> None:
        super().__init__()
        self.tp_map = nn.Parameter(tp_map, requires_grad=False)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.tp_map


ONE_SEGMENT = [(5, 7, 2.0, (-3.0, 1.0, 4.0, -2.0))]  # centre (x 7, y 5) -> ends (4, 6) and (11, 3)


def test_decoder_turns_a_centre_and_its_displacements_into_the_segment():
    np.testing.assert_array_equal(decode_segments(_tp_map(ONE_SEGMENT)), [[4.0, 6.0, 11.0, 3.0]])


def test_pred_lines_doubles_and_scales_back_and_feeds_rgb_plus_ones():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    network = FixedTpMap(_tp_map(ONE_SEGMENT))
    np.testing.assert_array_equal(predict_segments(network, image), [[8.0, 12.0, 22.0, 6.0]])
    fed = network.inputs[0][0].numpy()
    assert fed.shape == (4, 32, 32)
    np.testing.assert_allclose(fed[:3], image.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_allclose(fed[3], 1 / 127.5 - 1.0, atol=1e-7)
    tall = np.zeros((36, 32, 3), dtype=np.uint8)  # runs at 32x32: y scaled back by 36 / 32
    np.testing.assert_allclose(predict_segments(network, tall), [[8.0, 13.5, 22.0, 6.75]])


def test_the_map_draws_the_decoded_segment_as_the_reference():
    import cv2

    preprocessor = MlsdPreprocessor(model="mlsd", network=FixedTpMap(_tp_map(ONE_SEGMENT)), detect_resolution=None)
    expected = np.zeros((32, 32), dtype=np.uint8)
    cv2.line(expected, (8, 12), (22, 6), 255, 1)
    np.testing.assert_array_equal(np.asarray(preprocessor(np.zeros((32, 32, 3), dtype=np.uint8)))[..., 0], expected)


def test_thresholds_suppression_and_top_k_filter_as_the_reference():
    peaks = [
        (5, 7, 3.0, (-3.0, 1.0, 4.0, -2.0)),   # score 0.95, length 7.6
        (5, 8, 2.0, (-1.0, 0.0, 1.0, 0.0)),    # a weaker 3x3 neighbour: suppressed
        (12, 3, -1.5, (0.0, -2.0, 0.0, 2.0)),  # score 0.18
        (12, 12, 1.0, (0.25, 0.0, -0.25, 0.0)),  # score 0.73, length 0.5
    ]
    tp_map = _tp_map(peaks)
    strong, faint, short = [4.0, 6.0, 11.0, 3.0], [3.0, 10.0, 3.0, 14.0], [12.25, 12.0, 11.75, 12.0]
    np.testing.assert_array_equal(decode_segments(tp_map), [strong, short, faint])  # best score first
    np.testing.assert_array_equal(decode_segments(tp_map, score_threshold=0.2), [strong, short])
    np.testing.assert_array_equal(decode_segments(tp_map, distance_threshold=0.5), [strong, faint])  # > is strict
    np.testing.assert_array_equal(decode_segments(tp_map, top_k=1), [strong])
    assert len(decode_segments(tp_map, score_threshold=1.0)) == 0
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    network = FixedTpMap(tp_map)
    kept = MlsdPreprocessor(model="mlsd", network=network, value_threshold=0.2, distance_threshold=1.0,
                            detect_resolution=None).segments(image)
    np.testing.assert_array_equal(kept, [[8.0, 12.0, 22.0, 6.0]])


def test_missing_or_wrong_weights_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLKIT_MODELS", str(tmp_path))
    errors = []
    with pytest.raises(WeightsNotFoundError, match=WEIGHT_NAME) as caught:
        get_preprocessor("mlsd", model="mlsd")
    errors.append(caught.value)
    with pytest.raises(WeightsNotFoundError, match=f"has no {WEIGHT_NAME}") as caught:
        get_preprocessor("mlsd", model="mlsd", weights=tmp_path)
    errors.append(caught.value)
    with pytest.raises(WeightsNotFoundError, match="does not exist") as caught:
        get_preprocessor("mlsd", model="mlsd", weights=str(tmp_path / "missing.pth"))
    errors.append(caught.value)
    state = MLSDLarge().state_dict()
    state["block24.weight"] = state.pop("block23.conv3.weight")
    wrong = tmp_path / "wrong.pth"
    torch.save(state, wrong)
    with pytest.raises(CheckpointError, match="block23.conv3.weight.*block24.weight") as caught:
        load_mlsd(wrong)
    errors.append(caught.value)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"object": FixedTpMap(torch.zeros(1))}, unsafe)
    with pytest.raises(UnsafeCheckpointError) as caught:
        get_preprocessor("mlsd", model="mlsd", weights=unsafe)
    errors.append(caught.value)
    assert all("\n" not in str(error) for error in errors)


@pytest.mark.parametrize(("params", "message"), [
    ({"model": "hough"}, "Unknown mlsd `model` 'hough'; use one of opencv, mlsd"),
    ({"weights": "mlsd.pth"}, "the 'opencv' detector takes no `weights`"),
    ({"value_threshold": "high"}, "parameter `value_threshold` must be a number"),
    ({"value_threshold": -0.1}, "`value_threshold` must be a number >= 0"),
    ({"distance_threshold": float("nan")}, "`distance_threshold` must be a number >= 0"),
    ({"model": "mlsd", "weights": 3}, "parameter `weights` must be a string or a path or none"),
])
def test_bad_parameters_are_one_line_errors(params, message):
    with pytest.raises(ValueError, match=message) as caught:
        get_preprocessor("mlsd", **params)
    assert "\n" not in str(caught.value)


def test_the_constructor_pairs_model_and_network():
    with pytest.raises(ValueError, match="model 'mlsd' needs its network: use MlsdPreprocessor.create"):
        MlsdPreprocessor(model="mlsd")
    with pytest.raises(ValueError, match="the 'opencv' detector has no network"):
        MlsdPreprocessor(network=MLSDLarge())
    assert MlsdPreprocessor.check_ready() is None  # the default needs no weights
