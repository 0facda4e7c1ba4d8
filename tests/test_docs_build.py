"""The documentation site builds with ``mkdocs build --strict``, API reference included.

Strict mode turns every warning into a failure: a broken link between pages, a docstring
whose ``Args:`` name a parameter the signature lacks, an unresolved cross-reference.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Public names the API reference must show; each is the heading of its entry.
STABLE_NAMES = ["grad", "score_function", "pathwise", "measure_valued", "fit"]


def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = result.stdout + result.stderr
    warnings = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0, "mkdocs build --strict failed:\n" + ("\n".join(warnings) or log)

    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in STABLE_NAMES:
        heading = f'<span class="doc doc-object-name doc-function-name">{name}</span>'
        assert heading in api, f"the API reference has no entry for mg.{name}"
    # Doctest examples render as code, not as markdown quotes of ">>>".
    assert "<blockquote>" not in api
