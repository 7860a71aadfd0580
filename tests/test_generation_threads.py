"""Generation leaves what the caller passed in as it was: several threads can share one loaded base and one
ControlNet and get exactly the images the same calls give one after the other, prompts are never tokenized by two
generations at once, and a ControlNet in another dtype than the base is refused in one line instead of being
converted behind the caller's back."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from conftest import trained_like_controlnet

from controlkit.control import Control
from controlkit.errors import ConfigError
from controlkit.pipeline import generate
from controlkit.sd_pipelines import pipeline_from_components
from controlkit.tiny import TINY_CONFIGS, build_components

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)

ROUNDS = 3
#: Two different generations (prompts, seeds, scales, modes, schedulers) that the threads run at the same time.
CALLS = (
    {"prompt": "a red sphere on the floor", "seed": 1, "scale": 1.0, "mode": "balanced", "scheduler": "unipc"},
    {"prompt": "two blue cubes and a green cone", "seed": 2, "scale": 0.6, "mode": "control",
     "scheduler": "euler-ancestral"},
)


@pytest.fixture(scope="module")
def controlnet(components):
    return trained_like_controlnet(components["unet"], seed=4)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def family_models(request):
    """(base, ControlNet) of each base family at its tiny size."""
    components = build_components(TINY_CONFIGS[request.param], seed=0)
    return pipeline_from_components(components), trained_like_controlnet(components["unet"], seed=4)


def test_every_base_family_has_a_tiny_test_size():
    from controlkit.base_families import BASE_FAMILIES

    assert sorted(TINY_CONFIGS) == sorted(family.name for family in BASE_FAMILIES)


def condition_map(seed: int) -> np.ndarray:
    """A white rectangle on black placed by `seed`: (64, 64, 3) uint8."""
    x, y = np.random.default_rng(seed).integers(4, 32, 2)
    image = np.zeros((64, 64, 3), np.uint8)
    image[y : y + 24, x : x + 20] = 255
    return image


#: One condition map per call, shared by every thread (generation must not write into it).
MAPS = {call["seed"]: condition_map(call["seed"]) for call in CALLS}


def run_call(base, controlnet, call) -> np.ndarray:
    control = Control(MAPS[call["seed"]], controlnet, scale=call["scale"], mode=call["mode"])
    return generate(base, call["prompt"], [control], steps=3, seed=call["seed"], scheduler=call["scheduler"],
                    output_type="np").images


def snapshot(module: torch.nn.Module) -> dict:
    """What must not change: the weights (copied), device, dtype and the object of every submodule."""
    return {
        "state": {name: tensor.detach().clone() for name, tensor in module.state_dict().items()},
        "modules": dict(module.named_modules()),
        "device": module.device,
        "dtype": module.dtype,
    }


def assert_unchanged(module: torch.nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert (after["device"], after["dtype"]) == (before["device"], before["dtype"])
    assert after["modules"].keys() == before["modules"].keys()
    assert all(after["modules"][name] is before["modules"][name] for name in before["modules"])
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][name], before["state"][name]) for name in before["state"])


def test_two_threads_sharing_base_and_controlnet_give_the_sequential_images(family_models):
    base, controlnet = family_models
    expected = [run_call(base, controlnet, call) for call in CALLS]
    modules = {"controlnet": controlnet, **{name: module for name, module in base.components.items()
                                            if isinstance(module, torch.nn.Module)}}
    before = {name: snapshot(module) for name, module in modules.items()}
    encoder = controlnet.controlnet_cond_embedding
    scheduler, timesteps = base.scheduler, base.scheduler.timesteps.clone()
    results: dict[int, list[np.ndarray]] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(len(CALLS))

    def worker(index: int) -> None:
        try:
            start.wait()
            for _ in range(ROUNDS):
                results[index].append(run_call(base, controlnet, CALLS[index]))
        except Exception as error:  # noqa: BLE001 -- re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(CALLS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    for index in range(len(CALLS)):
        assert len(results[index]) == ROUNDS
        for images in results[index]:
            np.testing.assert_array_equal(images, expected[index])
    for name, module in modules.items():
        assert_unchanged(module, before[name])
    assert controlnet.controlnet_cond_embedding is encoder
    assert base.scheduler is scheduler and torch.equal(base.scheduler.timesteps, timesteps)
    assert all(np.array_equal(image, condition_map(seed)) for seed, image in MAPS.items())
    np.testing.assert_array_equal(run_call(base, controlnet, CALLS[0]), expected[0])  # still works afterwards


def test_controlnet_in_another_dtype_is_refused_and_left_as_it_was(base, controlnet):
    import copy

    half = copy.deepcopy(controlnet).to(torch.bfloat16)
    before = snapshot(half)
    with pytest.raises(ConfigError) as raised:
        generate(base, CALLS[0]["prompt"], [Control(condition_map(0), half)], steps=2, seed=0, output_type="np")
    message = str(raised.value)
    assert "\n" not in message
    assert "bfloat16 on cpu but the base is float32 on cpu" in message
    assert "unet=base.unet" in message and ".to(" in message
    assert_unchanged(half, before)


class OverlapCountingTokenizer:
    """A real tokenizer whose calls take a while and record how many run at once. A `tokenizers`-backed tokenizer
    keeps padding/truncation settings on the shared object, so two calls at once can pad each other's prompt."""

    def __init__(self, tokenizer):
        self.tokenizer, self.active, self.most = tokenizer, 0, 0
        self.count_lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        with self.count_lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(0.02)  # long enough for the other thread to arrive if nothing keeps it out
            return self.tokenizer(*args, **kwargs)
        finally:
            with self.count_lock:
                self.active -= 1


def test_prompts_are_never_tokenized_by_two_generations_at_once(components):
    tokenizer = OverlapCountingTokenizer(components["tokenizer"])
    shared = pipeline_from_components({**components, "tokenizer": tokenizer})
    expected = [generate(shared, call["prompt"], steps=1, seed=call["seed"], output_type="latent").images
                for call in CALLS]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    start = threading.Barrier(len(CALLS))

    def worker(index: int) -> None:
        start.wait()
        for _ in range(2):
            call = CALLS[index]
            results[index].append(generate(shared, call["prompt"], steps=1, seed=call["seed"],
                                           output_type="latent").images)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(CALLS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tokenizer.most == 1
    assert all(torch.equal(latents, expected[index]) for index in results for latents in results[index])
    assert all(len(results[index]) == 2 for index in results)
