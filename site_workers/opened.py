"""Data sources kept open between requests, for as long as their files are unchanged.

Opening a source reads its metadata and coordinates (a netCDF file's HDF5
structure, a zarr store's metadata and index arrays, Parquet footers): tens of
milliseconds that a pipeline of small steps would pay at every step, since each
step (and each view recomputed under it) opens its source again. The site keeps
what it opened, keyed by the source's fingerprint *now* (sizes, modification and
change stamps of its files, or a remote store's listing): a file written,
replaced or removed since gives another fingerprint, so the source is opened
again and the old one is let go (a removed file is not held open). Requests
that open a source at the same time wait for one opening and share it. Sources
without a fingerprint, and sources the site marks ``views: false`` (their
changes may not show in their files' stamps), are opened every time. An opened source is kept per location (protocol,
path, format, boundary and storage options), never shared between two
locations that only share a URL. Each request gets its own copy: the lazy data
is shared, the containers and their attributes are not, so an operation that
sets or changes an attribute or a variable never changes what another request
sees.
"""

from __future__ import annotations

import copy as copying
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from site_workers.readers import open_location
from site_workers.sources import Location

MAX_OPEN = 32
"""How many opened sources a site keeps (the least recently used go first)."""


class OpenedSources:
    """The site's opened data sources, reused while their fingerprint holds."""

    def __init__(self, fingerprint: Callable[[Location], str], *, size: int = MAX_OPEN) -> None:
        self._fingerprint = fingerprint
        self._size = size
        self._open: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        """Location key -> (fingerprint, opened value)."""
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}
        """Location key -> held while one request opens it (the others wait and share it)."""
        self.opened = 0
        """How many times a source was opened (for the site log and tests)."""

    def open(self, location: Location) -> Any:
        """The value at ``location``, lazily opened: the kept one if its files are unchanged.

        A kept source whose files changed (or can no longer be stamped) is let go at
        once, so a removed file is not held open. Requests that open the same
        source at the same time wait for one opening and share it.
        """
        fingerprint = self._fingerprint(location) if self._size and location.views else ""
        key = location.key
        if not fingerprint:
            with self._lock:
                self._open.pop(key, None)
            return self._open_now(location)
        with self._lock:
            if (value := self._kept(key, fingerprint)) is not None:
                return _copy(value)
            gate = self._opening.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                value = self._kept(key, fingerprint)
            if value is None:
                value = self._open_now(location)
                with self._lock:
                    self._open[key] = (fingerprint, value)
                    self._open.move_to_end(key)
                    while len(self._open) > self._size:
                        self._open.popitem(last=False)
                    self._opening.pop(key, None)
        return _copy(value)

    def _kept(self, key: str, fingerprint: str) -> Any:
        """The kept value of ``key`` if it was opened with ``fingerprint`` (holding the lock); a stale one is let go."""
        kept = self._open.get(key)
        if kept is None:
            return None
        if kept[0] != fingerprint:
            del self._open[key]
            return None
        self._open.move_to_end(key)
        return kept[1]

    def __len__(self) -> int:
        """How many opened sources are kept."""
        with self._lock:
            return len(self._open)

    def _open_now(self, location: Location) -> Any:
        value = open_location(location)
        with self._lock:
            self.opened += 1
        return value


def _copy(value: Any) -> Any:
    """A copy sharing the lazy data but not the containers (variables, columns) nor their attributes."""
    copy = getattr(value, "copy", None)
    if copy is None:
        return value
    try:
        out = copy(deep=False)
    except TypeError:
        return copy()  # a Dask dataframe's copy is shallow and takes no `deep`
    attrs = getattr(out, "attrs", None)
    if isinstance(attrs, dict):
        out.attrs = copying.deepcopy(attrs)  # attribute values can be arrays, lists, dicts: changed in place
    for variable in getattr(out, "variables", {}).values():
        variable.attrs = copying.deepcopy(variable.attrs)
    return out
