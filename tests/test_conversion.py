"""`controlkit.conversion` (a ControlNet from one format to the other, metadata updated) and `controlkit.devices`
(device and dtype from their names)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from controlkit.checkpoint import load_controlnet, save_controlnet
from controlkit.controlnet import ConditionMetadata, build_controlnet
from controlkit.conversion import conversion_target, convert_controlnet
from controlkit.devices import device_and_dtype, torch_dtype
from controlkit.errors import ConfigError

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def folder(components, tmp_path_factory):
    """A diffusers ControlNet folder with random weights and canny metadata."""
    controlnet = build_controlnet(components["unet"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    metadata = ConditionMetadata(condition="canny", preprocessor="canny", preprocessor_params={"low_threshold": 50})
    return save_controlnet(controlnet, tmp_path_factory.mktemp("convert") / "canny", metadata)


def test_to_original_in_a_folder_and_back_is_bitwise_with_updated_metadata(folder, tmp_path):
    result = convert_controlnet(folder, tmp_path, original=True, preprocessor_params={"high_threshold": 150},
                                base="SD1.x", force=True)  # a tiny layout: only controlkit and diffusers read it
    assert result.path == tmp_path / "canny.safetensors" and result.dtype == "float32"
    with safe_open(str(result.path), "pt") as reader:
        assert all(key.startswith("control_model.") for key in reader.keys())  # noqa: SIM118 (not a dict)
        stored = json.loads(reader.metadata()["controlkit"])
    assert stored["preprocessor_params"] == {"low_threshold": 50, "high_threshold": 150}
    assert (stored["condition"], stored["preprocessor"], stored["base"]) == ("canny", "canny", "SD1.x")
    assert result.metadata.preprocessor_params == stored["preprocessor_params"]
    back = convert_controlnet(result.path, tmp_path / "back", condition="edges")
    assert back.path == tmp_path / "back" and back.tensor_count == result.tensor_count
    before, after = load_file(folder / WEIGHTS), load_file(back.path / WEIGHTS)
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)
    assert len(before) == result.tensor_count
    _, metadata = load_controlnet(back.path)
    assert (metadata.condition, metadata.base) == ("edges", "SD1.x")


def test_a_dtype_converts_every_tensor(folder, tmp_path):
    result = convert_controlnet(folder, tmp_path / "half.safetensors", original=True, torch_dtype=torch.float16,
                                force=True)
    assert result.dtype == "float16"
    assert all(tensor.dtype == torch.float16 for tensor in load_file(result.path).values())


def test_destinations(folder, tmp_path):
    (tmp_path / "empty").mkdir()
    assert conversion_target(folder, tmp_path / "empty", original=False) == tmp_path / "empty"
    assert conversion_target("a/control_v11p.pth", tmp_path, original=True) == tmp_path / "control_v11p.safetensors"
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        convert_controlnet(folder, existing, original=True)
    assert existing.read_bytes() == b"keep me"
    assert conversion_target(folder, existing, original=True, overwrite=True) == existing
    with pytest.raises(ConfigError, match="ending in .safetensors"):
        conversion_target(folder, tmp_path / "model.pth", original=True)
    with pytest.raises(ConfigError, match="is a file"):
        conversion_target(folder, existing, original=False, overwrite=True)


def test_device_and_dtype_from_names():
    assert device_and_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert device_and_dtype("cuda:1", "auto") == (torch.device("cuda:1"), torch.float16)
    assert device_and_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert device_and_dtype()[0] == expected
    assert torch_dtype("float16") is torch.float16
    with pytest.raises(ConfigError, match="float32, float16, bfloat16"):
        torch_dtype("float64")


# -- exports A1111 and ComfyUI read the way we do --------------------------------------------------------------------

def test_a_layout_the_clients_cannot_load_needs_force(folder, tmp_path):
    target = tmp_path / "control_canny.safetensors"
    with pytest.raises(ConfigError, match=r"readable by A1111/ComfyUI: no: custom layout \(cross-attention 32, "
                                          r"channels 32/64, 1 layer per block\); .*Pass --force"):
        convert_controlnet(folder, target, original=True)
    assert not target.exists()
    result = convert_controlnet(folder, target, original=True, force=True)
    assert result.path == target and result.clients.startswith("no: custom layout")


def _clients_pool(path):
    """How ComfyUI (comfy/controlnet.py) and A1111 (sd-webui-controlnet) decide global pooling: the name only."""
    stem = path.name.rsplit(".", 1)[0]
    return stem.endswith(("_shuffle", "_shuffle_fp16")), "shuffle" in stem.lower()


@pytest.fixture(scope="module")
def pooled(components, tmp_path_factory):
    """A shuffle-style ControlNet (global pooling) saved as a diffusers folder named 'pooled'."""
    from diffusers import ControlNetModel

    config = {k: v for k, v in build_controlnet(components["unet"]).config.items() if not k.startswith("_")}
    model = ControlNetModel.from_config({**config, "global_pool_conditions": True})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    metadata = ConditionMetadata(condition="shuffle", global_pooling=True, conditional_only=True)
    return save_controlnet(model, tmp_path_factory.mktemp("pooled") / "pooled", metadata)


def test_a_pooled_export_carries_pooling_in_its_name(pooled, tmp_path):
    from diffusers import ControlNetModel

    from controlkit.original_format import from_original

    result = convert_controlnet(pooled, tmp_path, original=True, force=True)
    assert result.path == tmp_path / "pooled_shuffle.safetensors" and _clients_pool(result.path) == (True, True)
    assert any("global pooling: on" in note for note in result.notes)
    # a client building the model from the file name gets the residuals of our pooled model
    comfy_pools, _ = _clients_pool(result.path)
    config = {k: v for k, v in ControlNetModel.load_config(pooled).items() if not k.startswith("_")}
    as_client_reads = ControlNetModel.from_config({**config, "global_pool_conditions": comfy_pools}).eval()
    as_client_reads.load_state_dict(from_original(load_file(result.path)))
    ours, _ = load_controlnet(pooled)
    assert torch.equal(_residuals(as_client_reads), _residuals(ours))
    with pytest.raises(ConfigError, match=r"pooled\.safetensors: this ControlNet pools .* ends in _shuffle; name it "
                                          r"e\.g\. pooled_shuffle\.safetensors \(nothing was written\)"):
        convert_controlnet(pooled, tmp_path / "pooled.safetensors", original=True, force=True)
    assert not (tmp_path / "pooled.safetensors").exists()
    assert convert_controlnet(pooled, tmp_path / "mine_shuffle_fp16.safetensors", original=True, force=True,
                              torch_dtype=torch.float16).path.name == "mine_shuffle_fp16.safetensors"


def test_a_name_that_would_make_clients_pool_is_refused(folder, tmp_path):
    with pytest.raises(ConfigError, match="contains 'shuffle', so A1111 and ComfyUI would pool"):
        convert_controlnet(folder, tmp_path / "canny_shuffle.safetensors", original=True, force=True)
    assert not (tmp_path / "canny_shuffle.safetensors").exists()


def _residuals(model):
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 5, 32, generator=generator)
    image = torch.rand(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        down, mid = model(sample, torch.tensor([99]), text, controlnet_cond=image, return_dict=False)
    return torch.cat([r.flatten() for r in (*down, mid)])
