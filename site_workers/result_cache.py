"""The site's result cache: a request made before gets the result the site stored then, without recomputing it.

Off by default; the administrator names the operations whose results may be
reused (`site_workers.config.CachePolicy`)::

    cache:
      operations: [xarray.moments, xarray.histogram]

The key is the site's keyed digest of the operation's name and version, its
validated parameters (canonical JSON, defaults included), and what each input
is *now*:

- a stored result: its URI and sha256 (the store checks the bytes against it);
- a view: its sha256 (which binds its recipe) and the fingerprint, taken now,
  of every data source its recipe reads, through every step;
- a data source named in the parameters: its fingerprint now (sizes,
  modification and change stamps and inodes of its files, or S3 ETags).

So a changed input misses. An input whose changes the site cannot tell (a
source whose storage reports no version, a name that does not resolve) makes
the request uncacheable: it runs as if there were no cache. Operations that read
what no fingerprint covers (databases, services, programs, code, or nothing
named as data) cannot be named in the policy at all.

A hit is checked before it is returned: the request's own inputs are this
site's and intact (as a run would check them), and the stored result is still
there with its sha256; a result the store no longer holds (removed by
retention, or damaged) is a miss and its entry is dropped. What a hit returns
then goes through the export policy for whoever asks, exactly as a fresh result
would; the disclosure checks ran when it was made, on the same inputs and
parameters. Only stored results are cached: a view costs nothing to make.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from dfm_prefect.core.errors import FederationError, ResultIntegrityError
from dfm_prefect.core.operations import Operation, OperationParams
from dfm_prefect.core.refs import DataRef, Recipe
from site_workers.answers import refs_in
from site_workers.config import CachePolicy
from site_workers.sources import SourceResolver
from site_workers.store import ResultStore
from site_workers.views import Views, data_sources, ref_dicts

_UNSEEN_PREFIXES = ("sql.", "query.", "service.", "program.", "code.")
"""Operations that read what no fingerprint covers (a database, a service, a program's world, code)."""


def cacheable(op: Operation) -> bool:
    """Whether the cache can tell when ``op``'s inputs changed: it reads only data inputs that have fingerprints."""
    return bool(op.data_fields) and not op.stream and not op.name.startswith(_UNSEEN_PREFIXES)


class _Uncacheable(Exception):
    """An input whose changes the site cannot tell: the request runs without the cache."""


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


class ResultCache:
    """Stored results by the request that made them, for the operations the site's policy names."""

    def __init__(self, policy: CachePolicy, store: ResultStore, views: Views, resolver: SourceResolver) -> None:
        self.policy = policy
        self._operations = frozenset(policy.operations)
        self._store = store
        self._views = views
        self._resolver = resolver
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, DataRef] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def key(self, op: Operation, params: OperationParams) -> str | None:
        """The request's cache key, taken before the operation reads anything; None when it is not cached."""
        if op.name not in self._operations or not cacheable(op):
            return None
        try:
            inputs = [self._input(ref) for value in params.__dict__.values() for ref in refs_in(value)]
            sources = [[name, self._source(name)] for name in data_sources(op, params)]
        except _Uncacheable:
            return None
        if not inputs and not sources:
            return None  # it read nothing the site can fingerprint
        described = [op.name, op.version, params.model_dump(mode="json"), sorted(inputs), sources]
        return self._store.keyed_digest("cache", _canonical(described))

    def _source(self, name: str) -> str:
        try:
            fingerprint = self._views.fingerprint(self._resolver.resolve(name), always=True)
        except FederationError:
            raise _Uncacheable(name) from None
        if not fingerprint:
            raise _Uncacheable(name)
        return fingerprint

    def _input(self, ref: DataRef) -> list[Any]:
        if not ref.is_view:
            return [ref.uri, ref.sha256]
        return [ref.uri, ref.sha256, sorted(self._recipe_sources(ref.recipe))]

    def _recipe_sources(self, recipe: Recipe | None) -> list[list[str]]:
        """Every data source a view's recipe reads, through every step, with its fingerprint now."""
        if recipe is None:
            return []
        found = [[name, self._source(name)] for name in recipe.sources]
        for ref in ref_dicts(recipe.params):
            inner = ref.get("recipe")
            if isinstance(inner, dict):
                found += self._recipe_sources(Recipe.model_validate(inner))
        return found

    def get(self, key: str, params: OperationParams) -> DataRef | None:
        """The stored result for ``key`` if there is one and it is intact (inputs checked as a run would)."""
        with self._lock:
            ref = self._entries.get(key)
            if ref is not None:
                self._entries.move_to_end(key)
        if ref is None:
            self._count(hit=False)
            return None
        for value in params.__dict__.values():
            for inner in refs_in(value):
                self._views.check_owned(inner)
                if not inner.is_view:
                    self._store.verify(inner)
        try:
            self._store.verify(ref)
            if not self._store.renew(ref):  # protected by min_age_s from here like a new result
                raise ResultIntegrityError(f"{ref!r} was removed from the store")
        except ResultIntegrityError:
            with self._lock:
                if self._entries.get(key) == ref:
                    del self._entries[key]
            self._count(hit=False)
            return None
        self._count(hit=True)
        return ref

    def put(self, key: str, ref: DataRef) -> None:
        """Remember a result the site just stored for the request ``key`` (views are not kept)."""
        if ref.is_view:
            return
        with self._lock:
            self._entries[key] = ref
            self._entries.move_to_end(key)
            while len(self._entries) > self.policy.max_entries:
                self._entries.popitem(last=False)

    def _count(self, *, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
