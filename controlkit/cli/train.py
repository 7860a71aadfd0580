"""`controlkit train CONFIG [key=value ...]`: train a ControlNet (or the demo base model) from a TOML config.

Exit status: 0 trained to the end, 1 a user-fixable error (bad config, unreadable data, a failed checkpoint
write, too many non-finite losses), 128 + N when stopped by signal N after saving a checkpoint (143 SIGTERM,
130 SIGINT, 138 SIGUSR1). Several processes: `accelerate launch [options] -m controlkit train CONFIG ...`.
"""

from __future__ import annotations

import argparse
import os
import sys

from controlkit.cli.common import HelpFormatter

EPILOG = """examples:
  controlkit train training/configs/canny_sd15.toml data.source=fill50k/prompt.json
  controlkit train training/configs/depth_sd15.toml optim.learning_rate=2e-6 model.unlock_decoder=true
  controlkit train training/configs/canny_sd15.toml checkpoint.resume=latest
  controlkit train training/configs/base_toy.toml --check
  accelerate launch --multi_gpu --num_processes 8 -m controlkit train training/configs/canny_sd15.toml

overrides are TOML values (1e-5, true, [50, 150], {low_threshold = 100}); anything else is taken as a string.
every key, its default and its meaning: controlkit train CONFIG --check (or docs/training.md)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a ControlNet (or the demo base model) on paired data",
        description="Train from a TOML config plus section.key=value overrides. The whole config is validated "
        "before any model loads. Checkpoints go to OUTPUT/checkpoints (atomic, resumable with "
        "checkpoint.resume=latest); the final ControlNet to OUTPUT/controlnet, ready for "
        "`controlkit generate --controlnet NAME=OUTPUT/controlnet`. SIGTERM/SIGINT save a checkpoint and exit "
        "with 128 + the signal number.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="TOML config file, e.g. training/configs/canny_sd15.toml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.max_steps=100")
    parser.add_argument("--check", action="store_true",
                        help="validate, print the resolved config with each key's meaning, and exit")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from training.config import load_config, to_toml
    from training.config_rules import machine_settings
    from training.data.conditions import config_condition_fn

    config = load_config(args.config, args.overrides)
    if args.check:
        config_condition_fn(config.data)  # bad preprocessor parameter values fail here, as in the run
        print(to_toml(config, with_docs=True), end="")
        for note in machine_settings(config)[1]:  # what the run would change on this machine
            print(f"note: {note}", file=sys.stderr)
        return 0
    from training.engine.trainer import train

    result = train(config)
    if os.environ.get("RANK", "0") != "0":  # several processes: the first one reports
        return 128 + result.stopped_by if result.stopped_by else 0
    if result.stopped_by:
        print(f"stopped by signal {result.stopped_by} at step {result.step}; checkpoint: {result.checkpoint} "
              "(continue with checkpoint.resume=latest)")
        return 128 + result.stopped_by
    notes = []
    if result.nonfinite_steps:
        notes.append(f"{result.nonfinite_steps} steps skipped for a non-finite loss")
    if result.skipped_pairs:
        notes.append(f"{result.skipped_pairs} bad pairs skipped")
    suffix = f" ({'; '.join(notes)})" if notes else ""
    print(f"trained {result.step} steps; model: {result.output}; last checkpoint: {result.checkpoint}{suffix}")
    return 0

