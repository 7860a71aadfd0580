"""`controlkit info`: what a ControlNet checkpoint is (format, condition metadata, size, the base it fits), including
ControlNet-Union models and Control-LoRA files."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from controlkit.cli.common import HelpFormatter

EPILOG = """examples:
  controlkit info control_v11p_sd15_canny.pth
  controlkit info models/controlnet-depth/          # a diffusers folder
  controlkit info control_canny.safetensors --json
  controlkit info control_v11f1p_sd15_depth.pth --base stable-diffusion-v1-5/   # exit 1 if it does not fit
  controlkit info controlnet-union-sdxl-1.0/        # a ControlNet-Union: its control types
  controlkit info control-lora-canny-rank128.safetensors --base sdxl-base/   # a Control-LoRA and its fit
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show a ControlNet checkpoint's format, condition metadata, size and base",
        description="Read a ControlNet checkpoint (without running code from it), check its keys and shapes, and "
        "print its format (ControlNet, ControlNet-Union with its control types, or Control-LoRA with its rank), "
        "condition metadata, parameter count, dtype, the base model family it fits and whether A1111 and ComfyUI "
        "can load it (SD1.x, SD2.x and SDXL layouts only).",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or diffusers folder")
    parser.add_argument("--base", metavar="FOLDER",
                        help="also check that it fits this base model (diffusers pipeline or U-Net folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from controlkit.checkpoint import empty_base_unet, inspect_checkpoint

    # with --base, a ControlNet that does not fit raises CheckpointError ("checkpoint is for a different base")
    info = inspect_checkpoint(args.checkpoint, unet=empty_base_unet(args.base) if args.base else None)
    if args.json:
        data = asdict(info)
        data["path"] = str(info.path)
        print(json.dumps(data, indent=2))
        return 0
    meta = info.metadata
    origin = {"stored": "", "file name": " (guessed from the file name)", "none": ""}[info.metadata_source]
    params = ", ".join(f"{key}={value!r}" for key, value in meta.preprocessor_params.items()) or "none recorded"
    lora = info.format.startswith("Control-LoRA")
    rows = [
        ("checkpoint", str(info.path)),
        ("format", info.format),
        ("fits", _fits(info.family, info.cross_attention_dim)),
        ("A1111/ComfyUI", info.clients if lora else f"readable as an original-format file: {info.clients}"),
        ("parameters", f"{info.parameter_count:,} in {info.tensor_count} tensors ({info.dtype})"),
        ("condition", (meta.condition or "none recorded") + origin),
        ("preprocessor", meta.preprocessor or "none recorded"),
        ("preprocessor params", params),
        ("polarity", meta.polarity),
        ("global pooling", _yes(meta.global_pooling)),
        ("conditional only", _yes(meta.conditional_only)),
        ("trained on", meta.base or "not recorded"),
        ("condition input", f"{info.conditioning_channels} channels"),
        ("config", _config(info.config_stored, lora)),
    ]
    if args.base:
        rows.insert(3, ("fits --base", f"yes ({args.base})"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name + ':':{width + 2}s}{value}")
    return 0


def _fits(family: str, width: int | None) -> str:
    if family.startswith("custom"):
        return f"custom U-Nets with cross-attention width {width} (not an SD1.x/SD2.x/SDXL size)"
    return f"{family} U-Nets (cross-attention width {width})"


def _config(stored: bool, lora: bool) -> str:
    if lora:
        return "none: the ControlNet is built from the base's U-Net when loaded (--base checks the fit)"
    return "stored with the weights" if stored else "inferred from the weights (attention heads follow the SD family)"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
