"""The one typed training config: nested dataclasses, a TOML file plus dotted `key=value` overrides.

    >>> from training.config import load_config
    >>> config = load_config("training/configs/canny_sd15.toml", ["optim.learning_rate=2e-6", "data.resolution=256"])
    >>> config.optim.learning_rate
    2e-06

Defaults live only in the dataclasses below; a config file overrides some of them, the command line overrides the
file. Everything is validated before any model is loaded: every problem (unknown key, wrong type, bad value) is
collected and raised once as a `ConfigError` whose message names each key and its bad value, with a close-match
suggestion for unknown keys.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from controlkit.errors import ConfigError
from training.config_rules import PREDICTION_TYPES, SCHEDULES, value_problems

__all__ = ["PREDICTION_TYPES", "SCHEDULES", "SECTIONS", "TrainConfig", "all_keys", "load_config", "to_toml",
           "value_problems"]



def option(default: Any, doc: str) -> Any:
    """A config field with its one-line documentation (shown by `controlkit train --show-config`)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    kind: str = option("controlnet", "'controlnet': a ControlNet on a frozen base; 'base': the base U-Net; "
                       "'vae': the base's VAE (training/engine/autoencoder.py)")
    base: str = option("", "base model: a diffusers folder, or its name in $CONTROLKIT_MODELS")
    controlnet: str = option("", "ControlNet to continue from (folder or file); empty: a copy of the U-Net encoder")
    condition: str = option("", "condition name stored in the checkpoint metadata, e.g. canny, depth, pose")
    conditioning_channels: int = option(3, "channels of the condition map fed to the ControlNet")
    unlock_decoder: bool = option(False, "also train the U-Net decoder and output layers (sd_locked=False)")
    only_mid_control: bool = option(False, "add only the middle-block control to the U-Net")
    global_pooling: bool = option(False, "average each ControlNet output over the image (1.1 shuffle): global "
                                  "content, not layout; a new ControlNet only")
    from_scratch: bool = option(True, "base/vae kind: start the U-Net/VAE from random weights, config from model.base")
    train_text_encoder: bool = option(False, "base kind: train the text encoder together with the U-Net")
    prediction_type: str = option("", "target: 'epsilon' or 'v_prediction'; empty: the base scheduler's")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    channels_last: bool = option(True, "channels-last memory format for the convolution networks")


@dataclass
class DataConfig:
    source: str = option("", "pairs: JSONL manifest, prompt.json, folder layout, saved HF dataset, or WebDataset "
                         "shards (shards.json, a folder of .tar, a brace pattern; local or s3://, hf://, ...)")
    image_column: str = option("image", "HF dataset column of the target images")
    conditioning_column: str = option("conditioning_image", "HF dataset column of the condition maps")
    caption_column: str = option("text", "HF dataset column of the captions")
    max_samples: int = option(0, "use only the first N pairs (0: all)")
    resolution: int = option(512, "training side in pixels (short side resized, then cropped)")
    center_crop: bool = option(True, "centre crop (true) or random crop (false, no latent caching)")
    buckets: bool = option(False, "aspect-ratio buckets of about resolution^2 pixels, sides multiples of 64, one "
                           "bucket per step (no latent caching; indexed sources)")
    shuffle_buffer: int = option(256, "shards: samples each reader shuffles among (0: the shards' own order)")
    preprocessor: str = option("", "preprocessor computing condition maps for pairs without one")
    preprocessor_params: dict = option({}, "parameters of that preprocessor, e.g. {low_threshold = 100}")
    randomize: dict = option({}, "parameters drawn per sample, e.g. {low_threshold = [50, 150]}")
    condition_cache_dir: str = option("", "folder caching computed condition maps (empty: no cache)")
    on_bad_pair: str = option("skip", "an unreadable pair: 'skip' it (counted) or 'fail' the run")
    proportion_empty_prompts: float = option(0.0, "fraction of captions replaced by the empty prompt")
    num_workers: int = option(0, "data-loading worker processes per training process")
    cache_encodings: bool = option(True, "encode images and captions once (false: every step)")
    cache_dir: str = option("", "encoding cache folder (empty: OUTPUT_DIR/cache)")


@dataclass
class TrainLoopConfig:
    output_dir: str = option("runs/controlkit", "checkpoints, final model, logs, validation grids")
    seed: int = option(0, "seed of the noise, timesteps, prompt dropout, data order and model init, in [0, 2**63)")
    batch_size: int = option(4, "samples per process per forward pass")
    gradient_accumulation_steps: int = option(1, "forward passes summed into one optimizer step")
    max_steps: int = option(1000, "optimizer steps to train for")
    mixed_precision: str = option("no", "'no', 'fp16' or 'bf16' for the frozen parts (trained ones stay fp32); "
                                  "fp16 needs CUDA (without it: 'no', with a note)")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this value (0: no clipping)")
    max_consecutive_nonfinite: int = option(10, "stop after this many skipped non-finite losses in a row")
    allow_tf32: bool = option(False, "allow TF32 matmuls on Ampere+ GPUs")
    process_timeout_minutes: int = option(60, "timeout of collectives between processes (covers caching)")


@dataclass
class OptimConfig:
    name: str = option("adamw", "'adamw' (torch) or 'adamw8bit' (bitsandbytes)")
    learning_rate: float = option(1e-5, "peak learning rate, in (0, 1]")
    beta1: float = option(0.9, "Adam beta1")
    beta2: float = option(0.999, "Adam beta2")
    weight_decay: float = option(1e-2, "decoupled weight decay")
    epsilon: float = option(1e-8, "Adam epsilon")
    fused: bool = option(True, "use the fused AdamW kernel where the device supports it")


@dataclass
class ScheduleConfig:
    name: str = option("constant", f"learning-rate schedule: {', '.join(SCHEDULES)}")
    warmup_steps: int = option(0, "linear warm-up steps from 0 to the peak learning rate")
    num_cycles: int = option(1, "cycles of cosine_with_restarts")
    power: float = option(1.0, "power of the polynomial schedule")


@dataclass
class EmaConfig:
    enabled: bool = option(False, "keep an exponential moving average of the trained weights")
    decay: float = option(0.9999, "maximum EMA decay")
    update_after_step: int = option(0, "start averaging after this many steps")
    use_for_output: bool = option(True, "save the EMA weights (not the raw ones) as the final model")


@dataclass
class CheckpointConfig:
    every_steps: int = option(500, "save a resumable checkpoint every N steps (0: only at the end)")
    total_limit: int = option(3, "checkpoints kept; the oldest by write order goes once a new one is complete, "
                              "never the one a rewound run resumed from (0: all)")
    resume: str = option("", "'' (fresh), 'latest' (newest complete by write order, if any) or a checkpoint "
                         "folder (an older one starts a new branch)")
    allow_config_change: bool = option(False, "resume even if settings that change the run differ")
    save_original: bool = option(False, "also write the final ControlNet in the original key format")


@dataclass
class LoggingConfig:
    every_steps: int = option(10, "log loss, learning rate, samples/s and memory every N steps")
    report_to: str = option("tensorboard", "'tensorboard' or 'none'")
    progress_bar: bool = option(True, "show a progress bar on the main process")


@dataclass
class ValidationConfig:
    every_steps: int = option(0, "generate on the validation pairs every N steps (0: never)")
    source: str = option("", "validation pairs (data.source formats); empty: from data.source")
    count: int = option(4, "number of validation pairs")
    num_inference_steps: int = option(20, "sampling steps of each validation image")
    guidance_scale: float = option(7.5, "classifier-free guidance scale of validation images")
    seed: int = option(0, "seed of the validation images")
    measure: bool = option(True, "measure controllability of the validation images")
    every: int = option(1, "ControlNet step reuse in validation images: run it every N-th step (1: every step)")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "train": TrainLoopConfig, "optim": OptimConfig,
    "schedule": ScheduleConfig, "ema": EmaConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig,
    "validation": ValidationConfig,
}


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        problems = value_problems(self)
        if problems:
            raise ConfigError(_summary("config", problems))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{section: {key: value}}, the shape of the TOML file."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{"section.key": value} for every field."""
        return _flatten(self.to_dict())


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a TOML config (or start from the defaults when `path` is None), apply `section.key=value` overrides,
    and validate everything at once.

    Override values are TOML values (`1e-5`, `true`, `[50, 150]`, `{low_threshold = 100}`); anything that does not
    parse as one is taken as a plain string (`model.base=models/sd15`).

    Raises:
        ConfigError: one line listing every unknown key, wrongly typed value and bad value.
    """
    name = str(path) if path is not None else "config"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; pass a TOML file (see training/configs)") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for section, table in raw.items():
        if section not in SECTIONS or not isinstance(table, dict):
            problems.append(_unknown(section, list(SECTIONS), "section"))
            continue
        for key, value in table.items():
            _assign(values, f"{section}.{key}", value, problems)
    for item in overrides:
        dotted, sep, text = item.partition("=")
        if not sep:
            problems.append(f"override {item!r} must look like section.key=value (e.g. optim.learning_rate=1e-5)")
            continue
        _assign(values, dotted.strip(), _parse_override(text.strip()), problems, raw_text=text.strip())
    sections = {section: cls(**values[section]) for section, cls in SECTIONS.items()}
    config = TrainConfig.__new__(TrainConfig)
    for section, value in sections.items():
        setattr(config, section, value)
    problems += value_problems(config)
    if problems:
        raise ConfigError(_summary(name, problems))
    return TrainConfig(**sections)


def _assign(
    values: dict[str, dict[str, Any]], dotted: str, value: Any, problems: list[str], raw_text: str | None = None
) -> None:
    section, _, key = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])} if section in SECTIONS else {}
    if not key or key not in fields:
        problems.append(_unknown(dotted, all_keys(), "key"))
        return
    expected = fields[key].type
    if expected == "str" and not isinstance(value, str) and raw_text is not None:
        value = raw_text  # an override like model.condition=123 meant the text
    checked = _check_type(value, expected)
    if checked is None:
        problems.append(f"`{dotted}` must be {_TYPE_NAMES[expected]} (got {value!r})")
        return
    values[section][key] = checked


_TYPE_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "dict": "a table"}


def _check_type(value: Any, expected: str) -> Any:
    """The value converted to the field type (int -> float), or None when it has the wrong type."""
    if expected == "bool":
        return value if isinstance(value, bool) else None
    if expected == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if expected == "float":
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if expected == "str":
        return value if isinstance(value, str) else None
    if expected == "dict":
        return dict(value) if isinstance(value, dict) else None
    raise TypeError(f"unsupported config field type {expected}")


def all_keys() -> list[str]:
    """Every `section.key` of the config."""
    return [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown(name: str, known: list[str], what: str) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not close and what == "key":  # a known key name in another section: "learning_rate" -> optim.learning_rate
        tail = name.rpartition(".")[2]
        close = [key for key in known if key.rpartition(".")[2] == tail][:1]
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return f"unknown {what} `{name}`{hint}"


def _summary(name: str, problems: list[str]) -> str:
    count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
    return f"{name}: {count}: " + "; ".join(problems)


def _parse_override(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _flatten(values: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, table in values.items() for key, value in table.items()}


def _toml_value(value: Any) -> str:
    """A TOML literal for a config value (strings quoted, tables inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(config: TrainConfig, *, with_docs: bool = False) -> str:
    """The config as a TOML file (every key; with `with_docs`, each preceded by its one-line documentation)."""
    lines: list[str] = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            if with_docs:
                lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{f.name} = {_toml_value(getattr(getattr(config, section), f.name))}")
        lines.append("")
    return "\n".join(lines)
