"""Data sources of a site: resolving what a request names, and nothing outside the roots.

A request names data as a source name (``temperature``), a site-qualified name
(``dfm://north/temperature``) or a URL (``s3://climate/north/t.zarr``,
``file:///srv/data/x.nc``). A URL is accepted only if it is a declared source or
lies under a declared data root, after normalisation: no ``..`` segments, no
chained or other protocols, no query strings, and for local files no symlink
that leads out of the root.

Each `Location` carries the boundary it was allowed under (the root, or the
source's own path), and what a reader opens for it is confined to that boundary
again when it is read (`site_workers.confine`): globs are expanded here and every
match checked, local files are opened through a filesystem that refuses symlinks
out of the boundary.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.core import split_protocol

from dfm_prefect.core.errors import AccessDeniedError, InvalidParametersError
from site_workers.config import SiteConfig, SourceConfig
from site_workers.confine import ConfinedFileSystem, expand, glob_base, within

_FORMATS = {
    ".zarr": "zarr",
    ".nc": "netcdf",
    ".nc4": "netcdf",
    ".netcdf": "netcdf",
    ".h5": "netcdf",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
}
_LOCAL = {"file", "local"}


@dataclass(frozen=True)
class Location:
    """A place the site may read: canonical protocol, normalised path (maybe a glob), options.

    ``root`` is the boundary it was allowed under (a data root, or the declared
    source's path); without one the path's part before any glob is the boundary.
    """

    protocol: str
    path: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    format: str | None = None
    source: str | None = None
    root: str | None = None
    views: bool = True
    """Whether results derived from it may stay views (the site's choice per source or root)."""

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.path}"

    @property
    def boundary(self) -> str:
        """Nothing outside this path is read for this location."""
        return self.root or glob_base(self.path)

    @property
    def key(self) -> str:
        """Everything that decides what reading this location gives, as one string (storage options hashed)."""
        options = json.dumps(self.storage_options, sort_keys=True, default=repr)
        parts = [self.protocol, self.path, self.format or "", self.boundary, hashlib.sha256(options.encode()).hexdigest()]
        return "\x00".join(parts)

    def filesystem(self) -> fsspec.AbstractFileSystem:
        """The filesystem to read through; for local files one confined to :attr:`boundary`."""
        if self.protocol == "file":
            return ConfinedFileSystem(root=self.boundary)
        return fsspec.filesystem(self.protocol, **self.storage_options)

    def files(self) -> list[str]:
        """The paths a reader opens: the path, or each match of its glob, confined to :attr:`boundary`."""
        return expand(self.filesystem(), self.path, self.boundary, local=self.protocol == "file", url=self.url)


def canonical(url: str) -> tuple[str, str]:
    """Split a URL into (protocol, normalised path) or raise `AccessDeniedError`."""
    if not isinstance(url, str) or not url or len(url) > 4096:
        raise AccessDeniedError("a data location must be a non-empty string of at most 4096 characters")
    if "\x00" in url or "::" in url:
        raise AccessDeniedError(f"{url!r}: chained URLs and NUL bytes are not allowed")
    protocol, path = split_protocol(url)
    protocol = (protocol or "file").lower()
    if protocol in _LOCAL:
        protocol = "file"
        if not path.startswith("/"):
            raise AccessDeniedError(f"{url!r}: local paths must be absolute")
    if "?" in path or "#" in path:
        raise AccessDeniedError(f"{url!r}: query strings and fragments are not allowed")
    parts = path.split("/")
    if ".." in parts or "." in parts:
        raise AccessDeniedError(f"{url!r}: '.' and '..' segments are not allowed")
    normal = posixpath.normpath(path) if path else path
    if protocol == "file":
        normal = os.path.realpath(normal)
    return protocol, normal.rstrip("/") or "/"


def infer_format(path: str, declared: str | None = None) -> str | None:
    if declared:
        return declared
    _, ext = posixpath.splitext(path.rstrip("/"))
    return _FORMATS.get(ext.lower())


class SourceResolver:
    """Turns the data names in requests into locations the site allows."""

    def __init__(self, config: SiteConfig) -> None:
        self.site = config.name
        self.sources: dict[str, SourceConfig] = {source.name: source for source in config.sources}
        self._source_locations = {name: self._location_of(source) for name, source in self.sources.items()}
        self._roots = [
            Location(*canonical(root.url), storage_options=dict(root.storage_options), views=root.views)
            for root in config.data_roots
        ]

    @staticmethod
    def _location_of(source: SourceConfig) -> Location:
        protocol, path = canonical(source.url)
        return Location(
            protocol,
            path,
            storage_options=dict(source.storage_options),
            format=infer_format(path, source.format),
            source=source.name,
            views=source.views,
        )

    def source_location(self, name: str) -> Location:
        return self._source_locations[name]

    def resolve(self, name: str) -> Location:
        """The location for a source name, ``dfm://site/source`` or URL, or `AccessDeniedError`."""
        if not isinstance(name, str):
            raise InvalidParametersError("data must be a source name, a dfm:// name or a URL")
        if name.startswith("dfm://"):
            parts = urlsplit(name)
            source = parts.path.lstrip("/")
            if parts.netloc != self.site:
                raise AccessDeniedError(f"{name!r} names site {parts.netloc!r}, not this site")
            return self._named(source, name)
        if "://" not in name and not name.startswith("/"):
            return self._named(name, name)
        protocol, path = canonical(name)
        for location in self._source_locations.values():
            if location.protocol == protocol and within(path, location.path):
                format = infer_format(path, location.format)
                return Location(
                    protocol, path, location.storage_options, format, location.source, location.boundary, location.views
                )
        for root in self._roots:
            if root.protocol == protocol and within(path, root.path):
                return Location(protocol, path, root.storage_options, infer_format(path), root=root.path, views=root.views)
        raise AccessDeniedError(
            f"{name!r} is not a data source of this site and not under its data roots; "
            f"sources here: {sorted(self.sources)}"
        )

    def _named(self, source: str, asked: str) -> Location:
        try:
            return self._source_locations[source]
        except KeyError:
            raise AccessDeniedError(
                f"no data source {source!r} at this site (asked for {asked!r}); sources here: {sorted(self.sources)}"
            ) from None

    def owns(self, url: str) -> bool:
        """True if ``url`` names one of this site's sources or lies under its roots."""
        try:
            self.resolve(url)
        except (AccessDeniedError, InvalidParametersError):
            return False
        return True
