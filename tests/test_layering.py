"""Import hygiene and the dependency direction of DESIGN.md: cheap imports, no floor imports one above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "cv2", "mediapipe", "accelerate", "skimage", "h5py")


@pytest.mark.parametrize("package", ["controlkit", "preprocessors", "training", "controlkit.cli"])
def test_importing_a_package_loads_nothing_heavy(package):
    code = (
        f"import sys, {package}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", f"import {package} pulled in {result.stdout.strip()}"


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def _core_files() -> list[Path]:
    """controlkit's own floor: everything but the command line (cli/ and `python -m controlkit`)."""
    return [
        p for p in (ROOT / "controlkit").rglob("*.py")
        if "cli" not in p.relative_to(ROOT).parts and p.name != "__main__.py"
    ]


@pytest.mark.parametrize(
    "files, forbidden",
    [
        (_core_files, {"preprocessors", "training", "examples"}),
        (lambda: list((ROOT / "preprocessors").rglob("*.py")), {"training", "examples"}),
        (lambda: list((ROOT / "training").rglob("*.py")), {"examples"}),
    ],
    ids=["core", "preprocessors", "training"],
)
def test_no_floor_imports_one_above_it(files, forbidden):
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_roots(path) & forbidden)
        for path in files()
        if _imported_roots(path) & forbidden
    }
    assert offenders == {}


def test_nothing_below_the_face_imports_the_command_line():
    below = _core_files() + list((ROOT / "preprocessors").rglob("*.py")) + list((ROOT / "training").rglob("*.py"))
    offenders = []
    for path in below:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(name.startswith("controlkit.cli") for name in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
