"""The allowed range of every training config value, and the settings that depend on the machine.

`value_problems(config)` checks every field of every section (training/config.py) before anything is loaded:
numbers are finite and inside the range the code that consumes them accepts (seeds fit `torch.Generator` and
numpy's `default_rng`, probabilities lie in [0, 1], counts are positive where zero means nothing), strings hold
no NUL byte (no path can), and the settings that depend on each other agree. Each problem is one phrase naming
the key and its value; `training.config` joins them into one `ConfigError` line.

`machine_settings(config)` adapts what depends on the machine, saying so: fp16 mixed precision needs a CUDA GPU
(PyTorch has no float16 autocast on the CPU), so on a machine without one the run uses float32 ('no').
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from controlkit.control import MAX_EVERY  # the one bound of generation's step reuse

#: A `training.config.TrainConfig` (not imported: that module imports this one).
TrainConfig = Any

#: Learning-rate schedules of `diffusers.optimization.get_scheduler` offered here.
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
#: Prediction targets the trainer can compute from a scheduler; "" keeps the base scheduler's own.
PREDICTION_TYPES = ("", "epsilon", "v_prediction")
#: Seeds go to `torch.Generator.manual_seed` (and `seed + epoch` too) and to numpy's `default_rng`, which
#: refuses negative seeds: 0 <= seed < 2**63 fits both with room to spare.
SEED_LIMIT = 2**63
#: The largest integer any count may take (a 64-bit signed integer, what torch and numpy index with).
INT_MAX = 2**63 - 1
#: Largest training side in pixels (an 8192 px image is 0.8 GB per float32 batch item before any model).
MAX_RESOLUTION = 8192
#: Most data-loading worker processes per training process.
MAX_WORKERS = 128
#: Longest wait of one collective between processes: a week.
MAX_TIMEOUT_MINUTES = 7 * 24 * 60
#: diffusers' schedulers offer at most their `num_train_timesteps` (1000 for Stable Diffusion) sampling steps.
MAX_INFERENCE_STEPS = 1000
#: Largest shuffle buffer of a shard reader (samples held in memory per reader).
MAX_SHUFFLE_BUFFER = 1_000_000
#: Bucket sides are multiples of this (training/data/buckets.py).
BUCKET_STEP = 64
#: Most validation pairs generated at each validation.
MAX_VALIDATION_COUNT = 1000
#: The end learning rate of diffusers' polynomial schedule, which must stay below the peak.
POLYNOMIAL_END_LR = 1e-7
#: Condition maps reach the ControlNet as RGB (controlkit.control.condition_tensor), so its input has 3 channels.
CONDITION_CHANNELS = 3


def value_problems(config: TrainConfig) -> list[str]:
    """Every bad value of an assembled config, each naming its key and value (empty: all good)."""
    problems: list[str] = []

    def need(condition: bool, key: str, rule: str) -> None:
        section, _, name = key.partition(".")
        value = getattr(getattr(config, section), name)
        if not condition and not _non_finite(value):  # a non-finite number is reported once, by _field_types
            problems.append(f"`{key}` {rule} (got {value!r})")

    problems += _field_types(config)
    for rules in (_model_rules, _data_rules, _train_rules, _optim_rules, _other_rules):
        rules(config, need)
    return problems


def _field_types(config: TrainConfig) -> list[str]:
    """Rules of the value types themselves: finite floats, 64-bit integers, strings without NUL bytes."""
    problems = []
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for field in dataclasses.fields(values):
            key, value = f"{section.name}.{field.name}", getattr(values, field.name)
            if _non_finite(value):
                problems.append(f"`{key}` must be a finite number (got {value!r})")
            elif isinstance(value, str) and "\x00" in value:
                problems.append(f"`{key}` must not contain a NUL character (got {value!r})")
    return problems


Need = Callable[[bool, str, str], None]


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _count(value: Any, low: int, high: int = INT_MAX) -> bool:
    """An integer in [low, high] (ints only reach here: the types were checked when the config was read)."""
    return isinstance(value, int) and low <= value <= high


def _number(value: float, low: float, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = False) -> bool:
    """A finite number in the interval from `low` to `high` (open at either end when asked)."""
    if not math.isfinite(value):
        return False
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below


def _model_rules(config: TrainConfig, need: Need) -> None:
    model = config.model
    need(model.kind in ("controlnet", "base", "vae"), "model.kind", "must be 'controlnet', 'base' or 'vae'")
    need(bool(model.base.strip()), "model.base", "must name the base model folder (model.base=PATH)")
    need(model.prediction_type in PREDICTION_TYPES, "model.prediction_type",
         "must be '', 'epsilon' or 'v_prediction'")
    need(model.conditioning_channels == CONDITION_CHANNELS, "model.conditioning_channels",
         f"must be {CONDITION_CHANNELS}: training condition maps are RGB")
    if model.kind == "controlnet":
        need(bool(model.condition.strip()), "model.condition", "must name the condition (e.g. canny) of a ControlNet")
        need(not model.train_text_encoder, "model.train_text_encoder", "applies to model.kind = 'base' only")
        need(not (model.global_pooling and model.controlnet), "model.global_pooling",
             "applies to a new ControlNet only; a ControlNet continued from model.controlnet keeps its own setting")
    else:
        need(not model.controlnet, "model.controlnet", "must be empty when model.kind is 'base'")
        need(not model.unlock_decoder, "model.unlock_decoder", "applies to model.kind = 'controlnet' only")
        need(not model.only_mid_control, "model.only_mid_control", "applies to model.kind = 'controlnet' only")
        need(not model.global_pooling, "model.global_pooling", "applies to model.kind = 'controlnet' only")
        need(model.kind == "base" or not model.train_text_encoder, "model.train_text_encoder",
             "applies to model.kind = 'base' only")


def _data_rules(config: TrainConfig, need: Need) -> None:
    data = config.data
    need(bool(data.source.strip()), "data.source", "must name the training data (data.source=PATH)")
    for column in ("image_column", "conditioning_column", "caption_column"):
        need(bool(getattr(data, column).strip()), f"data.{column}", "must name a dataset column")
    need(data.resolution % 8 == 0 and _count(data.resolution, 8, MAX_RESOLUTION), "data.resolution",
         "must be a positive multiple of 8" + ("" if data.resolution <= MAX_RESOLUTION else f" up to {MAX_RESOLUTION}"))
    need(_count(data.max_samples, 0), "data.max_samples", "must be 0 (all) or positive")
    need(data.on_bad_pair in ("skip", "fail"), "data.on_bad_pair", "must be 'skip' or 'fail'")
    need(_number(data.proportion_empty_prompts, 0.0, 1.0), "data.proportion_empty_prompts", "must be in [0, 1]")
    need(_count(data.num_workers, 0, MAX_WORKERS), "data.num_workers", f"must be in [0, {MAX_WORKERS}]")
    need(_count(data.shuffle_buffer, 0, MAX_SHUFFLE_BUFFER), "data.shuffle_buffer",
         f"must be in [0, {MAX_SHUFFLE_BUFFER}]")
    shards = bool(data.source.strip()) and _shard_source(data.source)
    if data.buckets:
        need(data.resolution % BUCKET_STEP == 0, "data.resolution",
             f"must be a multiple of {BUCKET_STEP} with data.buckets (bucket sides are)")
        need(not shards, "data.buckets", "needs an indexed source (manifest, folder, HF dataset): shards stream "
             "without a bucket per step; set data.buckets=false")
    need(config.model.kind != "vae" or not (shards or data.buckets), "model.kind",
         "'vae' reads indexed sources without buckets (no shards, data.buckets=false)")
    need(not data.preprocessor or _known_preprocessor(data.preprocessor), "data.preprocessor",
         "must be a registry preprocessor (see `controlkit preprocessors`)")
    known = _preprocessor_parameters(data.preprocessor)
    need(all(_is_range(value) for value in data.randomize.values()), "data.randomize",
         "must map parameters to [low, high] with low <= high, both finite")
    need(not data.randomize or bool(data.preprocessor), "data.randomize", "needs data.preprocessor")
    need(not data.preprocessor_params or bool(data.preprocessor), "data.preprocessor_params",
         "needs data.preprocessor")
    if known is not None:
        for key in ("preprocessor_params", "randomize"):
            unknown = sorted(set(getattr(data, key)) - set(known))
            need(not unknown, f"data.{key}", f"has parameter(s) {', '.join(unknown)} that {data.preprocessor} "
                 f"does not take (it takes: {', '.join(sorted(known)) or 'none'})")


def _train_rules(config: TrainConfig, need: Need) -> None:
    train = config.train
    need(bool(train.output_dir.strip()), "train.output_dir", "must name an output folder")
    need(_count(train.seed, 0, SEED_LIMIT - 1), "train.seed", "must be in [0, 2**63)")
    need(_count(train.batch_size, 1), "train.batch_size", "must be at least 1")
    need(_count(train.gradient_accumulation_steps, 1), "train.gradient_accumulation_steps", "must be at least 1")
    need(_count(train.max_steps, 1), "train.max_steps", "must be at least 1")
    need(train.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision", "must be 'no', 'fp16' or 'bf16'")
    need(_number(train.max_grad_norm, 0.0), "train.max_grad_norm", "must be 0 (no clipping) or positive")
    need(_count(train.max_consecutive_nonfinite, 1), "train.max_consecutive_nonfinite", "must be at least 1")
    need(_count(train.process_timeout_minutes, 1, MAX_TIMEOUT_MINUTES), "train.process_timeout_minutes",
         f"must be in [1, {MAX_TIMEOUT_MINUTES}] (a week)")


def _optim_rules(config: TrainConfig, need: Need) -> None:
    optim, schedule = config.optim, config.schedule
    need(optim.name in ("adamw", "adamw8bit"), "optim.name", "must be 'adamw' or 'adamw8bit'")
    need(_number(optim.learning_rate, 0.0, 1.0, low_open=True), "optim.learning_rate", "must be in (0, 1]")
    need(_number(optim.beta1, 0.0, 1.0, high_open=True), "optim.beta1", "must be in [0, 1)")
    need(_number(optim.beta2, 0.0, 1.0, high_open=True), "optim.beta2", "must be in [0, 1)")
    need(_number(optim.weight_decay, 0.0), "optim.weight_decay", "must be 0 or positive")
    need(_number(optim.epsilon, 0.0, 1.0, low_open=True), "optim.epsilon", "must be in (0, 1]")
    need(schedule.name in SCHEDULES, "schedule.name", f"must be one of {', '.join(SCHEDULES)}")
    need(_count(schedule.warmup_steps, 0), "schedule.warmup_steps", "must be 0 or positive")
    need(_count(schedule.num_cycles, 1), "schedule.num_cycles", "must be at least 1")
    need(_number(schedule.power, 0.0, low_open=True), "schedule.power", "must be positive")
    if schedule.name == "polynomial":  # diffusers' polynomial decay divides by (max_steps - warmup_steps)
        need(schedule.warmup_steps < config.train.max_steps, "schedule.warmup_steps",
             "must be below train.max_steps with the polynomial schedule")
        need(optim.learning_rate > POLYNOMIAL_END_LR, "optim.learning_rate",
             f"must be above the polynomial schedule's end rate {POLYNOMIAL_END_LR}")


def _other_rules(config: TrainConfig, need: Need) -> None:
    ema, checkpoint, logging, validation = config.ema, config.checkpoint, config.logging, config.validation
    need(_number(ema.decay, 0.0, 1.0, high_open=True), "ema.decay", "must be in [0, 1)")
    need(_count(ema.update_after_step, 0), "ema.update_after_step", "must be 0 or positive")
    need(_count(checkpoint.every_steps, 0), "checkpoint.every_steps", "must be 0 (only at the end) or positive")
    need(_count(checkpoint.total_limit, 0), "checkpoint.total_limit", "must be 0 (keep all) or positive")
    need(_count(logging.every_steps, 1), "logging.every_steps", "must be at least 1")
    need(logging.report_to in ("tensorboard", "none"), "logging.report_to", "must be 'tensorboard' or 'none'")
    need(_count(validation.every_steps, 0), "validation.every_steps", "must be 0 (never) or positive")
    need(_count(validation.count, 1, MAX_VALIDATION_COUNT), "validation.count",
         f"must be in [1, {MAX_VALIDATION_COUNT}]")
    need(_count(validation.num_inference_steps, 1, MAX_INFERENCE_STEPS), "validation.num_inference_steps",
         f"must be in [1, {MAX_INFERENCE_STEPS}]")
    need(_number(validation.guidance_scale, 0.0), "validation.guidance_scale", "must be 0 or positive")
    need(_count(validation.seed, 0, SEED_LIMIT - 1), "validation.seed", "must be in [0, 2**63)")
    need(_count(validation.every, 1, MAX_EVERY), "validation.every", f"must be in [1, {MAX_EVERY}]")


def _is_range(value: Any) -> bool:
    return (
        isinstance(value, list) and len(value) == 2
        and all(isinstance(bound, (int, float)) and not isinstance(bound, bool) and math.isfinite(bound)
                for bound in value)
        and value[0] <= value[1]
    )


def _shard_source(source: str) -> bool:
    from training.data.shards import is_shard_source

    return is_shard_source(source)


def _known_preprocessor(name: str) -> bool:
    from preprocessors.registry import PREPROCESSORS

    return name in PREPROCESSORS


def _preprocessor_parameters(name: str) -> dict[str, Any] | None:
    """The keyword parameters of a registry preprocessor (None: none named, unknown, or not importable here)."""
    from preprocessors.registry import get_spec

    if not name or not _known_preprocessor(name):
        return None
    try:
        return get_spec(name).parameters()
    except ImportError:  # its module needs an optional package: the run says so when it builds it
        return None


def machine_settings(config: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The config as this machine can run it, and one note per setting changed for it (empty: unchanged).

    fp16 mixed precision without a CUDA GPU becomes 'no' (float32): PyTorch's CPU autocast has no float16, so the
    frozen float16 weights would meet float32 activations. The changed value is what checkpoints record, so a
    resume on a GPU with fp16 is reported as a change of the run.
    """
    import torch

    if config.train.mixed_precision != "fp16" or torch.cuda.is_available():
        return config, []
    note = ("train.mixed_precision = 'fp16' needs a CUDA GPU and this machine has none: training in float32 "
            "(train.mixed_precision=no); set train.mixed_precision=bf16 or no to silence this")
    train = dataclasses.replace(config.train, mixed_precision="no")
    return dataclasses.replace(config, train=train), [note]
