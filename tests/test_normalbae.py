"""NormalBAE's own port: the released architecture (sizes, names, TF padding), the loader, the preprocessor contract.

The full-size network (72 M parameters) is built once per module, randomly initialised, and run at small inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from controlkit.errors import CheckpointError
from preprocessors.nets.normalbae import INPUT_MULTIPLE, NormalBAE, load_normalbae, normalise_prediction
from preprocessors.nets.normalbae_encoder import SameConv2d, round_channels, same_padding
from preprocessors.normal import NormalPreprocessor
from preprocessors.registry import get_preprocessor

TINY_MODELS = True  # one torch thread (tests/conftest.py)

#: torchvision's published parameter count of EfficientNet-B5 (`EfficientNet_B5_Weights.IMAGENET1K_V1`, with its
#: 1000-class classifier): the same trunk as gen-efficientnet's tf_efficientnet_b5_ap, whose TF ports only change
#: padding and BatchNorm eps (timm's card for tf_efficientnet_b5.ap_in1k: 30.4 M).
EFFICIENTNET_B5_PARAMETERS = 30_389_784
#: This port's full count (72.4 M parameters; 72.6 M elements with the BatchNorm statistics the file also holds).
NORMALBAE_PARAMETERS = 72_422_336
NORMALBAE_STATE_ELEMENTS = 72_602_876


@pytest.fixture(scope="module")
def network() -> NormalBAE:
    torch.manual_seed(0)
    model = NormalBAE()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a load that skipped them would show
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def saved(network, tmp_path_factory):
    """The state dict as the released file stores it: {"model": state_dict}, pickled by torch.save."""
    path = tmp_path_factory.mktemp("bae") / "scannet.pt"
    torch.save({"model": network.state_dict()}, path)
    return path


def _photo(height: int, width: int) -> np.ndarray:
    return (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)


# ---- architecture ----------------------------------------------------------------------------------------------


def test_parameter_counts(network):
    encoder = sum(p.numel() for p in network.encoder.parameters())
    classifier = round_channels(1280) * 1000 + 1000  # the head the reference replaced by an identity
    assert encoder + classifier == EFFICIENTNET_B5_PARAMETERS
    assert sum(p.numel() for p in network.parameters()) == NORMALBAE_PARAMETERS
    assert sum(t.numel() for t in network.state_dict().values()) == NORMALBAE_STATE_ELEMENTS


def test_released_names_and_stage_depths(network):
    state = network.state_dict()
    trunk = network.encoder.original_model
    assert [len(stage) for stage in trunk.blocks] == [3, 5, 5, 7, 7, 9, 3]  # B0's 1,2,2,3,3,4,1 x 2.2, rounded up
    for key, shape in {
        "encoder.original_model.conv_stem.weight": (48, 3, 3, 3),
        "encoder.original_model.blocks.0.0.conv_dw.weight": (48, 1, 3, 3),
        "encoder.original_model.blocks.0.0.se.conv_reduce.weight": (12, 48, 1, 1),
        "encoder.original_model.blocks.0.0.conv_pw.weight": (24, 48, 1, 1),
        "encoder.original_model.blocks.1.0.conv_pw.weight": (144, 24, 1, 1),
        "encoder.original_model.blocks.1.0.se.conv_expand.bias": (144,),
        "encoder.original_model.blocks.2.0.conv_dw.weight": (240, 1, 5, 5),  # expands its input, 40 x 6
        "encoder.original_model.blocks.2.4.conv_dw.weight": (384, 1, 5, 5),
        "encoder.original_model.blocks.2.4.se.conv_reduce.weight": (16, 384, 1, 1),  # a quarter of 64 in
        "encoder.original_model.blocks.6.2.conv_pwl.weight": (512, 3072, 1, 1),
        "encoder.original_model.blocks.6.2.bn3.running_var": (512,),
        "encoder.original_model.conv_head.weight": (2048, 512, 1, 1),
        "encoder.original_model.bn2.num_batches_tracked": (),
        "decoder.conv2.weight": (2048, 2048, 1, 1),
        "decoder.up1._net.0.weight": (1024, 2048 + 176, 3, 3),
        "decoder.up4._net.4.running_mean": (128,),
        "decoder.out_conv_res8.weight": (4, 512, 3, 3),
        "decoder.out_conv_res4.0.weight": (128, 516, 1),
        "decoder.out_conv_res1.6.bias": (4,),
    }.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("classifier" in key or "module." in key for key in state)
    assert all(module.eps == 1e-3 for name, module in network.named_modules()
               if isinstance(module, torch.nn.BatchNorm2d) and name.startswith("encoder"))


def test_encoder_features_fit_the_decoder_at_512(network):
    with torch.no_grad():
        features = network.encoder(torch.zeros(1, 3, 512, 512))
    shapes = [tuple(f.shape[1:]) for f in features]
    assert shapes == [
        (48, 256, 256), (24, 256, 256), (40, 128, 128), (64, 64, 64), (128, 32, 32), (176, 32, 32),
        (304, 16, 16), (512, 16, 16), (2048, 16, 16),
    ]
    decoder = network.decoder  # the head and skips (stages 4, 2, 1, 0) give what each block concatenates
    assert decoder.conv2.in_channels == shapes[8][0]
    assert decoder.up1._net[0].in_channels == decoder.conv2.out_channels + shapes[5][0]
    assert decoder.up2._net[0].in_channels == decoder.up1._net[0].out_channels + shapes[3][0]
    assert decoder.up3._net[0].in_channels == decoder.up2._net[0].out_channels + shapes[2][0]
    assert decoder.up4._net[0].in_channels == decoder.up3._net[0].out_channels + shapes[1][0]
    # Each refinement doubles the previous level, which must land on the next skip's size: 64 -> 128 -> 256 -> 512.
    assert [shapes[i][1] * 2 for i in (3, 2, 1)] == [shapes[2][1], shapes[1][1], 512]


def test_encoder_matches_transformers_efficientnet_b5(network):
    """An independent EfficientNet-B5 (transformers', a port of the TF original) with this encoder's weights gives
    the same stage outputs. Its stride-2 padding is fixed at (k//2 - 1, k//2), which equals TF "SAME" on even
    sizes, so the input keeps every stage even."""
    from transformers import EfficientNetConfig, EfficientNetModel

    config = EfficientNetConfig(width_coefficient=1.6, depth_coefficient=2.2, hidden_dim=2048, image_size=64,
                                depthwise_padding=[])
    reference = EfficientNetModel(config).eval()
    trunk = network.encoder.original_model
    ours, theirs = trunk.state_dict(), reference.state_dict()
    assert len(ours) == len(theirs)  # same layers in the same order: copy by position
    for (our_key, value), (their_key, slot) in zip(ours.items(), theirs.items(), strict=True):
        assert value.shape == slot.shape, (our_key, their_key)
    reference.load_state_dict(dict(zip(theirs, ours.values(), strict=True)))
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = network.encoder(image)
        expected = reference(image, output_hidden_states=True)
    stage_ends = np.cumsum([len(stage) for stage in trunk.blocks])
    their_features = [expected.hidden_states[0]] + [expected.hidden_states[end] for end in stage_ends]
    for mine, their in zip(features[:-1], their_features, strict=True):
        torch.testing.assert_close(mine, their, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        head = F.silu(trunk.bn2(features[-1]))  # the reference decoder reads conv_head raw; transformers ends later
    torch.testing.assert_close(head, expected.last_hidden_state, rtol=1e-4, atol=1e-5)


def test_same_padding_matches_tensorflow():
    # TF "SAME": out = ceil(in / stride), total = max((out - 1) * stride + kernel - in, 0), extra after.
    assert same_padding(512, 3, 2) == (0, 1)
    assert same_padding(7, 3, 2) == (1, 1)
    assert same_padding(8, 5, 2) == (1, 2)
    assert same_padding(9, 5, 2) == (2, 2)
    assert same_padding(10, 1, 1) == (0, 0)
    torch.manual_seed(0)
    conv = SameConv2d(3, 4, 3, 2, bias=True)
    for height, width in ((8, 9), (7, 10)):
        image = torch.randn(1, 3, height, width)
        (top, bottom), (left, right) = same_padding(height, 3, 2), same_padding(width, 3, 2)
        direct = F.conv2d(F.pad(image, (left, right, top, bottom)), conv.weight, conv.bias, stride=2)
        output = conv(image)
        assert output.shape[-2:] == ((height + 1) // 2, (width + 1) // 2)
        torch.testing.assert_close(output, direct)
    even = torch.randn(1, 3, 8, 8)  # even input: PyTorch's symmetric padding=1 would shift every sample
    assert not torch.allclose(conv(even), F.conv2d(even, conv.weight, conv.bias, stride=2, padding=1))
    depthwise = SameConv2d(6, 6, 5, 1, groups=6)  # stride 1, odd kernel: plain symmetric padding
    assert depthwise.padding == (2, 2) and not depthwise.dynamic_padding


def test_predictions_are_unit_normals_at_every_level(network):
    with torch.no_grad():
        levels = network(torch.randn(1, 3, 64, 96))[0]
    assert [tuple(level.shape) for level in levels] == [(1, 4, 8, 12), (1, 4, 16, 24), (1, 4, 32, 48), (1, 4, 64, 96)]
    for level in levels:
        torch.testing.assert_close(level[:, :3].norm(dim=1), torch.ones_like(level[:, 0]))
        assert (level[:, 3] > 0.01).all()  # kappa = elu + 1.01
    raw = torch.tensor([[3.0, 0.0, -4.0, -50.0]]).reshape(1, 4, 1)
    torch.testing.assert_close(normalise_prediction(raw).flatten(), torch.tensor([0.6, 0.0, -0.8, 0.01]))


# ---- loading ---------------------------------------------------------------------------------------------------


def test_released_layout_loads_with_strict_checks(network, saved):
    loaded = load_normalbae(saved)
    for key, value in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not loaded.training
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image)[0][-1], network(image)[0][-1])


def test_wrong_keys_are_listed(network, tmp_path):
    state = network.state_dict()
    renamed = dict(state)
    renamed["decoder.conv2.kernel"] = renamed.pop("decoder.conv2.weight")
    torch.save({"model": renamed}, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match=r"missing keys decoder\.conv2\.weight.*unexpected keys decoder\.conv2"):
        load_normalbae(tmp_path / "renamed.pt")
    missing = {key: value for key, value in state.items() if not key.startswith("decoder.out_conv_res1.")}
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing keys decoder\.out_conv_res1\.0\.bias"):
        load_normalbae(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="not a torch.export or TorchScript export either"):
        get_preprocessor("normal", model="bae", weights=str(tmp_path / "missing.pt"))
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(CheckpointError, match="not a weights file"):
        load_normalbae(tmp_path / "text.pt")


def test_prefixed_and_counterless_files_load(network, tmp_path):
    """DataParallel's `module.` prefix is dropped; files without BatchNorm step counters still load."""
    state = {f"module.{key}": value for key, value in network.state_dict().items()
             if not key.endswith("num_batches_tracked")}
    torch.save({"model": state}, tmp_path / "old.pt")
    loaded = load_normalbae(tmp_path / "old.pt")
    torch.testing.assert_close(loaded.state_dict()["decoder.conv2.weight"], network.state_dict()["decoder.conv2.weight"])


# ---- the preprocessor ------------------------------------------------------------------------------------------


def test_preprocessor_contract_with_the_real_architecture(network):
    normal = NormalPreprocessor(bae=network, detect_resolution=64)
    photo = _photo(70, 100)
    first, second = np.asarray(normal(photo)), np.asarray(normal(photo))
    assert first.dtype == np.uint8 and first.shape == (70, 100, 3)
    assert np.array_equal(first, second)


def test_preprocessor_feeds_the_reference_input_and_reads_the_finest_level(network):
    normal = NormalPreprocessor(bae=network, detect_resolution=None)
    photo = _photo(40, 72)  # not multiples of 32: padded with edge pixels to 64 x 96, the map cropped back
    at_detect = normal.detect(photo)
    assert at_detect.shape == (40, 72, 3)
    padded = np.pad(photo, ((0, 24), (0, 24), (0, 0)), mode="edge")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    tensor = torch.from_numpy(((padded / 255.0 - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = network(tensor)[0][-1][0, :3, :40, :72]
    expected = (((expected + 1) * 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
    assert np.abs(at_detect.astype(int) - expected.astype(int)).max() <= 1


def test_create_loads_scannet_from_the_models_folder(network, saved, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "scannet.pt").symlink_to(saved)
    monkeypatch.setenv("CONTROLKIT_MODELS", str(models))
    from_folder = get_preprocessor("normal", model="bae", detect_resolution=INPUT_MULTIPLE * 2)
    assert from_folder.detect_resolution == 64
    assert isinstance(from_folder.bae, NormalBAE)
    assert not any(p.requires_grad for p in from_folder.bae.parameters())
    photo = _photo(64, 64)
    injected = NormalPreprocessor(bae=network, detect_resolution=64)
    assert np.array_equal(np.asarray(from_folder(photo)), np.asarray(injected(photo)))
    assert NormalPreprocessor.create(model="bae", weights=str(models)).detect_resolution == 512  # folder, "auto"
