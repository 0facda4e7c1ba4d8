"""MkDocs hook and griffe extension behind docs/api.md (the API reference).

``on_page_markdown`` (an MkDocs hook, see ``hooks:`` in mkdocs.yml) writes the body of
docs/api.md from ``mcgrad.__all__``; ``ReadableDocstrings`` (a griffe extension, see the
mkdocstrings ``extensions:`` option) adapts the reST habits of mcgrad's docstrings to
what mkdocstrings renders.

Why a hook rather than a plain ``::: mcgrad``: several public functions share their name
with the module that defines them (``mg.pathwise`` is defined in
``mcgrad/estimators/pathwise.py``, ``mg.fit`` in ``mcgrad/fit.py``). Python binds the
package attribute to the function, but griffe, which mkdocstrings reads the code with,
keeps the submodule under that name, so ``::: mcgrad`` would document the modules and
drop the functions. The hook asks Python instead: for each name in ``mcgrad.__all__`` it
takes ``getattr(mcgrad, name)`` and documents it under the path where it is defined.
Names that are modules get a section of their own, without the members already shown
at the top level. Nothing here lists mcgrad's names, so renames need no edit.
"""

from __future__ import annotations

import importlib
import inspect
import re
import textwrap
from types import ModuleType

import griffe

PACKAGE = "mcgrad"
MARKER = "<!-- api-reference -->"


def _definition_path(name: str, value: object) -> str:
    """Where griffe finds ``value``: its defining module and qualified name."""
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if (inspect.isclass(value) or inspect.isfunction(value)) and module and qualname and "<" not in qualname:
        return f"{module}.{qualname}"
    return f"{PACKAGE}.{name}"


def _block(path: str, heading_level: int, **options: object) -> str:
    lines = [f"::: {path}", "    options:", f"      heading_level: {heading_level}"]
    lines += [f"      {key}: {value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def api_reference() -> str:
    """The markdown of the API reference, one mkdocstrings block per public name."""
    package = importlib.import_module(PACKAGE)
    values = {name: getattr(package, name) for name in package.__all__}
    modules = sorted(name for name, value in values.items() if isinstance(value, ModuleType))
    members = {name: value for name, value in values.items() if not isinstance(value, ModuleType)}
    functions = sorted((name for name, value in members.items() if not inspect.isclass(value)), key=str.lower)
    types = sorted((name for name, value in members.items() if inspect.isclass(value)), key=str.lower)
    documented = {id(value): name for name, value in members.items()}

    parts = [f"## `{PACKAGE}`\n", "`import mcgrad as mg`; each of these is `mg.<name>`.\n"]
    for title, names in (("Functions", functions), ("Types", types)):
        if names:
            parts.append(f"### {title}\n")
            for name in names:
                path = _definition_path(name, members[name])
                parts.append(_block(path, 4, show_root_heading="true", show_root_full_path="false"))
    for name in modules:
        module = values[name]
        shown = sorted(
            attribute
            for attribute, value in vars(module).items()
            if documented.get(id(value)) == attribute and getattr(value, "__module__", None) == module.__name__
        )
        parts.append(f"## `{module.__name__}`\n")
        if shown:
            links = ", ".join(f"[`{attribute}`][{_definition_path(attribute, vars(module)[attribute])}]" for attribute in shown)
            parts.append(f"Also in this module, documented above as `mg.<name>`: {links}.\n")
        filters = ["!^_"] + [f"!^{attribute}$" for attribute in shown]
        parts.append(_block(module.__name__, 3, show_root_heading="false", show_root_toc_entry="false", filters=filters))
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, api_reference())


# Griffe reads "Examples:" as a section of doctest blocks, but "Example:" as an admonition
# of markdown text, where ">>>" is a quote. Sphinx roles (:func:`chain`), literal-block
# markers ("composes them::") and ".. math::" mean nothing in markdown, and markdown reads
# the underscores of LaTeX as emphasis: the math is shown as a code block of LaTeX.
_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_SPHINX_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`~?([^`]+)`")
_LITERAL_MARKER = re.compile(r"^(?!\s*(?:\.\.|>>>))(.*[^\s:])::[ \t]*$", re.MULTILINE)
# ".. math:: first line" and the lines indented under it (blank lines between allowed).
_MATH = re.compile(r"^([ \t]*)\.\. math::[ \t]*(.*)\n((?:(?:[ \t]*\n)*\1[ \t]+\S.*\n)*)", re.MULTILINE)


def _math_as_code(match: re.Match) -> str:
    indent, first, rest = match.groups()
    lines = ([first.strip()] if first.strip() else []) + textwrap.dedent(rest).strip("\n").splitlines()
    return "".join(f"{indent}{line}\n" for line in ["```", *lines, "```"])


def readable_docstring(text: str) -> str:
    """``text`` with "Example:" read as "Examples:", roles as code, ``::`` as ``:``, and
    ``.. math::`` as a code block."""
    text = _MATH.sub(_math_as_code, text + "\n")[:-1]
    text = _EXAMPLE_HEADER.sub(r"\1Examples:", text)
    text = _SPHINX_ROLE.sub(r"`\1`", text)
    return _LITERAL_MARKER.sub(r"\1:", text)


class ReadableDocstrings(griffe.Extension):
    """Applies `readable_docstring` to every docstring griffe loads."""

    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = readable_docstring(obj.docstring.value)
