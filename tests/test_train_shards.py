"""Training on WebDataset shards: disjoint shards per process and reader, the position in the stream as a function
of the step (DataLoader workers included), and an interrupted run that resumes bitwise."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from train_helpers import load_tensors, make_world, tiny_config

from training.data.batching import BatchLayout
from training.data.dataset import PairedDataset, collate_pairs, load_pairs
from training.data.shard_writer import pack_pairs
from training.data.shards import resolve_shards, shard_counts
from training.data.streaming import StreamSampler, plan_stream, reader_items
from training.engine.trainer import train

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(tiny base, manifest of 16 pairs, their shards: 6 shards of 3, 3, 3, 3, 3, 1 samples)."""
    root = tmp_path_factory.mktemp("world")
    base, manifest = make_world(root)
    index = pack_pairs(load_pairs(manifest), root / "shards", shard_size=3)
    return base, manifest, index


def _plan(index, processes, readers, buffer=4, seed=5):
    shards = resolve_shards(index)
    layout = BatchLayout(batch_size=2, num_processes=processes, accumulation=2)
    return plan_stream(shards, shard_counts(shards), layout, readers, seed, buffer), layout


def test_every_process_and_reader_reads_its_own_shards_each_epoch(world):
    plan, _ = _plan(world[2], processes=2, readers=3)
    for epoch in range(3):
        taken = [plan.epoch_shards(epoch, reader) for reader in range(plan.total_readers)]
        flat = [number for numbers in taken for number in numbers]
        assert sorted(flat) == list(range(6)) and all(taken)  # disjoint, all shards, none idle
    assert plan.epoch_shards(0, 0) != plan.epoch_shards(1, 0) or plan.epoch_shards(0, 1) != plan.epoch_shards(1, 1)
    for reader in range(plan.total_readers):  # what a reader yields comes from its shards only, each sample once
        shards = {plan.shards[number].name for number in plan.epoch_shards(0, reader)}
        length = plan.epoch_length(0, reader)
        keys = [pair.key for _, pair in zip(range(length), (item for _, item in reader_items(plan, reader, 0, True)))]
        assert {key.split(":")[0] for key in keys} == shards and len(set(keys)) == length
    with pytest.raises(Exception, match="6 non-empty shards, but 2 processes x 4 readers"):
        _plan(world[2], processes=2, readers=4)


def test_stream_batches_are_a_function_of_the_step_with_loader_workers(world):
    plan, layout = _plan(world[2], processes=1, readers=2)
    sampler = StreamSampler(plan, layout, num_workers=2)
    transform = PairedDataset([], resolution=16, seed=5)

    def prompts(first, last):
        return [batch["prompts"] for batch in sampler.loader(transform, first, last, 0, pin_memory=False)]

    # micro-batch K is read by reader K mod 2: two items at a time of that reader's stream, in order
    streams = [reader_items(plan, reader, 0, True) for reader in range(2)]
    expected = [[next(streams[micro % 2])[1].prompt for _ in range(2)] for micro in range(10)]
    assert prompts(0, 5) == expected
    assert prompts(2, 5) == expected[4:]  # a resumed loader starts exactly there
    assert sampler.state(2)["read"] == [4, 4]


def _stop_at(step):
    def on_step(done):
        if done == step:
            signal.raise_signal(signal.SIGTERM)
    return on_step


def test_an_interrupted_run_on_shards_resumes_bitwise(world, tmp_path):
    base, _, index = world
    settings = ("train.max_steps=6", "train.gradient_accumulation_steps=2", "data.num_workers=2",
                "data.shuffle_buffer=4", "data.proportion_empty_prompts=0.3", "data.center_crop=false")
    straight = train(tiny_config(base, index, tmp_path / "straight", *settings))
    stopped = train(tiny_config(base, index, tmp_path / "resumed", *settings), on_step=_stop_at(4))
    assert stopped.step == 4
    last = sorted((tmp_path / "resumed" / "checkpoints").iterdir())[-1]
    state = json.loads((last / "state.json").read_text())["data"]
    assert state["kind"] == "stream" and state["read"] == [8, 8] and state["readers"] == 2
    resumed = train(tiny_config(base, index, tmp_path / "resumed", *settings, "checkpoint.resume=latest"))
    assert resumed.losses == straight.losses[4:]
    name = "controlnet/diffusion_pytorch_model.safetensors"
    expected, actual = load_tensors(tmp_path / "straight" / name), load_tensors(tmp_path / "resumed" / name)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    changed = tiny_config(base, index, tmp_path / "resumed", *settings[:2], "data.num_workers=1", *settings[3:],
                          "checkpoint.resume=latest", "train.max_steps=7")
    with pytest.raises(Exception, match="data stream readers: 2 -> 1"):
        train(changed)


def test_a_damaged_shard_costs_its_samples_not_the_run(world, tmp_path):
    base, _, index = world
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in resolve_shards(index):
        data = open(shard.url, "rb").read()
        (folder / shard.name).write_bytes(data[:3000] if shard.name == "pairs-000002.tar" else data)
    (folder / "shards.json").write_text(index.read_text())
    result = train(tiny_config(base, folder, tmp_path / "run", "train.max_steps=8", "data.cache_encodings=false"))
    assert result.step == 8 and result.skipped_pairs > 0
    assert collate_pairs([None])["skipped"] == 1
