"""Where every benchmark puts its table: between its markers in ``docs/benchmarks.md``."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).parent.parent / "docs" / "benchmarks.md"


def markers(name: str) -> tuple[str, str]:
    """``<!-- {name} table: start -->`` and ``<!-- {name} table: end -->``."""
    return f"<!-- {name} table: start -->", f"<!-- {name} table: end -->"


def replace_table(name: str, table: str, docs: Path = DOCS, heading: str | None = None) -> None:
    """Put ``table`` between ``name``'s markers in ``docs`` (with ``heading``, a section of
    that title holding the markers is added at the end where they are missing)."""
    start, end = markers(name)
    text = docs.read_text(encoding="utf-8")
    if heading is not None and start not in text:
        text += f"\n## {heading}\n\n{start}\n{end}\n"
    begin, finish = text.index(start) + len(start), text.index(end)
    docs.write_text(text[:begin] + "\n\n" + table.strip("\n") + "\n" + text[finish:], encoding="utf-8")
