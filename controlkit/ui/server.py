"""Launching the page: offline by construction, files only from its own temporary folder.

Offline: the theme uses the system's fonts (gradio's default theme imports Google Fonts), analytics, sharing,
run history (which can save to a Hugging Face bucket), the MCP server and server-side rendering are off, the
hub libraries are set offline, upload components refuse URL inputs (`controlkit.ui.uploads`), and
`OfflineFiles` refuses gradio's routes that would fetch a URL for a client (`/file=https://...`, `/proxy=`).
Files: gradio's upload and cache folders are inside one temporary folder per server, removed when it stops;
no other path is allowed, and uploads are size-limited.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from controlkit.errors import ConfigError

#: System font stacks for the theme: nothing is fetched to draw the page.
SANS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial",
        "sans-serif"]
MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace"]
#: gradio settings read from the environment that would serve more, or elsewhere, than the options say.
UNSET = ("GRADIO_ALLOWED_PATHS", "GRADIO_SHARE", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "GRADIO_ROOT_PATH",
         "GRADIO_MCP_SERVER", "GRADIO_SSR_MODE", "GRADIO_HISTORY_BUCKET", "GRADIO_VIBE_MODE", "GRADIO_HOT_RELOAD")
#: What a refused outside fetch answers.
REFUSED = b"this server fetches nothing from other machines\n"


@dataclass(frozen=True)
class ServeOptions:
    """What `controlkit ui` serves and how (its options; `python -m controlkit.ui` reads them as JSON)."""

    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None
    base: str | None = None
    base_config: str | None = None
    controlnets: dict[str, str] = field(default_factory=dict)
    models_dir: str | None = None
    device: str | None = None
    dtype: str = "auto"
    concurrency: int = 2
    max_upload_mb: float = 32.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ServeOptions:
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown web page option(s): {', '.join(unknown)}")
        values = dict(data)
        if values.get("auth") is not None:
            values["auth"] = tuple(values["auth"])
        return cls(**values)


@dataclass
class Server:
    """A running page: its URL and temporary folder; `close` stops it and removes the folder."""

    page: Any
    url: str
    folder: Path

    def close(self) -> None:
        self.page.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def start(options: ServeOptions) -> Server:
    """Load the models and start the page in background threads (the caller keeps running).

    Sets this process's gradio and hub environment first (see the module docstring): gradio reads some of it
    when imported.
    """
    _check_port(options.host, options.port)  # before seconds of loading
    folder = Path(tempfile.mkdtemp(prefix="controlkit-ui-"))
    try:
        _offline_environment(folder)
        return _launch(options, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def serve(options: ServeOptions) -> int:
    """Start the page, print its URL and serve until interrupted (Ctrl-C, SIGTERM); returns the exit status.
    However it stops, even while the models load, its temporary folder is removed."""
    previous = signal.signal(signal.SIGTERM, _exit_on_term)
    try:
        server = start(options)
        try:
            if options.host not in ("127.0.0.1", "localhost", "::1"):
                print(f"warning: the page is open to every machine that can reach this one on port {options.port}"
                      + ("" if options.auth else ", with no password (add --auth USER:PASS)"), file=sys.stderr,
                      flush=True)
            print(f"controlkit ui: serving {server.url} (Ctrl-C to stop)", flush=True)
            while True:
                time.sleep(0.5)
        finally:
            server.close()
    except KeyboardInterrupt:
        return 130
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_port(host: str, port: int) -> None:
    """ConfigError unless this process may listen on host:port now (launch checks again when it binds)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing port is free
        try:
            probe.bind((host, port))
        except OSError:
            raise ConfigError(_port_message(host, port)) from None


def _port_message(host: str, port: int) -> str:
    return f"cannot serve on {host}:{port}: the port is in use or not open to this user; choose another --port"


def _exit_on_term(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one (a process group's) must not cut the cleanup short
    raise SystemExit(128 + signum)  # the `finally` of serve then stops the server and removes its folder


def _offline_environment(folder: Path) -> None:
    for name in UNSET:
        os.environ.pop(name, None)
    os.environ.update({
        "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(folder / "gradio"),
        "GRADIO_EXAMPLES_CACHE": str(folder / "examples"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
    })


def _launch(options: ServeOptions, folder: Path) -> Server:
    import warnings

    import gradio as gr
    from starlette.middleware import Middleware

    from controlkit.generation_options import GenerationWarning
    from controlkit.ui.app import build_page
    from controlkit.ui.models import load_models
    from controlkit.ui.uploads import CSS

    warnings.simplefilter("ignore", GenerationWarning)  # the page says the size note in its status line
    models = load_models(options.base, options.controlnets, options.models_dir, base_config=options.base_config,
                         device=options.device, dtype=options.dtype)
    page = build_page(models, folder / "outputs", concurrency=options.concurrency)
    page.queue(default_concurrency_limit=options.concurrency)
    theme = gr.themes.Default(font=SANS, font_mono=MONO)
    try:
        _, url, _ = page.launch(
            server_name=options.host, server_port=options.port, auth=[options.auth] if options.auth else None,
            prevent_thread_lock=True, quiet=True, share=False, inbrowser=False, ssr_mode=False, mcp_server=False,
            pwa=False, run_history=False, enable_monitoring=False, show_error=False, allowed_paths=[],
            max_file_size=int(options.max_upload_mb * 2**20), theme=theme, css=CSS, footer_links=["api", "settings"],
            app_kwargs={"middleware": [Middleware(OfflineFiles)]},
        )
    except OSError:  # taken since the check; gradio's own words name its environment variables, not our options
        raise ConfigError(_port_message(options.host, options.port)) from None
    return Server(page, url, folder)


class OfflineFiles:
    """ASGI middleware refusing gradio's routes that fetch a URL for the client (`/file=http...`, `/proxy=`):
    the server answers from its own files only."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and fetches_outside(scope.get("path", "")):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": REFUSED})
            return
        await self.app(scope, receive, send)


def fetches_outside(path: str) -> bool:
    """Whether a request path asks the server to fetch from another machine."""
    lowered = path.lower()
    _, marker, target = lowered.partition("/file=")
    return "/proxy=" in lowered or (bool(marker) and (target.startswith(("http:", "https:")) or "://" in target))
