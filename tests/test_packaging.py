"""The wheel installs the ``mcgrad`` package only, and declares what mcgrad imports.

``models/`` is a folder of runnable examples at the repository root (``python -m
models.vae``), imported by the tests from there (``pythonpath = ["."]``), not a package to
install: a top-level ``models`` would clash with users' own. The wheel is built from a
copy of the sources (so no ``build/`` or ``*.egg-info`` lands in the work tree), without
build isolation or an index (seconds, offline).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Import names whose distribution is named differently.
DISTRIBUTIONS = {"sklearn": "scikit-learn"}
# Declared for what mcgrad imports through another package: jax's compiled backend.
DECLARED_NOT_IMPORTED = {"jaxlib"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("mcgrad", "models"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(source)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("mcgrad-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_installs_only_mcgrad(wheel):
    top_level = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"mcgrad"}
    names = set(wheel.namelist())
    assert {"mcgrad/__init__.py", "mcgrad/inference/checks.py", "mcgrad/estimators/log_prob.py"} <= names


def requirement_names(wheel: zipfile.ZipFile) -> set[str]:
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    names = set()
    for line in wheel.read(metadata).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            names.add(re.split(r"[\s<>=!~;\[(]", line.split(":", 1)[1].strip(), maxsplit=1)[0].lower())
    return names


def imported_distributions() -> set[str]:
    """Third-party distributions that mcgrad's modules import (any ``import``, at any depth)."""
    names = set()
    for path in (ROOT / "mcgrad").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    third_party = names - set(sys.stdlib_module_names) - {"mcgrad", "__future__"}
    return {DISTRIBUTIONS.get(name, name).lower() for name in third_party}


def test_declared_dependencies_match_imports(wheel):
    declared, imported = requirement_names(wheel), imported_distributions()
    assert imported - declared == set(), "imported but not declared"
    assert declared - imported == DECLARED_NOT_IMPORTED, "declared but never imported"
    assert {"scipy", "numpy", "xarray"} <= declared  # imported directly, not only through others


def test_mcgrad_itself_does_not_import_models():
    for path in (ROOT / "mcgrad").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = (
                [alias.name for alias in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            )
            assert not any(m == "models" or m.startswith("models.") for m in modules), path


def test_examples_run_from_the_repository_root():
    """``python -m models.<name>`` resolves from the root without an install: its folder comes first."""
    code = "import models.gaussian, pathlib; print(pathlib.Path(models.gaussian.__file__).resolve())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == ROOT / "models" / "gaussian.py"
