"""Checking a site's sources before it serves them: each one exists, is readable and has the format it claims.

Every source is opened the way operations open it (lazily: zarr and netCDF
headers, Parquet footers, the first block of a CSV), so the check reads
metadata only. Each problem comes back once, as a sentence an administrator
can act on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dfm_prefect.core.errors import FederationError
from site_workers.config import SiteConfig
from site_workers.readers import open_location
from site_workers.sources import Location, SourceResolver


@dataclass(frozen=True)
class SourceProblem:
    """Why one declared source cannot be served."""

    source: str
    url: str
    message: str

    def __str__(self) -> str:
        return f"source {self.source!r} ({self.url}): {self.message}"


def _exists(location: Location) -> bool:
    fs = location.filesystem()
    return bool(fs.glob(location.path)) if any(c in location.path for c in "*?[") else bool(fs.exists(location.path))


def _why(location: Location, exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "does not exist at this site; fix the url or put the data there"
    if isinstance(exc, PermissionError):
        return "cannot be read by the user this site runs as (permission denied); give that user read access"
    if isinstance(exc, FederationError):
        return str(exc)
    text = " ".join(str(exc).split())[:300] or "no detail"
    return (
        f"cannot be opened as {location.format} ({type(exc).__name__}: {text}); "
        "check that the data is complete and that `format:` (or the file extension) is right"
    )


def check_source(location: Location, redact: Callable[[str], str] = str) -> str | None:
    """Why ``location`` cannot be read, or None when it opens (metadata only)."""
    if location.format is None:
        return "has no format this site can tell from its extension; declare `format:` (zarr, netcdf, parquet or csv)"
    try:
        if not _exists(location):
            return "does not exist at this site; fix the url or put the data there"
        value: Any = open_location(location)
    except Exception as exc:  # every failure is reported to the administrator, none is fatal to the check
        return redact(_why(location, exc))
    close = getattr(value, "close", None)
    if callable(close):
        close()
    return None


def check_sources(config: SiteConfig, redact: Callable[[str], str] = str) -> list[SourceProblem]:
    """One problem per declared source that cannot be served, in the config's order."""
    resolver = SourceResolver(config)
    problems = []
    for source in config.sources:
        message = check_source(resolver.source_location(source.name), redact)
        if message is not None:
            problems.append(SourceProblem(source.name, source.url, message))
    return problems
