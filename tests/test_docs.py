"""Every ```python block in README.md and docs/**/*.md runs.

One test per page: its blocks run in order in one namespace (as a reader would run
them), in a temporary working directory. Blocks fenced as ```text, ```bash etc. are not
run. Pages run under JAX's default rank promotion ("allow"), as users' code does.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python blocks of a markdown page, in order."""
    return PYTHON_BLOCK.findall(text)


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n```bash\nrm -rf /\n```\n```text\nno\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x\n"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_page_runs(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for index, block in enumerate(python_blocks(page.read_text(encoding="utf-8"))):
        code = compile(block, f"{page.relative_to(ROOT)} (python block {index + 1})", "exec")
        with jax.numpy_rank_promotion("allow"):
            exec(code, namespace)
