"""Untrusted checkpoint files are bounded before anything is allocated: configs, JSON nesting, safetensors headers,
sharded indexes and pickles each get one line naming the problem, never a traceback, never a model built first."""

from __future__ import annotations

import json
import pickle
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from controlkit.checkpoint import empty_base_unet, load_controlnet, save_controlnet
from controlkit.cli import main
from controlkit.controlnet import ConditionMetadata, build_controlnet
from controlkit.errors import CheckpointError, UnsafeCheckpointError
from controlkit.model_config import MAX_PARAMETERS, check_model_config
from controlkit.original_format import to_original
from controlkit.tiny import TinyConfig, build_components

TINY_MODELS = True
DEEP = 100_000  # nesting that overflows any recursive JSON reader


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ControlNet saved as a diffusers folder, its U-Net saved as a base folder, and the model itself."""
    root = tmp_path_factory.mktemp("bounds")
    unet = build_components(TinyConfig(), seed=0)["unet"]
    controlnet = build_controlnet(unet)
    save_controlnet(controlnet, root / "cn", ConditionMetadata(condition="canny"))
    unet.save_config(root / "base" / "unet")
    return root, controlnet


def _folder_with_config(tiny, tmp_path, **changes):
    root, _ = tiny
    folder = tmp_path / "cn"
    folder.mkdir()
    config = json.loads((root / "cn" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (root / "cn" / "diffusion_pytorch_model.safetensors").read_bytes())
    return folder


def _safetensors(path, header, data=b""):
    """A safetensors file with exactly this header (a dict, or raw JSON text) and data."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# -- configs: checked before any model is built --------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"layers_per_block": 10**6}, r"`layers_per_block` is 1000000; a ControlNet has 1 to 16 layers per block"),
    ({"block_out_channels": [100_000, 100_000]},
     r"`block_out_channels` is \[100000, 100000\]; a ControlNet has 1 to 8,192 channels per level"),
    ({"norm_num_groups": 0}, r"`norm_num_groups` is 0; a ControlNet has 1 to 8,192 normalisation groups"),
    ({"norm_num_groups": 3}, r"needs channels divisible by `norm_num_groups` \(3\)"),
    ({"down_block_types": ["DownBlock2D"]}, r"`down_block_types` .* one block type name per level \(2\)"),
    ({"layers_per_block": "2"}, r"`layers_per_block` is \"2\""),
    ({"transformer_layers_per_block": 32, "layers_per_block": 16, "down_block_types": ["CrossAttnDownBlock2D"] * 2},
     r"`transformer_layers_per_block` is 32, 1056 transformer blocks in all; a ControlNet has at most 700"),
    ({"block_out_channels": [8192] * 8, "down_block_types": ["CrossAttnDownBlock2D"] * 8,
      "transformer_layers_per_block": 8}, r"about \d+ billion parameters, more than the 26 billion accepted"),
    ({"sample_size": 10**12}, r"`sample_size` is 1000000000000; no size in a model config is above 65,536"),
])
def test_absurd_folder_configs_are_refused_before_building(tiny, tmp_path, changes, message):
    folder = _folder_with_config(tiny, tmp_path, **changes)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as caught:
        load_controlnet(folder)
    assert time.perf_counter() - started < 2  # building first would take minutes (or the OOM killer)
    assert _one_line(caught).startswith(f"{folder / 'config.json'}: ")


def test_absurd_config_in_a_safetensors_header_is_refused(tiny, tmp_path):
    _, controlnet = tiny
    config = {k: v for k, v in controlnet.config.items() if not k.startswith("_")}
    path = tmp_path / "control.safetensors"
    save_file(to_original(controlnet.state_dict(), config), str(path),
              metadata={"controlkit_config": json.dumps({**config, "layers_per_block": 10**6})})
    with pytest.raises(CheckpointError, match=r"the stored config: `layers_per_block` is 1000000"):
        load_controlnet(path)


def test_absurd_unet_config_is_refused_before_building(tiny, tmp_path):
    root, _ = tiny
    config = json.loads((root / "base" / "unet" / "config.json").read_text())
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 10**5]}))
    with pytest.raises(CheckpointError, match=r"`block_out_channels` is \[32, 100000\]; a U-Net has 1 to 8,192"):
        empty_base_unet(tmp_path)
    assert list(empty_base_unet(root / "base").config.block_out_channels) == [32, 64]


def test_implied_parameter_count_is_diffusers_count(tiny):
    """The arithmetic count equals the real one, so the bound means what it says (SD-size models: see
    tests/test_original_format.py's configs, checked on the meta device there)."""
    root, controlnet = tiny
    config = json.loads((root / "cn" / "config.json").read_text())
    assert check_model_config(config, "cn") == sum(p.numel() for p in controlnet.parameters())
    with pytest.raises(CheckpointError, match="more than the 0 billion accepted"):
        check_model_config(config, "cn", max_parameters=1000)
    assert MAX_PARAMETERS == 26_000_000_000


def test_weights_naming_absurd_blocks_are_refused(tiny, tmp_path):
    """A file without a config: the layout read from its key names is bounded too, and odd shapes are one line."""
    _, controlnet = tiny
    state = {k: v.clone() for k, v in controlnet.state_dict().items()}
    state["down_blocks.0.resnets.9999.conv1.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "many.safetensors"))
    with pytest.raises(CheckpointError, match=r"its weights name 2 levels of 10000 layers \(at most 8 of 16\)"):
        load_controlnet(tmp_path / "many.safetensors")
    state = {k: v.clone() for k, v in controlnet.state_dict().items()}
    state["conv_in.weight"] = torch.zeros(32)
    save_file(state, str(tmp_path / "flat.safetensors"))
    with pytest.raises(CheckpointError, match=r"conv_in\.weight has shape \(32,\), a ControlNet's has 4 dimensions"):
        load_controlnet(tmp_path / "flat.safetensors")


# -- JSON nesting, header types ------------------------------------------------------------------------------------

def test_deeply_nested_json_is_one_line_everywhere(tiny, tmp_path):
    deep = '{"a":' * DEEP + "1" + "}" * DEEP
    folder = _folder_with_config(tiny, tmp_path)
    (folder / "config.json").write_text(deep)
    with pytest.raises(CheckpointError, match=r"config\.json is nested more than 32 levels deep") as caught:
        load_controlnet(folder)
    _one_line(caught)
    with pytest.raises(CheckpointError, match=r"the safetensors header is nested more than 32 levels deep"):
        load_controlnet(_safetensors(tmp_path / "deep.safetensors", deep))
    _, controlnet = tiny
    state = to_original(controlnet.state_dict(), controlnet.config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "meta.safetensors"),
              metadata={"controlkit": deep})
    with pytest.raises(CheckpointError, match=r"condition metadata is nested more than 32 levels deep"):
        load_controlnet(tmp_path / "meta.safetensors")


def test_oversized_json_and_headers_are_refused_by_their_size(tiny, tmp_path):
    folder = _folder_with_config(tiny, tmp_path)
    with (folder / "config.json").open("r+b") as handle:
        handle.truncate(17 * 2**20)  # sparse: nothing is written, and nothing may be read
    with pytest.raises(CheckpointError, match=r"config\.json is 17,825,792 bytes, more than the 16,777,216"):
        load_controlnet(folder)
    path = tmp_path / "huge_header.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(CheckpointError, match=r"header length 1,099,511,627,776 bytes, at most 33,554,432"):
        load_controlnet(path)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [1], "data_offsets": "ab"}, r"has data_offsets \"ab\", not \[begin, end\]"),
    ({"dtype": "F32", "shape": [1], "data_offsets": {"a": 0, "b": 4}}, r"has data_offsets \{\"a\": 0, \"b\": 4\}"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}, r"has data_offsets \[0, \"4\"\]"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, r"not \[begin, end\] with 0 <= begin <= end"),
    ({"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}, r"has shape \"1\", not a list of non-negative"),
    ({"dtype": 3, "shape": [1], "data_offsets": [0, 4]}, r"must be an object with a string dtype"),
    ([0, 4], r"must be an object with a string dtype"),
])
def test_header_entries_of_the_wrong_json_type(tmp_path, entry, message):
    path = _safetensors(tmp_path / "odd.safetensors", {"weight": entry}, b"\0" * 4)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_controlnet(path)
    assert _one_line(caught).startswith(f"{path}: the safetensors header entry 'weight' ")
    path = _safetensors(tmp_path / "meta.safetensors", {"__metadata__": {"controlkit": {"a": 1}}})
    with pytest.raises(CheckpointError, match="'__metadata__' must map strings to strings"):
        load_controlnet(path)


# -- sharded indexes stay inside their folder ----------------------------------------------------------------------

def _sharded(tiny, tmp_path, weight_map=None):
    _, controlnet = tiny
    folder = tmp_path / "sharded"
    controlnet.save_pretrained(folder, max_shard_size="300KB")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if weight_map is not None:
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, index


@pytest.mark.parametrize("shard", ["../secret.safetensors", "/tmp/secret.safetensors", "sub/../../secret.safetensors",
                                   "..", "C:\\secret.safetensors"])
def test_an_index_pointing_outside_its_folder_is_refused_unread(tiny, tmp_path, shard):
    (tmp_path / "secret.safetensors").write_text("SECRET-TOKEN-1234 not weights")
    folder, _ = _sharded(tiny, tmp_path, {"conv_in.weight": shard})
    with pytest.raises(CheckpointError, match="which is not a file next to the index") as caught:
        load_controlnet(folder)
    assert "SECRET" not in _one_line(caught)


def test_index_entries_of_the_wrong_type_and_missing_tensors(tiny, tmp_path):
    folder, index = _sharded(tiny, tmp_path)
    weight_map = json.loads(index.read_text())["weight_map"]
    index.write_text(json.dumps({"weight_map": {**weight_map, "conv_in.weight": 5}}))
    with pytest.raises(CheckpointError, match=r"weight_map entry 'conv_in\.weight' is 5, not a shard file name"):
        load_controlnet(folder)
    index.write_text(json.dumps({"weight_map": {**weight_map, "extra.weight": weight_map["conv_in.weight"]}}))
    with pytest.raises(CheckpointError, match=r"lists 1 tensors that .* does not hold \(extra\.weight\)"):
        load_controlnet(folder)
    index.write_text(json.dumps({"weight_map": [1, 2]}))
    with pytest.raises(CheckpointError, match="has no weight_map"):
        load_controlnet(folder)
    index.write_text(json.dumps({"weight_map": weight_map}))
    assert load_controlnet(folder)[0] is not None  # the genuine index still loads


# -- pickles: refused as unsafe, never advice to run them ----------------------------------------------------------

class _Reduce:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reduce_pickles_are_refused_as_unsafe_at_every_protocol(tmp_path, protocol):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": {}, "hook": _Reduce(marker)}, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError, match=r"refused as unsafe: unpickling it would need builtins\.exec,"
                                                    r" .*nothing from it was run") as caught:
        load_controlnet(path)
    text = _one_line(caught)
    assert "corrupt" not in text and "weights_only" not in text and "False" not in text
    assert not marker.exists()


def test_a_pickle_protocol_the_safe_reader_cannot_run_is_named(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "p4.pth", pickle_protocol=4)
    with pytest.raises(UnsafeCheckpointError, match=r"its pickle \(protocol 4\) uses FRAME, .* instructions the "
                                                    r"weights-only reader does not run") as caught:
        load_controlnet(tmp_path / "p4.pth")
    assert "weights_only" not in _one_line(caught)


def test_damaged_pickles_never_leak_a_traceback(tmp_path):
    """Every cut of a legacy and a zip checkpoint, and flipped bytes: one CheckpointError line each."""
    import random

    torch.save({"a": torch.zeros(10)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"a": torch.zeros(10)}, tmp_path / "zip.pth")
    rng = random.Random(0)
    for name in ("legacy.pth", "zip.pth"):
        data = (tmp_path / name).read_bytes()
        cases = [data[:cut] for cut in range(9, len(data), 37)]
        for _ in range(40):
            flipped = bytearray(data)
            flipped[rng.randrange(len(data))] = rng.randrange(256)
            cases.append(bytes(flipped))
        for case in cases:
            (tmp_path / "case.pth").write_bytes(case)
            try:
                load_controlnet(tmp_path / "case.pth")
            except CheckpointError as error:
                assert "\n" not in str(error) and "weights_only" not in str(error), str(error)


# -- the command line: exit 1, one line --------------------------------------------------------------------------

def test_hostile_files_through_the_command_line(tiny, tmp_path, capsys):
    folder = _folder_with_config(tiny, tmp_path, layers_per_block=10**6)
    deep = _safetensors(tmp_path / "deep.safetensors", '{"a":' * DEEP + "1" + "}" * DEEP)
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"hook": _Reduce(tmp_path / "ran.txt")}, protocol=4))
    root, _ = tiny
    for argv, message in [
        (["info", tmp_path / "evil.pth"], "was refused as unsafe: unpickling it would need builtins.exec"),
        (["info", folder], "`layers_per_block` is 1000000; a ControlNet has 1 to 16 layers per block"),
        (["convert", folder, tmp_path / "out", "--to", "diffusers"], "`layers_per_block` is 1000000"),
        (["info", deep], "is nested more than 32 levels deep"),
        (["info", root / "cn", "--base", folder], "`layers_per_block` is 1000000; a U-Net has 1 to 16"),
    ]:
        status = main([str(arg) for arg in argv])
        out, err = capsys.readouterr()
        assert status == 1 and out == "" and err.startswith("error: ") and message in err, (argv, err)
        assert err.count("\n") == 1  # no warning from torch either
    assert not (tmp_path / "out").exists() and not (tmp_path / "ran.txt").exists()
