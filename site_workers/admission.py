"""Admission of a run request: is the operation offered here, and are its parameters valid?

Nothing runs until both hold. Names are looked up in the site's own allow-list,
never imported; parameters are size-checked before their pydantic model parses
them, and every reference in them must point into this site's own store.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from dfm_prefect.core.errors import InvalidParametersError, UnknownOperationError
from dfm_prefect.core.operations import MOVE, Operation
from dfm_prefect.core.wire import RunRequest
from site_workers.answers import refs_in, validation_message
from site_workers.config import USER_CODE_OPERATION, Limits
from site_workers.views import Views


def operation_for(request: RunRequest, operations: dict[str, Operation], site: str) -> Operation:
    """The operation a request names, if this site offers it (that name and version), else `UnknownOperationError`."""
    op = operations.get(request.op)
    if op is None:
        if request.op == USER_CODE_OPERATION:
            raise UnknownOperationError(
                f"operation {request.op!r} is not offered here: this site does not run code sent by clients "
                "(its administrator has not opted in with user_code.enabled; see docs/security.md)",
                site=site,
            )
        raise UnknownOperationError(
            f"operation {request.op!r} is not offered here (it is not in this site's allow-list); "
            f"this site offers {sorted(operations)}",
            site=site,
        )
    if request.version is not None and request.version != op.version:
        raise UnknownOperationError(
            f"operation {request.op!r} version {request.version!r} is not offered here (this site has version {op.version!r})",
            site=site,
        )
    return op


def move_params(request: RunRequest, limits: Limits, site: str) -> Any:
    """The parameters of a ``dfm.move`` request (a reference held by another site), size-checked first."""
    size = len(json.dumps(request.params, separators=(",", ":")))
    if size > limits.max_params_bytes:
        raise InvalidParametersError(f"parameters of 'dfm.move' are {size} bytes; this site accepts at most {limits.max_params_bytes}", site=site)
    try:
        return MOVE.params.model_validate(request.params)
    except ValidationError as exc:
        raise InvalidParametersError(f"invalid parameters for 'dfm.move': {validation_message(exc)}", site=site) from None


def validated_params(op: Operation, request: RunRequest, limits: Limits, held: Views, site: str) -> Any:
    """The request's parameters validated by the operation's model, size-checked first; every `DataRef` in them must be this site's.

    ``held`` says which references are this site's: results in its store, and views it made.
    """
    size = len(json.dumps(request.params, separators=(",", ":")))
    if size > limits.max_params_bytes:
        raise InvalidParametersError(
            f"parameters of {op.name!r} are {size} bytes; this site accepts at most "
            f"{limits.max_params_bytes}",
            site=site,
        )
    try:
        params = op.params.model_validate(request.params)
    except ValidationError as exc:
        raise InvalidParametersError(
            f"invalid parameters for {op.name!r}: {validation_message(exc)}", site=site
        ) from None
    for value in params.__dict__.values():
        for ref in refs_in(value):
            held.check_owned(ref)
    return params


def check_streaming(op: Operation, request: RunRequest, site: str) -> None:
    """A streaming operation is asked for as a stream (with a window), any other one without."""
    if op.stream and request.window is None:
        raise InvalidParametersError(
            f"{op.name} streams its results: ask for it with client.stream(...), or in a flow call it and iterate the items",
            site=site,
        )
    if not op.stream and request.window is not None:
        raise InvalidParametersError(f"{op.name} sends one result, not a stream: run it with client.run(...) or client.call(...)", site=site)
