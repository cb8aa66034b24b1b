"""Operations that only the test sites offer (listed under operation_modules in their configs)."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from dfm_prefect.core.operations import DataInput, OperationParams, operation

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


class LeakParams(OperationParams):
    variable: str = Field(pattern=r"^DFM_TEST_[A-Z_]+$", description="The site environment variable to leak.")
    mode: Literal["raise", "return", "progress"] = "raise"
    pad: int = Field(default=0, ge=0, le=16384, description="Characters before the credential (to place it across a cut).")


@operation("testing.leak", version="1", result="value")
def leak(params: LeakParams, ctx: Any) -> Any:
    """A careless operation: puts a site credential in a log line, a progress message, an error or its result."""
    secret = os.environ.get(params.variable, "")
    pad = "." * params.pad
    ctx.log.info("%sconnecting with %s", pad, secret)
    if params.mode == "progress":
        ctx.progress(1.0, f"{pad}token {secret}")
        return "done"
    if params.mode == "return":
        return {"token": secret}
    raise RuntimeError(f"{pad}login failed for token={secret} (row 17: patient_weight=81.4)")


class WhereParams(OperationParams):
    data: DataInput
    seconds: float = Field(default=0.0, ge=0, le=600)


@operation("testing.where", version="1", result="value")
def where(params: WhereParams, ctx: Any) -> str:
    """Open the data (so access is checked), wait (cancellably), and say which site ran it."""
    ctx.open_dataset(params.data)
    ctx.sleep(params.seconds)
    return ctx.site


class ReadParams(OperationParams):
    data: DataInput


@operation("testing.read", version="1", result="value")
def read(params: ReadParams, ctx: Any) -> Any:
    """Open an input (a stored result or a source) and return a small description of what was read."""
    value = ctx.open(params.data)
    if isinstance(value, (dict, list, str, int, float)) or value is None:
        return value
    return {"type": type(value).__name__, "variables": sorted(map(str, getattr(value, "data_vars", {})))}


class TicksParams(OperationParams):
    count: int = Field(ge=0, le=100_000)
    pause_s: float = Field(default=0.0, ge=0.0, le=5.0, description="Seconds of work before each item after the first.")
    size: int = Field(default=0, ge=0, le=4 << 20, description="Characters of padding per item.")
    tally: str | None = Field(default=None, pattern=r"^/[\w/.\-]+$", description="A file where the site writes how many items it made.")


@operation("testing.ticks", version="1", result="value", stream=True)
def ticks(params: TicksParams, ctx: Any) -> Iterator[dict[str, Any]]:
    """Yield ``count`` items, each after ``pause_s`` of pretend work, each saying when the site made it."""
    for seq in range(params.count):
        if seq and params.pause_s:
            time.sleep(params.pause_s)
        if params.tally:
            with open(params.tally, "w") as handle:
                handle.write(str(seq + 1))
        yield {"seq": seq, "made_at": time.time(), "pad": "x" * params.size}
