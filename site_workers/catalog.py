"""The site's catalog: what each data source holds, described without reading its data.

For gridded sources (zarr, netCDF) an entry shows dims, coordinate ranges,
variables, dtypes, chunking and in-memory size; for tables (Parquet, CSV) the
columns, dtypes and row count. Everything comes from metadata: zarr and netCDF
headers, Parquet footers. CSV files have no row count in their metadata, so
theirs is counted (parsed once, in the background) only when the files are at
most `CSV_COUNT_LIMIT` bytes; otherwise ``rows`` stays null.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from dfm_prefect.core.wire import SourceInfo
from site_workers.readers import dataset_paths, open_location
from site_workers.sources import Location, SourceResolver
from site_workers.summaries import summarize

log = logging.getLogger("dfm_prefect.site.catalog")

CSV_COUNT_LIMIT = 64 << 20


def _storage_bytes(location: Location) -> int | None:
    """Bytes the source takes in storage (all files under its path, or under each match of its glob)."""
    fs = location.filesystem()
    try:
        return sum(int(fs.du(path, total=True)) for path in location.files())
    except (OSError, ValueError) as exc:
        log.info("cannot size %s: %s", location.url, exc)
        return None


def _table_rows(location: Location, frame: Any, stored: int | None) -> int | None:
    """Rows of a table source from its Parquet footers, or by counting a small CSV."""
    if location.format == "parquet":
        import pyarrow.dataset as pads

        return int(pads.dataset(dataset_paths(location), filesystem=location.filesystem(), format="parquet").count_rows())
    if location.format == "csv" and stored is not None and stored <= CSV_COUNT_LIMIT:
        import dask

        return int(dask.compute(frame.shape[0], scheduler="threads")[0])
    return None


class Catalog:
    """Source summaries, computed once per source on first request (metadata reads only)."""

    def __init__(self, resolver: SourceResolver, redact: Callable[[str], str] = str) -> None:
        self._resolver = resolver
        self._redact = redact
        self._summaries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _summary(self, name: str) -> dict[str, Any]:
        with self._lock:
            cached = self._summaries.get(name)
        if cached is not None:
            return cached
        location = self._resolver.source_location(name)
        try:
            value = open_location(location)
            summary = summarize(value)
            summary["storage_bytes"] = _storage_bytes(location)
            if summary.get("type") == "table":
                summary["rows"] = _table_rows(location, value, summary["storage_bytes"])
            close = getattr(value, "close", None)
            if callable(close):
                close()
        except Exception as exc:  # an unreadable source is reported, not fatal
            message = self._redact(f"{type(exc).__name__}: {exc}")  # masked before it is cut
            log.warning("cannot summarize source %s: %s", name, message)
            return {"error": message[:500]}
        with self._lock:
            self._summaries[name] = summary
        return summary

    def warm(self) -> threading.Thread:
        """Summarize every source in the background, so the first describe is fast."""
        thread = threading.Thread(target=self.entries, name="dfm-catalog-warm", daemon=True)
        thread.start()
        return thread

    def entries(self) -> list[SourceInfo]:
        """One entry per declared source."""
        entries = []
        for name, source in self._resolver.sources.items():
            location = self._resolver.source_location(name)
            summary = self._summary(name)
            entries.append(
                SourceInfo(
                    name=name,
                    url=source.url,
                    format=location.format or "unknown",
                    size=summary.get("nbytes") or summary.get("storage_bytes"),
                    summary=summary,
                )
            )
        return entries
