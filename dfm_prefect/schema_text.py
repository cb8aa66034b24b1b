"""Operation parameters and config keys as people read them: name, type, default, description.

Works from JSON Schema (what a pydantic model's ``model_json_schema()`` gives and
what a site's catalog sends for each operation), so the command line, which
sees only the catalog, and the documentation, which sees the installed models,
describe parameters the same way.

Example:

```python
from adapters.tables import GroupbyAggregateParams
from dfm_prefect.schema_text import parameter_rows

for row in parameter_rows(GroupbyAggregateParams.model_json_schema()):
    print(row.name, row.type, row.default, row.description)
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_CONSTRAINTS = (
    ("minimum", ">= {}"),
    ("exclusiveMinimum", "> {}"),
    ("maximum", "<= {}"),
    ("exclusiveMaximum", "< {}"),
    ("minLength", "at least {} characters"),
    ("maxLength", "at most {} characters"),
    ("minItems", "at least {} items"),
    ("maxItems", "at most {} items"),
    ("minProperties", "at least {} entries"),
    ("maxProperties", "at most {} entries"),
)


@dataclass(frozen=True)
class ParameterRow:
    """One parameter (or config key) described for people."""

    name: str
    type: str
    default: str
    required: bool
    description: str


def _definition(schema: dict[str, Any], defs: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        name = ref.rsplit("/", 1)[1]
        return name, defs.get(name, {})
    return None, schema


def _grouped(text: str) -> str:
    return f"({text})" if " | " in text else text


DATA_INPUT_TEXT = "DataRef or source"
DATA_INPUT_DESCRIPTION = "The data: a source of the site (its name, dfm://site/source or a URL under it) or a DataRef the site holds."


def type_text(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> str:
    """A short, readable type: ``list of string``, ``'mean' | 'sum'``, ``DataRef or source``, ``Condition``..."""
    defs = defs or {}
    name, schema = _definition(schema, defs)
    if name is not None:
        return name
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            parts = [type_text(part, defs) for part in schema[key]]
            if "DataRef" in parts and "string" in parts:  # DataInput: a result held at the site, or a source
                parts = [DATA_INPUT_TEXT if p == "DataRef" else p for p in parts if p != "string"]
            return " | ".join(dict.fromkeys(parts))
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return type_text(schema["allOf"][0], defs)
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items")
        if isinstance(items, dict) and items:
            return f"list of {_grouped(type_text(items, defs))}"
        if "prefixItems" in schema:
            return "[" + ", ".join(type_text(p, defs) for p in schema["prefixItems"]) + "]"
        return "list"
    if kind == "object":
        values = schema.get("additionalProperties")
        if isinstance(values, dict) and values:
            keys = schema.get("propertyNames")
            key_text = type_text(keys, defs) if isinstance(keys, dict) and keys else "string"
            return f"mapping of {key_text} to {_grouped(type_text(values, defs))}"
        return "mapping"
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    return str(kind) if kind else "any"


def constraints_text(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> str:
    """The bounds a value must respect (``>= 0``, ``at most 256 items``), or ''.

    Regular expressions are left to the JSON schema (``catalog --json``): descriptions say what a name may be.
    """
    _, schema = _definition(schema, defs or {})
    found = [template.format(schema[key]) for key, template in _CONSTRAINTS if key in schema]
    for key in ("anyOf", "oneOf"):
        for part in schema.get(key, []):
            text = constraints_text(part, defs)
            if text:
                found.append(text)
    return ", ".join(dict.fromkeys(found))


def default_text(field: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in field:
        return "empty"  # a default_factory (an empty list or mapping): JSON Schema does not show it
    return json.dumps(field["default"])


def parameter_rows(schema: dict[str, Any]) -> list[ParameterRow]:
    """One row per property of an object schema, in declaration order (required ones first as declared)."""
    defs = schema.get("$defs", {})
    required = set(schema.get("required", []))
    rows = []
    for name, field in schema.get("properties", {}).items():
        description = " ".join(str(field.get("description", "")).split())
        kind = type_text(field, defs)
        if not description and kind.startswith(DATA_INPUT_TEXT):
            description = DATA_INPUT_DESCRIPTION
        bounds = constraints_text(field, defs)
        if bounds:
            description = f"{description} ({bounds})" if description else bounds
        rows.append(
            ParameterRow(
                name=name,
                type=kind,
                default=default_text(field, name in required),
                required=name in required,
                description=description,
            )
        )
    return rows


def referenced_models(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The nested object models a schema names (``Condition``, ``Range``...), each a schema of its own."""
    return {name: {**definition, "$defs": schema.get("$defs", {})} for name, definition in schema.get("$defs", {}).items()
            if definition.get("type") == "object" and definition.get("properties") and name != "DataRef"}
