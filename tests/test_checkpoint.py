"""Checkpoints: every format loads bitwise, metadata travels, bad and malicious files get clear errors."""

from __future__ import annotations

import json
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from controlkit.checkpoint import (
    DIFFUSERS_FILE,
    DIFFUSERS_FOLDER,
    ORIGINAL,
    ORIGINAL_FULL,
    inspect_checkpoint,
    load_controlnet,
    save_controlnet,
)
from controlkit.controlnet import ConditionMetadata, build_controlnet
from controlkit.errors import CheckpointError, UnsafeCheckpointError, WeightsNotFoundError
from controlkit.original_format import to_original
from controlkit.tiny import TinyConfig, build_components

torch.set_num_threads(2)

CANNY = ConditionMetadata(condition="canny", preprocessor="canny",
                          preprocessor_params={"low_threshold": 100, "high_threshold": 200})


@pytest.fixture(scope="module")
def unet():
    return build_components(TinyConfig(), seed=0)["unet"].eval()


@pytest.fixture(scope="module")
def controlnet(unet):
    """A ControlNet for the tiny U-Net with every weight non-zero (so a wrong mapping cannot hide)."""
    model = build_controlnet(unet).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def _assert_same_weights(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def _residuals(model):
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 32, 32, generator=generator)
    text = torch.randn(1, 5, 32, generator=generator)
    condition = torch.rand(1, 3, 256, 256, generator=generator)
    with torch.no_grad():
        down, mid = model(sample, torch.tensor([99]), text, controlnet_cond=condition, return_dict=False)
    return torch.cat([r.flatten() for r in (*down, mid)])


def _original_dict(controlnet, prefix="control_model."):
    return {k: v.clone() for k, v in to_original(controlnet.state_dict(), controlnet.config, prefix=prefix).items()}


# -- formats that load --------------------------------------------------------------------------------------------

def test_diffusers_folder_round_trip_keeps_weights_and_metadata(controlnet, unet, tmp_path):
    from diffusers import ControlNetModel

    folder = save_controlnet(controlnet, tmp_path / "canny", CANNY)
    config = json.loads((folder / "config.json").read_text())
    assert config["_controlkit"]["preprocessor_params"] == {"low_threshold": 100, "high_threshold": 200}
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as reader:
        header = reader.metadata()
    assert json.loads(header["controlkit"])["condition"] == "canny" and header["format"] == "pt"
    model, metadata = load_controlnet(folder, unet=unet)
    assert metadata == CANNY
    _assert_same_weights(model, controlnet)
    assert torch.equal(_residuals(model), _residuals(controlnet))
    _assert_same_weights(ControlNetModel.from_pretrained(folder), controlnet)  # plain diffusers reads it too


def test_pipeline_folder_sharded_and_bin_folders_load(controlnet, tmp_path):
    save_controlnet(controlnet, tmp_path / "pipeline" / "controlnet", CANNY)
    model, metadata = load_controlnet(tmp_path / "pipeline")
    assert metadata.condition == "canny"
    _assert_same_weights(model, controlnet)
    controlnet.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _assert_same_weights(load_controlnet(tmp_path / "sharded")[0], controlnet)
    controlnet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    _assert_same_weights(load_controlnet(tmp_path / "bin")[0], controlnet)


def test_diffusers_single_file_without_config(controlnet, unet, tmp_path):
    path = tmp_path / "controlnet.safetensors"
    save_file(dict(controlnet.state_dict()), str(path))
    model, metadata = load_controlnet(path, unet=unet)  # attention settings come from the U-Net
    assert metadata == ConditionMetadata()
    _assert_same_weights(model, controlnet)
    assert torch.equal(_residuals(model), _residuals(controlnet))
    info = inspect_checkpoint(path)
    assert info.format == DIFFUSERS_FILE and not info.config_stored


def test_original_export_round_trip_is_bitwise_and_keeps_metadata(controlnet, unet, tmp_path):
    path = save_controlnet(controlnet, tmp_path / "control.safetensors", CANNY, original=True)
    assert all(key.startswith("control_model.") for key in load_file(path))
    model, metadata = load_controlnet(path)
    assert metadata == CANNY
    _assert_same_weights(model, controlnet)
    assert torch.equal(_residuals(model), _residuals(controlnet))
    back = save_controlnet(model, tmp_path / "back", metadata)
    _assert_same_weights(load_controlnet(back, unet=unet)[0], controlnet)


@pytest.mark.parametrize("name, prefix", [("control_v11p_sd15_canny.pth", "control_model."),
                                          ("control_v11p_sd15_canny.safetensors", "control_model."),
                                          ("bare_keys.pth", "")])
def test_original_control_only_files_load(controlnet, unet, tmp_path, name, prefix):
    path = tmp_path / name
    state = _original_dict(controlnet, prefix)
    save_file(state, str(path)) if name.endswith(".safetensors") else torch.save(state, path)
    model, metadata = load_controlnet(path, unet=unet)
    _assert_same_weights(model, controlnet)
    assert torch.equal(_residuals(model), _residuals(controlnet))
    assert metadata.condition == ("canny" if "canny" in name else None)
    assert inspect_checkpoint(path).format == ORIGINAL


def test_original_full_model_file_keeps_only_the_controlnet(controlnet, unet, tmp_path):
    state = _original_dict(controlnet)
    state.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 4)
    path = tmp_path / "control_sd15_canny.pth"
    torch.save(state, path)
    model, metadata = load_controlnet(path, unet=unet)
    _assert_same_weights(model, controlnet)
    assert metadata.condition == "canny"
    assert inspect_checkpoint(path).format == ORIGINAL_FULL


def test_shuffle_file_name_sets_global_pooling(controlnet, unet, tmp_path):
    path = tmp_path / "control_v11e_sd15_shuffle.pth"
    torch.save(_original_dict(controlnet), path)
    model, metadata = load_controlnet(path, unet=unet)
    assert metadata.condition == "shuffle" and metadata.global_pooling and metadata.conditional_only
    assert model.config.global_pool_conditions
    folder = save_controlnet(model, tmp_path / "shuffle", metadata)
    assert json.loads((folder / "config.json").read_text())["global_pool_conditions"] is True


def test_dtype_follows_the_request_then_the_unet(controlnet, unet, tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in _original_dict(controlnet).items()}, str(path))
    assert next(load_controlnet(path)[0].parameters()).dtype == torch.float16
    assert next(load_controlnet(path, unet=unet)[0].parameters()).dtype == torch.float32
    model, _ = load_controlnet(path, torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_inspect_reports_format_size_and_family(controlnet, tmp_path):
    folder = save_controlnet(controlnet, tmp_path / "canny", CANNY)
    info = inspect_checkpoint(folder)
    assert info.format == DIFFUSERS_FOLDER and info.metadata_source == "stored" and info.config_stored
    assert info.parameter_count == sum(p.numel() for p in controlnet.parameters())
    assert info.tensor_count == len(controlnet.state_dict()) and info.dtype == "float32"
    assert info.family == "custom (cross-attention 32)" and info.cross_attention_dim == 32


# -- wrong base, damaged and wrong files ---------------------------------------------------------------------------

def test_checkpoint_for_a_different_base_is_refused(controlnet, unet, tmp_path):
    from diffusers import UNet2DConditionModel

    path = save_controlnet(controlnet, tmp_path / "control.safetensors", CANNY, original=True)
    wider = UNet2DConditionModel.from_config(unet.config, cross_attention_dim=48)
    with pytest.raises(CheckpointError, match=r"checkpoint is for a different base: .*attn2\.to_k\.weight: "
                                              r"\(64, 32\) in the ControlNet, \(64, 48\) in the U-Net"):
        load_controlnet(path, unet=wider)
    deeper = UNet2DConditionModel.from_config(
        unet.config, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
    )
    with pytest.raises(CheckpointError, match=r"different base: .* absent in the ControlNet"):
        load_controlnet(path, unet=deeper)


def test_missing_and_unexpected_keys_are_listed(controlnet, tmp_path):
    state = _original_dict(controlnet)
    del state["control_model.zero_convs.1.0.weight"], state["control_model.zero_convs.1.0.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"2 missing \(controlnet_down_blocks\.1\.bias, "
                                              r"controlnet_down_blocks\.1\.weight\), 0 unexpected"):
        load_controlnet(tmp_path / "missing.pth")
    state = _original_dict(controlnet)
    state["control_model.lora_up.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"1 original keys have no counterpart.*lora_up\.weight"):
        load_controlnet(tmp_path / "extra.pth")


def test_shape_mismatch_with_the_stored_config(controlnet, tmp_path):
    folder = save_controlnet(controlnet, tmp_path / "canny", CANNY)
    config = json.loads((folder / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensors have the wrong shape, first .*: \(64, 32\) in the file, "
                                              r"\(64, 48\) in the model"):
        load_controlnet(folder)


def test_non_finite_weights_are_refused(controlnet, tmp_path):
    state = _original_dict(controlnet)
    state["control_model.middle_block_out.0.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 tensors hold NaN or Inf .*controlnet_mid_block\.weight"):
        load_controlnet(tmp_path / "nan.safetensors")


def _write_bad_files(directory, controlnet):
    """name -> (path, message pattern) for every kind of file that is not a usable checkpoint."""
    good = directory / "good.safetensors"
    save_file(_original_dict(controlnet), str(good))
    data = good.read_bytes()
    zipped = directory / "good.pth"
    torch.save(_original_dict(controlnet), zipped)
    legacy = directory / "legacy.pth"
    torch.save(_original_dict(controlnet), legacy, _use_new_zipfile_serialization=False)
    files = {
        "lfs.safetensors": (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 1445157124\n",
                            "is a Git LFS pointer"),
        "lfs.ckpt": (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 5710753329\n",
                     "is a Git LFS pointer"),
        "page.safetensors": (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>", "is an HTML page"),
        "empty.pth": (b"", r"is empty \(0 bytes\)"),
        "cut.safetensors": (data[: len(data) * 6 // 10], "is truncated"),
        "cut.pth": (zipped.read_bytes()[:-2000], "is truncated or corrupt"),
        "cut_legacy.pth": (legacy.read_bytes()[:50_000], "is corrupt or truncated"),
        "renamed_pickle.safetensors": (zipped.read_bytes(), "is named .safetensors but holds a PyTorch pickle"),
        "config.safetensors": (b'{"_class_name": "ControlNetModel"}', "is a JSON document"),
        "noise.bin": (bytes(range(7, 200)), "is not a weights file"),
    }
    for name, (content, _) in files.items():
        (directory / name).write_bytes(content)
    return {name: message for name, (_, message) in files.items()}


def test_bad_files_get_one_clear_line(controlnet, tmp_path):
    for name, message in _write_bad_files(tmp_path, controlnet).items():
        with pytest.raises(CheckpointError, match=message) as caught:
            load_controlnet(tmp_path / name)
        text = str(caught.value)
        assert "\n" not in text and str(tmp_path / name) in text, name
        assert "weights_only" not in text and "False" not in text  # never steer to the unsafe path


def test_not_a_controlnet(unet, tmp_path):
    torch.save({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}, tmp_path / "sd15.ckpt")
    with pytest.raises(CheckpointError, match="Stable Diffusion checkpoint without ControlNet weights"):
        load_controlnet(tmp_path / "sd15.ckpt")
    save_file({"lora_unet_down.weight": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="not a ControlNet checkpoint"):
        load_controlnet(tmp_path / "lora.safetensors")
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(CheckpointError, match="describes a UNet2DConditionModel, not a ControlNetModel"):
        load_controlnet(tmp_path / "unet")


def test_missing_weights(controlnet, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_controlnet(tmp_path / "nowhere.safetensors")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(WeightsNotFoundError, match="without config.json"):
        load_controlnet(tmp_path / "empty_folder")
    controlnet.save_config(tmp_path / "config_only")
    with pytest.raises(WeightsNotFoundError, match="has config.json but no weights"):
        load_controlnet(tmp_path / "config_only")


# -- pickles never run code ----------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs `exec`, which writes a marker file: proof of code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


class _Unknown:
    pass


def _malicious_files(directory, marker):
    weights = {"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}
    raw = pickle.dumps({"epoch": 3, "hook": _Payload(marker)}, protocol=2)
    (directory / "raw.pth").write_bytes(raw)
    torch.save({"state_dict": weights, "hook": _Payload(marker)}, directory / "zip.ckpt")
    torch.save({"state_dict": weights, "hook": _Payload(marker)}, directory / "legacy.pt",
               _use_new_zipfile_serialization=False)
    (directory / "disguised.safetensors").write_bytes((directory / "zip.ckpt").read_bytes())
    return raw


@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_malicious_pickle_never_runs(tmp_path, monkeypatch, force_unsafe_env):
    marker = tmp_path / "marker.txt"
    raw = _malicious_files(tmp_path, marker)
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for name in ("raw.pth", "zip.ckpt", "legacy.pt"):
        with pytest.raises(UnsafeCheckpointError,
                           match=r"refused as unsafe: unpickling it would need (builtins\.)?exec,"):
            load_controlnet(tmp_path / name)
    with pytest.raises(CheckpointError, match="disguised pickle"):
        load_controlnet(tmp_path / "disguised.safetensors")
    with pytest.raises(UnsafeCheckpointError):
        inspect_checkpoint(tmp_path / "zip.ckpt")
    assert not marker.exists()
    pickle.loads(raw)  # the payload is real: plain unpickling of the same bytes runs it
    assert marker.read_text() == "ran"


def _fake_lightning_module(monkeypatch):
    """A stand-in `pytorch_lightning` so that a Lightning-style checkpoint can be written here."""
    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score = "val/loss", None

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint.__module__ = names[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    return ModelCheckpoint, names


def test_lightning_checkpoint_with_harmless_globals_loads(controlnet, unet, tmp_path, monkeypatch):
    model_checkpoint, names = _fake_lightning_module(monkeypatch)
    checkpoint = {"state_dict": _original_dict(controlnet), "global_step": np.int64(1200), "epoch": 3,
                  "callbacks": {"ModelCheckpoint": model_checkpoint()}}
    torch.save(checkpoint, tmp_path / "trained.ckpt")
    for name in names:
        monkeypatch.delitem(sys.modules, name)  # loading must not need (or import) Lightning
    model, _ = load_controlnet(tmp_path / "trained.ckpt", unet=unet)
    _assert_same_weights(model, controlnet)
    assert "pytorch_lightning" not in sys.modules


def test_unknown_globals_are_named(controlnet, tmp_path):
    torch.save({"state_dict": _original_dict(controlnet), "extra": _Unknown()}, tmp_path / "odd.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"would need test_checkpoint\._Unknown"):
        load_controlnet(tmp_path / "odd.ckpt")


def test_pickles_are_refused_on_a_torch_without_a_safe_unpickler(controlnet, tmp_path, monkeypatch):
    torch.save(_original_dict(controlnet), tmp_path / "control.pth")
    save_file(_original_dict(controlnet), str(tmp_path / "control.safetensors"))
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(UnsafeCheckpointError, match="torch 2.5.1 cannot unpickle safely"):
        load_controlnet(tmp_path / "control.pth")
    assert load_controlnet(tmp_path / "control.safetensors")[0] is not None  # safetensors needs no unpickler


def test_damaged_configs_are_reported(controlnet, tmp_path):
    folder = save_controlnet(controlnet, tmp_path / "canny", CANNY)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_controlnet(folder)
    state = _original_dict(controlnet)
    save_file(state, str(tmp_path / "odd.safetensors"), metadata={"controlkit_config": "[1, 2]"})
    with pytest.raises(CheckpointError, match="the stored config is not a JSON object"):
        load_controlnet(tmp_path / "odd.safetensors")


def test_model_global_pooling_is_kept_when_saving(unet, tmp_path):
    from diffusers import ControlNetModel

    config = {k: v for k, v in build_controlnet(unet).config.items() if not k.startswith("_")}
    pooled = ControlNetModel.from_config({**config, "global_pool_conditions": True})
    assert pooled.config.global_pool_conditions
    folder = save_controlnet(pooled, tmp_path / "pooled", ConditionMetadata(condition="shuffle"))
    model, metadata = load_controlnet(folder)
    assert model.config.global_pool_conditions and metadata.global_pooling
