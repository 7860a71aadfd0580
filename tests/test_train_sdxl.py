"""Training an SDXL ControlNet on the tiny SDXL base: the second text encoder, pooled prompts and size/crop
conditioning, caching, resume, two processes, the fp16 VAE guard, validation and the exported model."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import RESOLUTION, load_tensors, make_sdxl_world, overrides, tiny_config, train_in_two_processes

from controlkit.base_families import SD, SDXL
from controlkit.errors import ConfigError
from training.engine.loop import run_loop
from training.engine.trainer import build_run, train

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)
#: The tiny SDXL is configured for 64 px; these tests generate at the 16 px they train at, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:the output is 16x16 but the base was made for")

#: As tests/test_resume.py: EMA, warm-up + cosine, accumulation, prompt dropout, an interruption mid-epoch.
RESUME_SETTINGS = (
    "ema.enabled=true", "ema.decay=0.9", "schedule.name=cosine", "schedule.warmup_steps=2",
    "train.gradient_accumulation_steps=2", "data.proportion_empty_prompts=0.3", "train.max_steps=6",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_sdxl_world(tmp_path_factory.mktemp("sdxl-world"))


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, tensor in module.state_dict().items() if not torch.equal(before[name], tensor)}


def _controlnet_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_tensors(output / "controlnet" / "diffusion_pytorch_model.safetensors")


def _diffusers_time_ids(height: int, width: int, resolution: int) -> list[int]:
    """The six numbers diffusers' `train_text_to_image_sdxl.py` (`preprocess_train`) computes for one image:
    original (height, width), the top-left of `CenterCrop(resolution)` after `Resize(resolution)` (torchvision: the
    long side becomes int(resolution * long / short); the crop offset is int(round(excess / 2))), and the target
    size. (`train_controlnet_sdxl.py` passes (resolution, resolution) and a fixed crop for every sample instead.)"""
    short, long = min(height, width), max(height, width)
    new_long = int(resolution * long / short)
    resized_h, resized_w = (resolution, new_long) if height <= width else (new_long, resolution)
    top = max(0, int(round((resized_h - resolution) / 2.0)))
    left = max(0, int(round((resized_w - resolution) / 2.0)))
    return [height, width, top, left, resolution, resolution]


def test_sdxl_run_loads_both_encoders_trains_only_the_controlnet_and_conditions_like_generation(world, tmp_path):
    from controlkit.pipeline import load_base
    from training.data.dataset import collate_pairs
    from training.engine.batch_encoder import draw_step

    base, data = world
    run = build_run(tiny_config(base, data, tmp_path / "run", "train.max_steps=3"))
    parts = run.recipe.parts
    assert parts.family is SDXL and parts.text_encoder_2 is not None and parts.tokenizer_2 is not None
    assert type(parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    frozen = {name: _weights(getattr(parts, name)) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    controlnet_before = _weights(parts.controlnet)

    batch = collate_pairs([run.dataset[0], run.dataset[1]])
    draws = draw_step(torch.Generator().manual_seed(0), 2, run.recipe.encoder.latent_shape, 1000, 0.0)
    inputs = run.recipe.encoder.inputs(batch, draws, {0: 0, 1: 1})
    # Pair 0 is 32 x 32 (resized to 16, no crop); pair 1 is 24 x 32, resized to 16 x 21 and cropped 2 from the left.
    assert inputs.added["time_ids"].tolist() == [[32, 32, 0, 0, 16, 16], [24, 32, 0, 2, 16, 16]]
    pipe = load_base(base)
    embeds, _, pooled, _ = pipe.encode_prompt(batch["prompts"], None, "cpu", 1, False)
    assert inputs.text_embeds.shape == (2, 77, 64) and inputs.added["text_embeds"].shape == (2, 32)
    assert torch.equal(inputs.text_embeds, embeds) and torch.equal(inputs.added["text_embeds"], pooled)

    state = run_loop(run)
    assert state.step == 3 and all(math.isfinite(loss) for loss in state.losses)
    for name, before in frozen.items():
        assert not _changed(before, getattr(parts, name)), f"the frozen {name} changed"
    assert len(_changed(controlnet_before, parts.controlnet)) > 0.9 * len(controlnet_before)
    # The added (pooled text + size) embedding is trained too: the ControlNet's copy of it receives gradients.
    assert any(name.startswith("add_embedding.") for name in _changed(controlnet_before, parts.controlnet))


def test_caching_on_and_off_are_bitwise_identical(world, tmp_path):
    base, data = world
    settings = ("train.max_steps=4", "data.proportion_empty_prompts=0.5")
    cached = train(tiny_config(base, data, tmp_path / "cached", *settings))
    per_step = train(tiny_config(base, data, tmp_path / "per-step", *settings, "data.cache_encodings=false"))
    captions = {json.loads(line)["prompt"] for line in data.read_text().splitlines()}
    pooled = list((tmp_path / "cached" / "cache").glob("prompts-*/pooled-0of1.npy"))
    assert len(pooled) == 1 and np.load(pooled[0]).shape == (len(captions) + 1, 32)  # and the empty prompt
    assert not (tmp_path / "per-step" / "cache").exists()
    assert cached.losses == per_step.losses and all(math.isfinite(loss) for loss in cached.losses)
    expected, actual = _controlnet_weights(tmp_path / "cached"), _controlnet_weights(tmp_path / "per-step")
    assert [name for name in expected if not torch.equal(expected[name], actual[name])] == []


def test_interrupted_and_resumed_run_ends_bitwise_equal_to_a_straight_run(world, tmp_path):
    base, data = world
    straight = train(tiny_config(base, data, tmp_path / "straight", *RESUME_SETTINGS))

    def stop_at_3(done: int) -> None:
        if done == 3:
            signal.raise_signal(signal.SIGTERM)

    interrupted = train(tiny_config(base, data, tmp_path / "resumed", *RESUME_SETTINGS), on_step=stop_at_3)
    assert interrupted.stopped_by == signal.SIGTERM and interrupted.step == 3 and interrupted.output is None
    resumed = train(tiny_config(base, data, tmp_path / "resumed", *RESUME_SETTINGS, "checkpoint.resume=latest"))
    assert resumed.step == 6 and resumed.losses == straight.losses[3:]
    last = [tmp_path / name / "checkpoints" / "checkpoint-00000006" for name in ("straight", "resumed")]
    for part in ("optimizer", "ema", "trained"):
        expected, actual = (load_tensors(folder / f"{part}.safetensors") for folder in last)
        assert expected.keys() == actual.keys() and expected, part
        assert [key for key in expected if not torch.equal(expected[key], actual[key])] == [], part
    expected, actual = _controlnet_weights(tmp_path / "straight"), _controlnet_weights(tmp_path / "resumed")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_two_processes_match_one_process_over_the_same_global_batch(world, tmp_path):
    from controlkit.cli import main

    base, data = world
    settings = ("train.max_steps=4", "data.proportion_empty_prompts=0.3")
    config = tmp_path / "empty.toml"
    config.write_text("")
    two = train_in_two_processes(config, overrides(base, data, tmp_path / "two", *settings, "train.batch_size=2"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained 4 steps") == 1
    for name, batch in (("one", 4), ("other", 2)):
        assert main(["train", str(config), *overrides(base, data, tmp_path / name, *settings,
                                                      f"train.batch_size={batch}")]) == 0

    one, two_processes, other = (_flat(_controlnet_weights(tmp_path / name)) for name in ("one", "two", "other"))
    # As tests/test_train_ddp.py: float summation order only, against the training noise of another batch order.
    ratio = float((two_processes - one).norm() / (other - one).norm())
    assert ratio < 1e-2, ratio


def _flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[name].flatten().double() for name in sorted(weights)])


def test_exported_controlnet_records_sdxl_loads_and_generates_with_the_sdxl_base(world, tmp_path):
    from PIL import Image

    from controlkit.checkpoint import load_controlnet
    from controlkit.control import Control
    from controlkit.pipeline import generate, load_base

    base, data = world
    result = train(tiny_config(base, data, tmp_path / "run", "train.max_steps=2", "validation.every_steps=2",
                               "validation.count=2", "validation.num_inference_steps=2",
                               "checkpoint.save_original=true"))
    grid = Image.open(tmp_path / "run" / "validation" / "step-00000002.png")
    assert grid.size == (3 * RESOLUTION, 2 * RESOLUTION)  # condition | generated | target, one row per pair
    controlnet, metadata = load_controlnet(result.output)
    assert (metadata.condition, metadata.base) == ("canny", "SDXL")
    assert load_controlnet(tmp_path / "run" / "run.safetensors")[1].base == "SDXL"
    assert controlnet.config.addition_embed_type == "text_time"

    pipe = load_base(base)
    condition = np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)
    condition[4:12, 4:12] = 255
    options = dict(steps=2, seed=0, output_type="np", width=RESOLUTION, height=RESOLUTION)
    controlled = generate(pipe, "a red circle", [Control(condition, controlnet)], **options).images
    plain = generate(pipe, "a red circle", **options).images
    assert controlled.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(controlled).all()
    assert not np.array_equal(controlled, plain)  # the trained residuals reach the SDXL U-Net


def test_time_ids_of_non_square_images_are_what_diffusers_sdxl_training_computes(tmp_path):
    import cv2
    from PIL import Image

    from training.data.dataset import PairedDataset, collate_pairs, load_pairs
    from training.engine.batch_encoder import size_time_ids

    sizes = [(24, 32), (40, 23), (16, 23), (100, 37), (16, 16)]  # (height, width); half offsets round to even
    rng = np.random.default_rng(0)
    lines = []
    for index, (height, width) in enumerate(sizes):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "condition": f"{index}.png", "prompt": "a circle"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    dataset = PairedDataset(load_pairs(tmp_path / "pairs.jsonl"), resolution=RESOLUTION)
    items = [dataset[i] for i in range(len(sizes))]
    batch = collate_pairs(items)
    expected = [_diffusers_time_ids(height, width, RESOLUTION) for height, width in sizes]
    assert expected[1][2] == 6 and expected[2][3] == 4  # where flooring the half offset would say 5 and 3
    assert size_time_ids(batch["original_sizes"], batch["crop_top_lefts"], RESOLUTION).tolist() == expected

    for index, ((height, width), item, ids) in enumerate(zip(sizes, items, expected)):
        # The crop reported is the crop taken: the item is the resized image at that offset.
        image = np.asarray(Image.open(tmp_path / f"{index}.png"))
        resized_w = RESOLUTION if width <= height else int(RESOLUTION * width / height)
        resized_h = RESOLUTION if height <= width else int(RESOLUTION * height / width)
        if (resized_w, resized_h) != (width, height):
            image = cv2.resize(image, (resized_w, resized_h), interpolation=cv2.INTER_AREA)
        top, left = ids[2], ids[3]
        crop = image[top : top + RESOLUTION, left : left + RESOLUTION]
        pixels = ((item["pixel_values"] + 1.0) * 127.5).round().byte().permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(pixels, crop)


def test_fp16_keeps_the_sdxl_vae_in_float32_and_only_there(world, tmp_path):
    from training.engine.models import load_components, vae_dtype

    base, data = world
    parts = load_components(tiny_config(base, data, tmp_path / "run"), "cpu", torch.float16)
    assert parts.vae.config.force_upcast and {p.dtype for p in parts.vae.parameters()} == {torch.float32}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert {p.dtype for p in getattr(parts, name).parameters()} == {torch.float16}, name
    assert {p.dtype for p in parts.controlnet.parameters()} == {torch.float32}
    assert parts.weight_dtype == torch.float16
    assert vae_dtype(SD, parts.vae.config, torch.float16) == torch.float16  # SD1.x's VAE runs in fp16
    assert vae_dtype(SDXL, {**parts.vae.config, "force_upcast": False}, torch.float16) == torch.float16
    assert vae_dtype(SDXL, parts.vae.config, torch.bfloat16) == torch.bfloat16


def test_training_the_text_encoder_of_an_sdxl_base_is_refused(world, tmp_path):
    base, data = world
    config = tiny_config(base, data, tmp_path / "run", "model.kind=base", "model.condition=",
                         "model.train_text_encoder=true")
    with pytest.raises(ConfigError, match=r"`model.train_text_encoder` is for SD1.x bases; .* is SDXL"):
        train(config)
