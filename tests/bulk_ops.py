"""An operation with a result as large as asked for (listed under operation_modules by the FLARE tests)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from dfm_prefect.core.operations import OperationParams, operation


class BlobParams(OperationParams):
    size: int = Field(ge=0, le=256 << 20)


@operation("testing.blob", version="1", result="value")
def blob(params: BlobParams, ctx: Any) -> str:
    """A string of ``size`` characters: a result too big for one message."""
    return "x" * params.size
