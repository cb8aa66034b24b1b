"""The site's catalog: what each data source holds, described without reading its data."""

from __future__ import annotations

import logging
import threading
from typing import Any

from dfm_prefect.wire import SourceInfo
from site_workers.readers import open_location
from site_workers.sources import SourceResolver
from site_workers.summaries import summarize

log = logging.getLogger("dfm_prefect.site.catalog")


class Catalog:
    """Source summaries, computed once per source on first request (metadata reads only)."""

    def __init__(self, resolver: SourceResolver) -> None:
        self._resolver = resolver
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
            close = getattr(value, "close", None)
            if callable(close):
                close()
        except Exception as exc:  # an unreadable source is reported, not fatal
            log.warning("cannot summarize source %s: %s", name, exc)
            return {"error": f"{type(exc).__name__}: {exc}"[:500]}
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
                    size=summary.get("nbytes"),
                    summary=summary,
                )
            )
        return entries
