"""Operations a site builds from its own config: parameter models from typed declarations, bound functions.

A named query, a program or a service operation is declared by the site's
administrator in YAML, not in a Python package, so its parameter model is built
when the site starts: :func:`params_model` turns typed parameter declarations
(``{type: date}``, ``{type: string, choices: [a, b]}``) into a frozen pydantic
model with ``extra="forbid"``, which validates every request before anything
runs and gives the catalog its JSON schema. :func:`bound_operation` makes the
`Operation` whose function holds the site's private resources (an engine, a
service's credentials) in a closure: they are never parameters.

Example:

```python
model = params_model("query.since", {"since": spec})     # spec.type == "date"
model.model_validate({"since": "2024-03-01"}).since       # datetime.date(2024, 3, 1)
```
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional

from pydantic import Field, StrictBool, StrictInt, create_model

from dfm_prefect.core.operations import Operation, OperationParams
from dfm_prefect.core.refs import ResultKind

_TYPES: dict[str, Any] = {
    "string": str,
    "integer": StrictInt,
    "number": float,
    "boolean": StrictBool,
    "date": dt.date,
    "datetime": dt.datetime,
}


def _field(spec: Any) -> tuple[Any, Any]:
    """(annotation, FieldInfo) for one declared parameter (a `ParamSpec` of the site config)."""
    annotation: Any = _TYPES[spec.type]
    if spec.choices is not None:
        annotation = Literal[tuple(spec.choices)]
    constraints: dict[str, Any] = {"description": spec.description or None}
    if spec.type in ("integer", "number"):
        constraints.update(ge=spec.minimum, le=spec.maximum)
    if spec.type == "string" and spec.choices is None:
        constraints.update(max_length=spec.max_length, pattern=spec.pattern)
    if spec.is_required:
        return annotation, Field(..., **constraints)
    return Optional[annotation], Field(default=spec.default, **constraints)


def params_model(name: str, specs: Mapping[str, Any], *, extra: Mapping[str, tuple[Any, Any]] | None = None) -> type[OperationParams]:
    """A frozen, ``extra="forbid"`` parameter model for operation ``name`` from typed declarations (plus ``extra`` fields)."""
    fields: dict[str, Any] = {key: _field(spec) for key, spec in specs.items()}
    fields.update(extra or {})
    title = "".join(part.capitalize() for part in name.replace("-", "_").replace(".", "_").split("_")) + "Params"
    model: type[OperationParams] = create_model(title, __base__=OperationParams, **fields)
    return model


def bound_operation(
    fn: Callable[[Any, Any], Any], *, name: str, result: ResultKind, params: type[OperationParams], description: str, version: str = "1"
) -> Operation:
    """An `Operation` for this site only (never put in the process-wide registry): ``fn(params, ctx)`` with resources bound."""
    op = Operation(fn, name=name, version=version, result=result, params=params)
    op.description = description
    return op
