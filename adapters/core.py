"""Small operations every site can offer: connectivity checks and benchmarks."""

from __future__ import annotations

from typing import Any

from pydantic import Field, JsonValue

from dfm_prefect.core.operations import OperationContext, OperationParams, operation


class EchoParams(OperationParams):
    value: JsonValue = None


@operation("core.echo", version="1", result="value")
def echo(params: EchoParams, ctx: OperationContext) -> Any:
    """Return the value it was given: a no-op for checks and overhead benchmarks."""
    return params.value


class SleepParams(OperationParams):
    seconds: float = Field(ge=0, le=3600)


@operation("core.sleep", version="1", result="value")
def sleep(params: SleepParams, ctx: OperationContext) -> float:
    """Wait (cancellably) and return the seconds waited: for load and timeout checks."""
    ctx.sleep(params.seconds)
    return params.seconds
