"""HTTP services a site declares (AI inference first among them): ``service.<name>.<operation>``.

The site's administrator names a service's base URL, ships its OpenAPI
document, and lists the operationIds clients may call (`ServiceConfig` in the
site config). Each becomes an operation whose parameters are the
operationId's path and query parameters and its JSON body, typed from the
document and checked against it before any call. The site makes the call with
its own credentials (headers from its environment), only to its base URL:
clients never supply a URL, redirects are refused, and an answer that is
slower than the service's ``timeout_s`` or larger than its
``max_response_bytes`` is cut off. A ``data`` parameter lets a flow send rows
held at the site (a `DataRef` or a table source) as the request body, so that
inference runs next to the data and its predictions stay there as a table.

Example (a site with ``services: [{name: risk, ...}]`` offering ``predict``):

```python
from dfm_prefect import get_client

scores = get_client().call("north", "service.risk.predict", {"data": "visits"})   # a DataRef to a table
```
"""

from __future__ import annotations

import json
import re
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from pydantic import Field, JsonValue, StrictBool, StrictInt

from adapters.declared import bound_operation, params_model
from dfm_prefect.core.errors import ConfigError, InvalidParametersError, OperationFailedError
from dfm_prefect.core.operations import DataInput, Operation

_METHODS = ("get", "post", "put", "patch", "delete")
_PRIMITIVES: dict[str, Any] = {"integer": StrictInt, "number": float, "string": str, "boolean": StrictBool}
_MAX_REF_DEPTH = 32


def operation_name(service: str, operation_id: str) -> str:
    """``service.<service>.<operationId in snake_case>`` (``predictBatch`` -> ``predict_batch``)."""
    snake = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", operation_id).lower()
    return f"service.{service}.{re.sub(r'[^a-z0-9_]+', '_', snake).strip('_')}"


def _load_document(path: str) -> dict[str, Any]:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the OpenAPI document {path}: {exc.strerror}") from None
    document = yaml.safe_load(text)  # JSON is YAML too
    if not isinstance(document, dict) or "paths" not in document:
        raise ConfigError(f"{path} is not an OpenAPI document (no paths)")
    return document


def _inline(schema: Any, document: dict[str, Any], depth: int = 0) -> Any:
    """``schema`` with its local ``$ref``s replaced by what they point at (no remote refs, bounded depth)."""
    if depth > _MAX_REF_DEPTH:
        raise ConfigError("the OpenAPI document's $refs nest too deep (or form a cycle)")
    if isinstance(schema, dict):
        if "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#/"):
                raise ConfigError(f"only local $refs are followed, not {ref!r}")
            target: Any = document
            for part in ref[2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            return _inline(target, document, depth + 1)
        return {key: _inline(value, document, depth + 1) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(item, document, depth + 1) for item in schema]
    return schema


class _Endpoint:
    """One offered operationId: method, path template, parameters and body schema from the document."""

    def __init__(self, document: dict[str, Any], operation_id: str) -> None:
        for path, item in document["paths"].items():
            for method in _METHODS:
                spec = item.get(method)
                if isinstance(spec, dict) and spec.get("operationId") == operation_id:
                    self.method, self.path = method.upper(), path
                    self.summary = spec.get("summary") or spec.get("description") or ""
                    shared = item.get("parameters", [])
                    self.parameters = [_inline(p, document) for p in [*shared, *spec.get("parameters", [])]]
                    body = _inline(spec.get("requestBody", {}), document)
                    self.body_required = bool(body.get("required"))
                    self.body_schema = body.get("content", {}).get("application/json", {}).get("schema") if body else None
                    return
        raise ConfigError(f"the OpenAPI document has no operationId {operation_id!r}")

    def fields(self, data_field: str | None) -> dict[str, tuple[Any, Any]]:
        """Pydantic fields: one per path/query parameter, ``body`` for the JSON body, ``data`` for rows sent as part of it."""
        fields: dict[str, tuple[Any, Any]] = {}
        for param in self.parameters:
            if param.get("in") not in ("path", "query"):
                continue
            schema = param.get("schema", {})
            annotation = _PRIMITIVES.get(schema.get("type"), JsonValue)
            extra = {"json_schema_extra": schema, "description": param.get("description")}
            if param.get("required") or param.get("in") == "path":
                fields[param["name"]] = (annotation, Field(..., **extra))
            else:
                fields[param["name"]] = (Optional[annotation], Field(default=None, **extra))
        if self.body_schema is not None:
            extra = {"json_schema_extra": self.body_schema, "description": "The JSON body (checked against the service's schema)."}
            required = self.body_required and data_field is None
            fields["body"] = (JsonValue, Field(..., **extra)) if required else (Optional[JsonValue], Field(default=None, **extra))
        if data_field is not None:
            fields["data"] = (DataInput, Field(..., description=f"A table held at the site; its rows are sent as the body's {data_field!r}."))
        return fields


def bind_services(configs: list[Any], offered: list[str]) -> dict[str, Operation]:
    """One operation per offered operationId of every declared service (the ``dfm_prefect.site_bindings`` entry point ``services``)."""
    ops: dict[str, Operation] = {}
    for service in configs:
        document = _load_document(service.openapi)
        for operation_id, mapping in service.operations.items():
            endpoint = _Endpoint(document, operation_id)
            if mapping.data_field is not None and endpoint.body_schema is None:
                raise ConfigError(f"service {service.name!r}: {operation_id} takes no JSON body, so it cannot take data_field")
            name = operation_name(service.name, operation_id)
            if name in ops:
                raise ConfigError(f"service {service.name!r}: two operationIds become {name!r}")
            ops[name] = bound_operation(
                partial(call_service, service, endpoint, mapping),
                name=name,
                result=mapping.result,
                params=params_model(name, {}, extra=endpoint.fields(mapping.data_field)),
                description=mapping.description or endpoint.summary or f"{endpoint.method} {endpoint.path} of service {service.name!r}.",
            )
    return ops


def call_service(service: Any, endpoint: _Endpoint, mapping: Any, params: Any, ctx: Any) -> Any:
    """Validate the request against the document, call the service at its base URL only, map its answer."""
    values = params.model_dump(mode="json")
    rows = None
    body = values.get("body")
    if mapping.data_field is not None:
        rows = _rows(ctx, params.data)
        body = {**(body or {}), mapping.data_field: json.loads(rows.to_json(orient="records", date_format="iso"))}
    _check_parameters(endpoint, values, service.name)
    _check_body(endpoint, body, service.name)
    url = service.base_url.rstrip("/") + _fill_path(endpoint, values)
    query = {p["name"]: values[p["name"]] for p in endpoint.parameters if p.get("in") == "query" and values.get(p["name"]) is not None}
    payload = json.dumps(body).encode() if body is not None else None
    if payload is not None and len(payload) > service.max_request_bytes:
        raise InvalidParametersError(f"the request body is {len(payload)} bytes; service {service.name!r} takes at most {service.max_request_bytes}")
    answer = _exchange(service, endpoint.method, url, query, payload, ctx)
    return _result(answer, mapping, rows, service.name)


def _rows(ctx: Any, data: Any) -> Any:
    import pandas as pd

    value = ctx.open(data)
    if hasattr(value, "dask") and hasattr(value, "columns"):
        (value,) = ctx.compute(value)
    if not isinstance(value, pd.DataFrame):
        raise InvalidParametersError(f"data must be a table (got {type(value).__name__})")
    return value.reset_index(drop=True)


def _check_body(endpoint: _Endpoint, body: Any, service: str) -> None:
    import jsonschema

    if endpoint.body_schema is None:
        if body is not None:
            raise InvalidParametersError(f"{endpoint.method} {endpoint.path} of service {service!r} takes no body")
        return
    if body is None:
        if endpoint.body_required:
            raise InvalidParametersError(f"{endpoint.method} {endpoint.path} of service {service!r} needs a JSON body")
        return
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(endpoint.body_schema).iter_errors(body))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(the body)"
        raise InvalidParametersError(f"the body does not fit service {service!r}'s schema at {where}: {error.message[:300]}")


def _check_parameters(endpoint: _Endpoint, values: dict[str, Any], service: str) -> None:
    """Path and query values against their schemas in the document (ranges, patterns, enums), not only their types."""
    import jsonschema

    for param in endpoint.parameters:
        value = values.get(param["name"])
        if param.get("in") in ("path", "query") and value is not None:
            error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(param.get("schema", {})).iter_errors(value))
            if error is not None:
                raise InvalidParametersError(f"parameter {param['name']!r} does not fit service {service!r}'s schema: {error.message[:300]}")


def _fill_path(endpoint: _Endpoint, values: dict[str, Any]) -> str:
    # Every path parameter is one quoted segment: '/' or '..' in a value cannot leave the path the document declares.
    path = endpoint.path
    for param in endpoint.parameters:
        if param.get("in") == "path":
            path = path.replace("{" + param["name"] + "}", quote(str(values[param["name"]]), safe=""))
    return path


def _exchange(service: Any, method: str, url: str, query: dict[str, Any], payload: bytes | None, ctx: Any) -> Any:
    """One call: no redirects followed, the whole answer within ``timeout_s`` and ``max_response_bytes``."""
    import httpx

    deadline = time.monotonic() + service.timeout_s
    headers = {**service.headers, "Accept": "application/json"}
    if payload is not None:
        headers["Content-Type"] = "application/json"
    try:
        with httpx.Client(follow_redirects=False, timeout=httpx.Timeout(service.timeout_s), trust_env=False) as http:
            with http.stream(method, url, params=query, content=payload, headers=headers) as response:
                if response.is_redirect:
                    raise OperationFailedError(
                        f"service {service.name!r} answered with a redirect ({response.status_code}); the site calls only its declared base URL"
                    )
                if response.status_code >= 400:
                    kind = InvalidParametersError if response.status_code in (400, 404, 422) else OperationFailedError
                    raise kind(f"service {service.name!r} answered {response.status_code} {response.reason_phrase}")
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > service.max_response_bytes:
                        raise OperationFailedError(f"service {service.name!r} answered more than {service.max_response_bytes} bytes; the site stopped reading")
                    if time.monotonic() > deadline:
                        raise OperationFailedError(f"service {service.name!r} did not answer within {service.timeout_s:g} s")
                    ctx.check_cancelled()
                    chunks.append(chunk)
    except httpx.TimeoutException:
        raise OperationFailedError(f"service {service.name!r} did not answer within {service.timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise OperationFailedError(f"service {service.name!r} could not be reached ({type(exc).__name__})") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise OperationFailedError(f"service {service.name!r} answered something that is not JSON") from None


def _result(answer: Any, mapping: Any, rows: Any, service: str) -> Any:
    import pandas as pd

    if mapping.response_field is not None:
        if not isinstance(answer, dict) or mapping.response_field not in answer:
            raise OperationFailedError(f"service {service!r} answered without the field {mapping.response_field!r}")
        answer = answer[mapping.response_field]
    if mapping.result == "value":
        return answer
    if mapping.append_to_input:
        if not isinstance(answer, list) or len(answer) != len(rows):
            raise OperationFailedError(f"service {service!r} answered {len(answer) if isinstance(answer, list) else 'no list of'} values for {len(rows)} rows")
        return rows.assign(**{mapping.append_to_input: answer})
    try:
        return pd.DataFrame(answer)
    except (ValueError, TypeError):
        raise OperationFailedError(f"service {service!r} answered something that is not a table (records or columns)") from None
