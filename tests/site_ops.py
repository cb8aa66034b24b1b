"""Operations that only the test sites offer (listed under operation_modules in their configs)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from pydantic import Field

from dfm_prefect.operations import OperationParams, operation

_attempts: Counter[str] = Counter()
_lock = threading.Lock()


class FlakyParams(OperationParams):
    key: str = Field(min_length=1, max_length=64)
    failures: int = Field(ge=0, le=10)


@operation("testing.flaky", version="1", result="value")
def flaky(params: FlakyParams, ctx: Any) -> int:
    """Fail the first ``failures`` calls for ``key``, then return the attempt number."""
    with _lock:
        _attempts[params.key] += 1
        attempt = _attempts[params.key]
    ctx.log.info("flaky attempt %d for %s", attempt, params.key)
    if attempt <= params.failures:
        raise RuntimeError(f"planned failure {attempt} of {params.failures}")
    return attempt
