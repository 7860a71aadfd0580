"""The floors of docs/architecture.md as one table over the folders: cheap package imports, every import points
down (or sideways within a floor), nothing imports a face, and no import circle anywhere."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "cv2", "mediapipe", "accelerate", "skimage", "h5py", "gradio", "ray", "webdataset")

#: Folder (or the one entry-point file) -> (floor, name). A file belongs to the longest entry that holds it. A
#: module may import modules of its own floor or of floors below; a face (floor 5) is imported only by itself.
FLOORS = {
    "controlkit": (1, "core"),  # images, weights, checkpoints, the ControlNet layer, controls, sampling, pipeline
    "preprocessors": (2, "preprocessors"),  # condition maps from images
    "training": (3, "training"),  # the trainer: config, data, engine, metrics
    "controlkit/demo": (4, "demo"),  # the embedded demo: engine, weights, toy world, estimator, recipe
    "controlkit/cli": (5, "command line"),
    "controlkit/__main__.py": (5, "command line"),  # `python -m controlkit`
    "controlkit/ui": (5, "web page"),
    "examples": (5, "examples"),
}
FACE = 5


def _floor_entry(relative: str) -> str:
    matches = [entry for entry in FLOORS if relative == entry or relative.startswith(entry.rstrip("/") + "/")]
    return max(matches, key=len)


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the table's folders."""
    modules = {}
    for top in ("controlkit", "preprocessors", "training", "examples"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _imports(path: Path) -> set[str]:
    """Project modules `path` imports anywhere in it (function-level and TYPE_CHECKING imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _entry_of(module: str) -> str:
    return _floor_entry(str(MODULES[module].relative_to(ROOT)))


def _graph() -> dict[str, set[str]]:
    """Import edges between project modules; a package's own `__init__` is left out as a target of its members
    (importing `a.b` runs `a/__init__`, which is not a dependency the module chose)."""
    graph = {}
    for module, path in MODULES.items():
        targets = _imports(path) - {module}
        graph[module] = {target for target in targets if not module.startswith(target + ".")}
    return graph


@pytest.mark.parametrize("package", ["controlkit", "preprocessors", "training", "controlkit.cli", "controlkit.demo",
                                     "controlkit.ui"])
def test_importing_a_package_loads_nothing_heavy(package):
    code = (
        f"import sys, {package}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", f"import {package} pulled in {result.stdout.strip()}"


def test_every_module_has_a_floor():
    assert all(_entry_of(module) for module in MODULES)


def test_every_import_points_down_and_no_face_is_imported():
    offenders = []
    for module, targets in _graph().items():
        own, own_name = FLOORS[_entry_of(module)]
        for target in targets:
            floor, name = FLOORS[_entry_of(target)]
            if floor > own or (floor == FACE and name != own_name):
                offenders.append(f"{module} (floor {own}) imports {target} (floor {floor})")
    assert offenders == []


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert circles == []


def test_tests_reach_library_behaviour_without_the_command_line_modules():
    """Tests may run the command line (`controlkit.cli.main`), but not import a subcommand's internals."""
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("controlkit.cli"):
                if node.module != "controlkit.cli" or any(alias.name != "main" for alias in node.names):
                    offenders.append(f"{path.relative_to(ROOT)}: from {node.module} import ...")
    assert offenders == []
