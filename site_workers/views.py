"""Views: gridded intermediates that stay recipes until their bytes are needed.

An operation such as ``xarray.subset`` returns lazy (Dask-backed) data. Writing
that out, hashing it and reading it back for the next operation costs a copy of
the data per step and fills the result store, so the site keeps the step's
:class:`~dfm_prefect.core.refs.Recipe` instead (the operation, its validated
parameters and a fingerprint of each data source it reads) and hands out a
`DataRef` to it. A later operation that opens the view recomputes it as part of
its own lazy graph: ``subset → derive → moments`` is one Dask graph that reads
each needed chunk of the source once.

What a client cannot do with a view:

- alter it: the reference's ``sha256`` is the site's keyed digest of its site,
  kind, format, operation, size in memory (what the export policy first
  decides on) and recipe (`ResultStore.keyed_digest`), checked before
  anything is recomputed;
- get other numbers than the view stood for: before recomputing, the site
  fingerprints each source again (sizes, modification and change stamps and
  inodes of its files, or S3 ETags; metadata, never data) and refuses with
  `SourceChangedError` when one changed;
- get past the site's rules: recomputing runs the same operations with the same
  validated parameters, their disclosure checks included, and a fetch applies
  the export policy to the view and again to the copy it materializes.

A view is materialized (stored with its sha256 like any result) only when its
bytes are needed: when it is fetched, or stored on purpose (``xarray.write``
stores every result). A source the administrator marks ``views: false``, an
operation declared with ``view=False``, data that is not lazy, or a chain deeper
than :data:`MAX_DEPTH` make stored results, as before.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from dfm_prefect.core.codecs import codec_for
from dfm_prefect.core.errors import (
    AccessDeniedError,
    FederationError,
    InvalidParametersError,
    ResultIntegrityError,
    SourceChangedError,
    UnknownOperationError,
)
from dfm_prefect.core.operations import Operation, OperationContext, OperationParams
from dfm_prefect.core.refs import VIEW_SCHEME, DataRef, Recipe, ResultKind
from site_workers.answers import refs_in, validation_message
from site_workers.sources import Location, SourceResolver
from site_workers.store import ResultStore
from site_workers.summaries import summarize

MAX_DEPTH = 16
"""Views nest at most this deep (a view of a view of ...); a deeper step is stored."""
_KEEP_MATERIALIZED = 4096
_SIGNED_FIELDS = {"site", "kind", "format", "op", "size", "recipe"}


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _without_summaries(value: Any) -> Any:
    """Recipe parameters with each nested reference's summary dropped (its digest does not cover it)."""
    if isinstance(value, dict):
        if {"site", "uri", "op"} <= set(value):
            return {key: _without_summaries(item) for key, item in value.items() if key not in ("summary", "contributors")}
        return {key: _without_summaries(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_summaries(item) for item in value]
    return value


def _depth(recipe: Recipe | dict[str, Any] | None) -> int:
    """How many steps of views lead to this one (1 for a view of a source)."""
    if recipe is None:
        return 0
    params = recipe.params if isinstance(recipe, Recipe) else recipe.get("params", {})
    deepest = 0
    for value in ref_dicts(params):
        if str(value.get("uri", "")).startswith(VIEW_SCHEME):
            deepest = max(deepest, _depth(value.get("recipe")))
    return 1 + deepest


def ref_dicts(value: Any) -> Iterator[dict[str, Any]]:
    """The references (as JSON objects: ``site``, ``uri``, ``op``...) in a recipe's JSON parameters, not looking inside them."""
    if isinstance(value, dict):
        if {"site", "uri", "op"} <= set(value):
            yield value
            return
        for item in value.values():
            yield from ref_dicts(item)
    elif isinstance(value, list):
        for item in value:
            yield from ref_dicts(item)


def data_sources(op: Operation, params: OperationParams) -> list[str]:
    """The data source names and URLs among an operation's inputs (not the `DataRef`s)."""
    found: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    for name in op.data_fields:
        collect(getattr(params, name, None))
    return sorted(set(found))


def is_lazy(value: Any) -> bool:
    """True for xarray data whose variables are all Dask-backed (nothing computed yet)."""
    data_vars = getattr(value, "data_vars", None)
    if data_vars is None:
        chunks = getattr(value, "chunks", None)
        return hasattr(value, "dims") and chunks is not None
    return all(var.chunks is not None for var in data_vars.values())


def _local_stamps(path: str) -> list[list[Any]]:
    def stamp(name: str, st: os.stat_result) -> list[Any]:
        # ctime and the inode change on every write or replacement and cannot be set back.
        return [name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    if not os.path.isdir(path):
        return [stamp("", os.stat(path))]
    stamps: list[list[Any]] = []
    # As os.walk top-down with sorted names: a folder's files, then its folders depth-first (links to folders
    # are not followed), each file named relative to `path`. A zarr store can hold many thousands of chunk
    # files; a stack rather than recursion, so no depth of folders is too deep.
    stack = [(path, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            continue  # os.walk skips what it cannot list
        folders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if not entry.is_symlink():
                    folders.append((entry.path, prefix + entry.name + os.sep))
            else:
                stamps.append(stamp(prefix + entry.name, entry.stat(follow_symlinks=False)))
        stack.extend(reversed(folders))
    return stamps


def _remote_stamps(location: Location, path: str) -> list[list[Any]] | None:
    fs = location.filesystem()
    fs.invalidate_cache(path)  # listings are cached per filesystem instance; a fingerprint must see now
    infos = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    stamps = []
    for name in sorted(infos):
        info = infos[name]
        version = next(
            (info[key] for key in ("ETag", "etag", "VersionId", "mtime", "LastModified", "last_modified", "created") if info.get(key)),
            None,
        )
        if version is None:
            return None  # nothing would show a change: do not trust a view of it
        stamps.append([name, info.get("size"), str(version)])
    return stamps


@dataclass
class _Looks:
    """What one request saw of its sources: each fingerprint as first taken, and the sources its view checks looked at again."""

    digests: dict[str, str] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)


_LOOKS: ContextVar[_Looks | None] = ContextVar("dfm_source_looks", default=None)


@contextmanager
def one_look() -> Iterator[None]:
    """Within the block (one request), each source's files are looked at once, and once more to check a view.

    A request fingerprints a source for its cache key, its recipe and opening it:
    one walk of a zarr store's chunk files (or one listing of a remote store)
    serves them all, and they all agree. Checking a view it recomputes looks again
    (once per source and request): a source that changed since the request first
    looked, or since the view was made, refuses the view.
    """
    token = _LOOKS.set(_Looks())
    try:
        yield
    finally:
        _LOOKS.reset(token)


class Views:
    """The site's views: making them, checking references to them, recomputing and materializing them."""

    def __init__(self, site: str, store: ResultStore, resolver: SourceResolver, operations: dict[str, Operation]) -> None:
        self.site = site
        self._store = store
        self._resolver = resolver
        self._operations = operations
        self._lock = threading.Lock()
        self._materialized: OrderedDict[str, DataRef] = OrderedDict()
        self._making: dict[str, threading.Lock] = {}

    # -- recipes and fingerprints ---------------------------------------------------

    def fingerprint(self, location: Location, *, always: bool = False) -> str:
        """A keyed digest of the source's metadata now, or as first taken in this request (`one_look`).

        '' where changes could not be told: no view then.

        A source marked ``views: false`` has none unless ``always`` (the result cache tells changes by it too).
        """
        if not location.views and not always:
            return ""
        looks = _LOOKS.get()
        if looks is None:
            return self._look(location)
        if location.key not in looks.digests:
            looks.digests[location.key] = self._look(location)
        return looks.digests[location.key]

    def look_again(self, location: Location) -> tuple[str, str | None]:
        """The source's fingerprint now, to check a view on it, and the one this request saw before (if another).

        Looked at once more per request (not at every step of a chain of views); the
        rest of the request then uses this look.
        """
        if not location.views:
            return "", None
        looks = _LOOKS.get()
        if looks is None:
            return self._look(location), None
        key = location.key
        if key in looks.checked:
            return looks.digests[key], None
        earlier, now = looks.digests.get(key), self._look(location)
        looks.digests[key] = now
        looks.checked.add(key)
        return now, earlier if earlier is not None and earlier != now else None

    def _look(self, location: Location) -> str:
        try:
            stamps: list[list[Any]] | None = []
            for path in location.files():
                found = _local_stamps(path) if location.protocol == "file" else _remote_stamps(location, path)
                if found is None:
                    return ""
                stamps += found  # type: ignore[operator]
        except (OSError, FederationError):
            return ""
        return self._store.keyed_digest("source", _canonical([location.url, stamps]))[:32]

    def recipe(self, op: Operation, params: OperationParams) -> Recipe:
        """The recipe of a run about to start: taken before it reads, so a change during the run shows later."""
        sources = {}
        could_be_view = op.view and op.result_kind == "dataset"
        for name in data_sources(op, params):
            if not could_be_view:
                sources[name] = ""  # a stored result is never recomputed: no metadata read on its path
                continue
            try:
                sources[name] = self.fingerprint(self._resolver.resolve(name))
            except FederationError:
                sources[name] = ""  # the operation itself says what is wrong with the name
        return Recipe(op=op.name, version=op.version, params=_without_summaries(params.model_dump(mode="json", exclude_defaults=True)), sources=sources)

    def _digest(self, ref: DataRef) -> str:
        return self._store.keyed_digest("view", _canonical(ref.model_dump(mode="json", include=_SIGNED_FIELDS)))

    # -- making ---------------------------------------------------------------------

    def keep(
        self, value: Any, op: Operation, recipe: Recipe, *, contributors: int | None = None, owner: str | None = None
    ) -> tuple[DataRef, bytes | None]:
        """Keep an operation's result: as a view where it may be one, else in the store (for ``owner``)."""
        kind: ResultKind = op.result_kind
        summary = summarize(value)
        if self._may_view(value, op, recipe):
            unsigned = DataRef(
                site=self.site,
                uri=VIEW_SCHEME + "0" * 32,
                kind=kind,
                format=codec_for(value).format,
                size=int(summary.get("nbytes", 0)),
                sha256="0" * 64,
                op=op.name,
                summary=summary,
                recipe=recipe,
            )
            digest = self._digest(unsigned)
            return unsigned.model_copy(update={"uri": VIEW_SCHEME + digest[:32], "sha256": digest}), None
        return self._store.put(value, op=op.name, kind=kind, summary=summary, contributors=contributors, recipe=recipe, owner=owner)

    def _may_view(self, value: Any, op: Operation, recipe: Recipe) -> bool:
        return (
            op.view
            and op.result_kind == "dataset"
            and is_lazy(value)
            and all(recipe.sources.values())
            and _depth(recipe) <= MAX_DEPTH
        )

    # -- references -----------------------------------------------------------------

    def check_owned(self, ref: DataRef) -> None:
        """Raise `AccessDeniedError` unless ``ref`` is a result of this site (a stored one, or a view it made)."""
        if not ref.is_view:
            self._store.check_owned(ref)
            return
        if ref.site != self.site:
            raise AccessDeniedError(f"{ref!r} is held by site {ref.site!r}, not by this site")
        if ref.recipe is None or not hmac.compare_digest(self._digest(ref), ref.sha256) or ref.uri != VIEW_SCHEME + ref.sha256[:32]:
            raise AccessDeniedError(f"{ref!r} is not a view this site made, or it was altered; run the steps that made it again")

    def open(self, ref: DataRef, ctx: OperationContext) -> Any:
        """The value behind a view: its materialized copy if there is one, else recomputed (lazily)."""
        self.check_owned(ref)
        stored = self.materialized(ref)
        if stored is not None:
            return self._store.open_value(stored)
        return self._recompute(ref, ctx)

    def _recompute(self, ref: DataRef, ctx: OperationContext) -> Any:
        recipe = ref.recipe
        assert recipe is not None  # check_owned made sure
        op = self._operations.get(recipe.op)
        if op is None or op.version != recipe.version or not op.view:
            raise UnknownOperationError(
                f"{ref!r} is a view made by {recipe.op!r} version {recipe.version!r}, which this site no longer offers; "
                "run the steps that made it again",
                site=self.site,
            )
        try:
            params = op.params.model_validate(recipe.params)
        except ValidationError as exc:
            raise InvalidParametersError(
                f"{ref!r}: its recipe no longer fits {op.name!r}: {validation_message(exc)}; run the steps that made it again",
                site=self.site,
            ) from None
        for name, fingerprint in recipe.sources.items():
            now, earlier = self.look_again(self._resolver.resolve(name))
            if not hmac.compare_digest(now, fingerprint):
                raise SourceChangedError(
                    f"{ref!r} is a view of {name!r}, which changed since the view was made (its files' sizes or "
                    "modification stamps differ), so it would give other numbers; run the steps that made it again "
                    "to work on the data as it is now",
                    site=self.site,
                )
            if earlier is not None:
                raise SourceChangedError(
                    f"{name!r} changed while this request ran (after the request first looked at it, before it recomputed "
                    f"{ref!r}); run the request again",
                    site=self.site,
                )
        for value in params.__dict__.values():
            for inner in refs_in(value):
                self.check_owned(inner)
        ctx.log.debug("recomputing view %s: %s", ref.uri, ref.lineage())
        return op.run(params, ctx)

    # -- materializing --------------------------------------------------------------

    def materialized(self, ref: DataRef) -> DataRef | None:
        """The stored copy of a view, if it was materialized and is still intact."""
        with self._lock:
            stored = self._materialized.get(ref.uri)
        if stored is None:
            return None
        try:
            self._store.verify(stored)
        except ResultIntegrityError:
            with self._lock:
                self._materialized.pop(ref.uri, None)
            return None
        return stored

    def discard(self, ref: DataRef) -> None:
        """Forget a view's materialized copy and remove it from the store."""
        with self._lock:
            stored = self._materialized.pop(ref.uri, None)
        if stored is not None:
            self._store.delete(stored)

    def materialize(self, ref: DataRef, ctx: OperationContext, *, owner: str | None = None) -> DataRef:
        """Store a view's bytes (once, however many ask at the same time) and return the stored reference.

        The copy counts against ``owner``'s share of the store; when retention removed an
        earlier copy, the view is materialized again.
        """
        self.check_owned(ref)
        with self._lock:
            making = self._making.setdefault(ref.uri, threading.Lock())
        with making:
            stored = self.materialized(ref)
            if stored is None:
                value = self._recompute(ref, ctx)
                stored, _ = self._store.put(value, op=ref.op, kind=ref.kind, summary=summarize(value), recipe=ref.recipe, owner=owner)
                with self._lock:
                    self._materialized[ref.uri] = stored
                    while len(self._materialized) > _KEEP_MATERIALIZED:
                        self._materialized.popitem(last=False)
        with self._lock:
            self._making.pop(ref.uri, None)
        return stored
