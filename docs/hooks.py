"""MkDocs hook: the reference sections are generated from the code at build time, so they cannot drift.

A page asks for a section with a marker on a line of its own:

- ``<!-- dfm:site-config -->`` every key of a site's YAML, from the pydantic models of `site_workers.config`;
- ``<!-- dfm:operations -->`` every installed operation, from its parameter model and docstring;
- ``<!-- dfm:combine -->`` the public functions of `adapters.combine`, from their signatures and docstrings.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

MARKER = re.compile(r"^<!-- dfm:([a-z-]+) -->$", re.M)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


def _table(schema: dict[str, Any], *, first: str) -> str:
    from dfm_prefect.schema_text import parameter_rows

    rows = parameter_rows(schema)
    lines = [f"| {first} | type | default | description |", "|---|---|---|---|"]
    for row in rows:
        default = "see below" if row.default.startswith("{") else row.default
        lines.append(f"| `{row.name}` | {_cell(row.type)} | {_cell(default)} | {_cell(row.description)} |")
    return "\n".join(lines)


def _doc(text: str | None) -> str:
    # reStructuredText's "Example::" before an indented block: in Markdown the indented block is already code.
    return re.sub(r"::\n", ":\n", inspect.cleandoc(text or "").replace("``", "`"))


def site_config() -> str:
    from site_workers.config import SiteConfig

    schema = SiteConfig.model_json_schema()
    defs = schema.get("$defs", {})
    out = ["### The top level", "", _doc(SiteConfig.__doc__), "", _table(schema, first="key")]
    for name, definition in defs.items():
        if definition.get("type") != "object" or not definition.get("properties"):
            continue
        out += ["", f"### {name}", "", _doc(definition.get("description")), "", _table({**definition, "$defs": defs}, first="key")]
    return "\n".join(out)


def operations() -> str:
    from dfm_prefect.core.operations import load_operations
    from dfm_prefect.schema_text import referenced_models

    out = []
    for name, op in sorted(load_operations().items()):
        module = op.fn.__module__
        schema = op.params.model_json_schema()
        out += [
            f"### `{name}`",
            "",
            f"Result kind **{op.result_kind}**, version {op.version}. In a flow: `from {module} import {op.fn.__name__}`.",
            "",
            _doc(op.description),
            "",
            _table(schema, first="parameter"),
        ]
        for nested, nested_schema in referenced_models(schema).items():
            out += ["", f"`{nested}`: {_doc(nested_schema.get('description')).splitlines()[0] if nested_schema.get('description') else ''}", "",
                    _table(nested_schema, first="field")]
        out.append("")
    return "\n".join(out)


def combine() -> str:
    import adapters.combine as combine_module

    out = []
    for name, fn in inspect.getmembers(combine_module, inspect.isfunction):
        if name.startswith("_") or fn.__module__ != combine_module.__name__:
            continue
        out += [f"### `{name}{inspect.signature(fn)}`", "", _doc(fn.__doc__), ""]
    return "\n".join(out)


SECTIONS: dict[str, Callable[[], str]] = {"site-config": site_config, "operations": operations, "combine": combine}


def on_page_markdown(markdown: str, **_: Any) -> str:
    def expand(match: re.Match[str]) -> str:
        try:
            return SECTIONS[match.group(1)]()
        except KeyError:
            raise ValueError(f"unknown reference section {match.group(1)!r}; known: {sorted(SECTIONS)}") from None

    return MARKER.sub(expand, markdown)
