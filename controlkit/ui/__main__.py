"""`python -m controlkit.ui`: serve the page with the options `controlkit ui` sends as one JSON object on stdin
(none, or a terminal: the defaults, the demo on 127.0.0.1:7860).

`controlkit ui` starts this as its own process: the command line and the page are separate faces (neither
imports the other, tests/test_layering.py), and the options (with the --auth password) travel on a pipe, not
in this process's command line. A user error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import sys

from controlkit.errors import ControlkitError, first_line

#: Environment variable naming the process that started this one, to end with it (Linux).
PARENT = "CONTROLKIT_UI_PARENT"


def main() -> int:
    _end_with_parent()
    try:
        text = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
        data = json.loads(text) if text.strip() else {}
        if not isinstance(data, dict):
            raise ControlkitError("the web page options must be one JSON object")
        from controlkit.ui.server import ServeOptions, serve

        return serve(ServeOptions.from_mapping(data))
    except json.JSONDecodeError as error:
        print(f"error: the web page options are not JSON ({first_line(error)})", file=sys.stderr)
        return 1
    except ControlkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _end_with_parent() -> None:
    """When started by `controlkit ui`, end with it however it ends (even `kill -9`), not as an orphan server."""
    parent = os.environ.pop(PARENT, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    set_death_signal = 1  # PR_SET_PDEATHSIG
    ctypes.CDLL(None, use_errno=True).prctl(set_death_signal, signal.SIGTERM)
    if os.getppid() != int(parent):  # it ended before the death signal was set
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
