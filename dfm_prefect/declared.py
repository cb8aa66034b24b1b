"""Operations a site declares in its own YAML (named queries, service calls, programs), as tasks for flows.

``query.<name>``, ``service.<name>.<operation>`` and ``program.<name>`` exist only
at the sites that declare them, not in an installed package, so a flow gets them
from the federation's catalog: :func:`site_operation` builds an operation from
the parameter schema the sites publish, and it is used like any other
(``.submit``, ``.map``, ``site=``, retries). Each site still validates the
parameters with its own model; nothing here is trusted by a site.

Example (in a flow on `FederationTaskRunner`):

```python
from prefect import flow
from dfm_prefect import FederationTaskRunner, site_operation

@flow(task_runner=FederationTaskRunner())
def stays():
    stays_since = site_operation("query.stays_since")
    return [stays_since.submit(since="2024-01-01", site=site).result() for site in ("north", "south")]
```
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, create_model

from dfm_prefect.core.errors import UnknownOperationError
from dfm_prefect.core.operations import DataInput, Operation, OperationParams


def _names_data(spec: dict[str, Any]) -> bool:
    """True for a parameter whose schema admits a `DataRef` (a reference or a source name)."""
    text = repr(spec)
    return "DataRef" in text


def _declared_here(params: OperationParams, ctx: Any) -> Any:
    raise UnknownOperationError("this operation is declared by sites and runs only there")


def site_operation(name: str, federation: Any = None) -> Operation:
    """The operation ``name`` as the federation's sites publish it, ready for ``.submit`` in a flow.

    ``federation`` as for `get_client` (default: the running flow's federation,
    or ``$DFM_FEDERATION``). Raises `UnknownOperationError` if no site offers it.
    """
    from dfm_prefect.client import _current_runner, get_client

    runner = _current_runner() if federation is None else None
    client = runner.client if runner is not None else get_client(federation)
    offered = [(site, info.operations[name]) for site, info in sorted(client.sites.items()) if name in info.operations]
    if not offered:
        raise UnknownOperationError(f"no site of the federation offers {name!r}; see `dfm-prefect catalog`")
    _, info = offered[0]
    schema = info.params_schema
    required = set(schema.get("required", []))
    fields: dict[str, Any] = {}
    for field, spec in schema.get("properties", {}).items():
        annotation: Any = DataInput if _names_data(spec) else Any
        description = spec.get("description")
        if field in required:
            fields[field] = (annotation, Field(..., description=description))
        else:
            fields[field] = (Optional[annotation], Field(default=spec.get("default"), description=description))
    title = "".join(part.capitalize() for part in name.replace("-", "_").replace(".", "_").split("_")) + "Params"
    model = create_model(title, __base__=OperationParams, **fields)
    return Operation(_declared_here, name=name, version=info.version, result=info.result_kind, params=model)
