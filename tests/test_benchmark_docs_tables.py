"""benchmarks/docs_tables.py: each benchmark's --update-docs finds its markers in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("benchmark_docs_tables", ROOT / "benchmarks" / "docs_tables.py")
docs_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs_tables)


@pytest.mark.parametrize("name", ["estimators benchmark", "fit_speed", "auto", "labels", "workflow"])
def test_a_table_replaces_only_what_lies_between_its_markers(name, tmp_path):
    docs = tmp_path / "benchmarks.md"
    shutil.copy(docs_tables.DOCS, docs)
    before = docs.read_text(encoding="utf-8")
    start, end = docs_tables.markers(name)
    docs_tables.replace_table(name, "| a | b |\n|---|---|\n", docs=docs)
    after = docs.read_text(encoding="utf-8")
    assert after[:after.index(start)] == before[:before.index(start)]
    assert after[after.index(end):] == before[before.index(end):]
    assert after[after.index(start):after.index(end)] == f"{start}\n\n| a | b |\n|---|---|\n"


def test_a_missing_section_is_added_with_its_heading(tmp_path):
    docs = tmp_path / "page.md"
    docs.write_text("# Benchmarks\n", encoding="utf-8")
    docs_tables.replace_table("new", "| x |", docs=docs, heading="New")
    assert docs.read_text(encoding="utf-8") == "# Benchmarks\n\n## New\n\n<!-- new table: start -->\n\n| x |\n<!-- new table: end -->\n"
