"""Shared helpers for the adapter and compute tests (this module holds no tests).

`InProcessSite` runs a real `SiteWorker` in the test process and calls operations
through its public message interface, the same path a transport takes; it is
what memory:// sources need (they exist only inside one process).
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import numpy as np

from dfm_prefect.core.codecs import decode
from dfm_prefect.core.errors import error_class
from dfm_prefect.core.refs import check_integrity
from dfm_prefect.core.wire import ErrorReply, FetchRequest, RunRequest, RunResult, b64decode
from site_workers.config import parse_site_config
from site_workers.worker import SiteWorker

ALL_OPERATIONS = [
    "xarray.open",
    "xarray.subset",
    "xarray.reduce",
    "xarray.moments",
    "xarray.weighted_mean",
    "xarray.histogram",
    "xarray.groupby_reduce",
    "xarray.resample",
    "xarray.derive",
    "xarray.write",
    "table.filter",
    "table.project",
    "table.groupby_aggregate",
]


class InProcessSite:
    """A site worker in this process; ``call`` runs an operation and returns its value."""

    def __init__(self, store: str, sources: list[dict[str, Any]], **overrides: Any) -> None:
        config = {
            "name": overrides.pop("name", "lab"),
            "operations": overrides.pop("operations", ALL_OPERATIONS),
            # Named explicitly so the site also works from a source tree on PYTHONPATH
            # (the GPU check), where the package's entry points are not installed.
            "operation_modules": ["adapters.core", "adapters.xarray_ops", "adapters.xarray_stats", "adapters.tables"],
            "sources": sources,
            "result_store": {"url": f"file://{store}"},
            "export": {"kinds": ["aggregate", "value", "table", "dataset"], "max_bytes": 1 << 30, "inline_bytes": 1 << 30},
            **overrides,
        }
        self.worker = SiteWorker(parse_site_config(config))

    def run(self, op: str, timeout: float = 120.0, **params: Any) -> RunResult:
        done = threading.Event()
        replies: list[Any] = []

        def reply(message: Any) -> None:
            if isinstance(message, RunResult):  # progress updates may come first
                replies.append(message)
                done.set()

        # References go as JSON, as a client sends them.
        params = json.loads(json.dumps(params, default=lambda value: value.model_dump(mode="json")))
        self.worker.handle_message(RunRequest(id=uuid.uuid4().hex, op=op, params=params), reply)
        assert done.wait(timeout), f"{op} did not answer within {timeout}s"
        (result,) = replies
        return result

    def call(self, op: str, **params: Any) -> Any:
        """The operation's value, or the `FederationError` the site answered with."""
        result = self.run(op, **params)
        if not result.ok:
            raise error_class(result.error.code)(result.error.message)
        ref = result.ref
        if result.payload is not None:
            data = b64decode(result.payload)
        elif ref.is_view:
            data = self.fetch_bytes(ref)  # materialized through the site's fetch, as a client gets it
        else:
            data = self.worker.store.read_bytes(ref)  # what the site stored, whatever its policy lets leave
        return decode(ref.format, data)

    def call_fetch(self, ref: Any) -> Any:
        """A result's value fetched through the site's messages, under its export policy."""
        return decode(ref.format, self.fetch_bytes(ref))

    def fetch_bytes(self, ref: Any, timeout: float = 120.0) -> bytes:
        """A result's bytes through the site's fetch messages, as a client gets them (a view is materialized first)."""
        parts, target, salt = [], ref, ""
        while True:
            request = FetchRequest(id=uuid.uuid4().hex, ref=target, offset=sum(map(len, parts)))
            chunk = self._ask(request, timeout)
            if isinstance(chunk, ErrorReply):
                raise error_class(chunk.error.code)(chunk.error.message)
            if chunk.materialized is not None:
                target = chunk.materialized
            parts.append(b64decode(chunk.data))
            salt = chunk.salt or salt
            if chunk.eof:
                return check_integrity(target, b"".join(parts), salt)

    def _ask(self, message: Any, timeout: float) -> Any:
        done = threading.Event()
        replies: list[Any] = []

        def reply(answer: Any) -> None:
            replies.append(answer)
            done.set()

        self.worker.handle_message(message, reply)
        assert done.wait(timeout), f"{message.kind} did not answer within {timeout}s"
        (answer,) = replies
        return answer

    def ref(self, op: str, **params: Any) -> Any:
        """The `DataRef` of the result (for chaining on this site)."""
        result = self.run(op, **params)
        if not result.ok:
            raise error_class(result.error.code)(result.error.message)
        return result.ref

    def close(self) -> None:
        self.worker.close()

    def __enter__(self) -> InProcessSite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def small_climate(seed: int = 0, lat: tuple[float, float] = (-90.0, 90.0), days: int = 400, step: float = 10.0) -> Any:
    """A little daily (time, lat, lon) temperature field with a few NaNs, chunked for Dask."""
    import pandas as pd
    import xarray as xr

    rng = np.random.default_rng(seed)
    lats = np.arange(lat[0] + step / 2, lat[1], step)
    lons = np.arange(step / 2, 360, step)
    time = pd.date_range("2001-01-01", periods=days, freq="D")
    field = 280 + 20 * np.cos(np.deg2rad(lats))[None, :, None] + rng.normal(0, 5, (days, lats.size, lons.size))
    field = field.astype("float32")
    field[rng.random(field.shape) < 0.01] = np.nan
    ds = xr.Dataset(
        {"temperature": (("time", "lat", "lon"), field, {"units": "K"}), "pressure": (("time", "lat", "lon"), (field * 3.5).astype("float64"))},
        coords={"time": time, "lat": lats, "lon": lons},
        attrs={"title": "test field"},
    )
    return ds.chunk({"time": 50})
