"""`controlkit ui`: serve the web page (the embedded demo by default, or your checkpoints) on this machine.

The options are checked here, then the page runs as its own process, `python -m controlkit.ui`, which gets them
as JSON on stdin: the page is a face of its own that the command line does not import (tests/test_layering.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from controlkit.cli.common import HelpFormatter, parse_named
from controlkit.devices import AUTO, DTYPE_NAMES
from controlkit.errors import ConfigError, WeightsNotFoundError

EPILOG = """examples:
  controlkit ui                                      # the demo base and its six ControlNets, http://127.0.0.1:7860
  controlkit ui --base models/sd15 --controlnet canny=models/cn-canny --controlnet depth=models/cn-depth
  controlkit ui --models-dir models/ --port 8000     # the base and every ControlNet in models/
  controlkit ui --listen --auth me:secret            # open to the network, with a password
"""
#: Loopback unless --listen; --listen is every interface.
LOCAL, EVERYWHERE = "127.0.0.1", "0.0.0.0"
#: Tells `python -m controlkit.ui` which process to end with (its own module reads it; the faces share no code).
PARENT = "CONTROLKIT_UI_PARENT"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ui", help="serve the web page (generate and annotate in a browser)",
        description="Serve a local web page for generating with ControlNets and annotating images. Without "
        "models it serves the embedded demo base and its six ControlNets. It listens on 127.0.0.1 only unless "
        "--listen, and it fetches nothing from other machines (no fonts, scripts, analytics or URL inputs).",
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on, 1..65535")
    parser.add_argument("--listen", action="store_true",
                        help="listen on every network interface (0.0.0.0), not only this machine: anyone who can "
                        "reach it can use the page and its models; add --auth")
    parser.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password")
    parser.add_argument("--base", help="diffusers folder or single file of the base (SD1.x, SD2.x, SDXL), or demo; "
                        "default: the base in --models-dir, else demo")
    parser.add_argument("--base-config", help="for a single-file base: a diffusers folder with its config files")
    parser.add_argument("--controlnet", action="append", metavar="NAME=PATH",
                        help="a ControlNet offered as NAME (repeatable): a folder or file, or demo:CONDITION")
    parser.add_argument("--models-dir", metavar="DIR",
                        help="a folder of models: a subfolder with model_index.json is the base, other subfolders "
                        "and .safetensors/.pth/.ckpt/.bin files are ControlNets named after them")
    parser.add_argument("--device", default=None, help="torch device; cuda if available, else cpu")
    parser.add_argument("--dtype", default=AUTO, choices=(AUTO, *DTYPE_NAMES), help="auto: float16 on GPU, else "
                        "float32")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="generations run at the same time (more wait in the queue)")
    parser.add_argument("--max-upload-mb", type=float, default=32.0, help="largest upload accepted, in MB")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = page_options(args)
    return _serve_in_child(options)


def page_options(args: argparse.Namespace) -> dict[str, Any]:
    """The page's options as JSON-ready values, every one checked (one-line ConfigError) before a model loads."""
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {args.concurrency}")
    if not args.max_upload_mb > 0:
        raise ConfigError(f"--max-upload-mb must be above 0, got {args.max_upload_mb}")
    controlnets = parse_named(args.controlnet, "--controlnet")
    for name, source in controlnets.items():
        _check_exists(source, f"--controlnet {name}")
    if args.base is not None:
        _check_exists(args.base, "--base")
    if args.models_dir is not None and not Path(args.models_dir).expanduser().is_dir():
        raise WeightsNotFoundError(f"--models-dir {args.models_dir}: no such folder")
    return {"host": EVERYWHERE if args.listen else LOCAL, "port": args.port, "auth": _auth(args.auth),
            "base": args.base, "base_config": args.base_config, "controlnets": controlnets,
            "models_dir": args.models_dir, "device": args.device, "dtype": args.dtype,
            "concurrency": args.concurrency, "max_upload_mb": args.max_upload_mb}


def _auth(text: str | None) -> list[str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth expects USER:PASS, both not empty")
    return [user, password]


def _check_exists(source: str, what: str) -> None:
    """A path (or a short demo name, checked by the loader) that is there."""
    if source == "demo" or source.startswith("demo:") or Path(source).expanduser().exists():
        return
    raise WeightsNotFoundError(f"{what} {source}: no such file or folder")


def _serve_in_child(options: dict[str, Any]) -> int:
    """Run `python -m controlkit.ui` with the options on its stdin until it ends; SIGTERM and Ctrl-C reach it."""
    env = {**os.environ, PARENT: str(os.getpid())}
    child = subprocess.Popen([sys.executable, "-m", "controlkit.ui"], stdin=subprocess.PIPE, env=env)
    forwarded = _forward_term(child)
    try:
        try:
            child.stdin.write(json.dumps(options).encode())
            child.stdin.close()
        except BrokenPipeError:  # it ended before reading them: its status and stderr say why
            pass
        return child.wait()
    except KeyboardInterrupt:  # a terminal's Ctrl-C reached the child too; a `kill -INT` of this one did not
        try:
            return child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.terminate()
            child.wait()
            return 130
    finally:
        if forwarded is not None:
            signal.signal(signal.SIGTERM, forwarded)


def _forward_term(child: subprocess.Popen) -> Any:
    """Pass SIGTERM on to the child, which stops its server and removes its files; returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: child.terminate())
