"""One pass over shared data: requests on the same inputs that run at the same time compute as one.

A flow that asks one site for several statistics of the same data (moments and a
histogram of the same box, say) sends the requests at nearly the same moment.
Each operation still runs as its own request, in its own thread, with its own
result; but a request that arrives while another on the same inputs (the same
data sources, the same stored results, views of the same sources) is still
preparing joins its group, and the first Dask computation of each member waits
for the others', so the site runs them as one ``dask.compute``: tasks with the
same key (reading and decoding a chunk, cutting a box out of it) run once, so each
chunk is read once for all of them.

Only requests the site can start at once join a group (one that would wait for a
slot is not waited for). A member that computes nothing (a view, an answer from
the cache) leaves its group when it ends; a group waits at most :data:`WAIT_S`
for a member after the first one asks; a shared computation that fails is run
again per request, so one request's error is never another's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from dfm_prefect.core.operations import Operation, OperationParams
from dfm_prefect.core.refs import VIEW_SCHEME
from site_workers.answers import refs_in
from site_workers.views import data_sources, ref_dicts

log = logging.getLogger("dfm_prefect.site")
WAIT_S = 2.0
"""The longest a request's computation waits for the other members of its group."""

Compute = Callable[[tuple[Any, ...]], tuple[Any, ...]]


def shared_inputs(op: Operation, params: OperationParams) -> frozenset[str]:
    """What a request reads, as a group key: its data sources, stored results, and the sources behind its views."""
    found = set(data_sources(op, params))
    for value in params.__dict__.values():
        for ref in refs_in(value):
            found |= _roots(ref.model_dump(mode="json")) if ref.uri.startswith(VIEW_SCHEME) else {ref.uri}
    return frozenset(found)


def _roots(ref: dict[str, Any]) -> set[str]:
    recipe = ref.get("recipe") or {}
    found = set(recipe.get("sources", {}))
    for inner in ref_dicts(recipe.get("params", {})):
        found |= _roots(inner) if str(inner.get("uri", "")).startswith(VIEW_SCHEME) else {str(inner["uri"])}
    return found


class _Ask:
    def __init__(self, collections: tuple[Any, ...]) -> None:
        self.collections = collections
        self.result: tuple[Any, ...] | None = None
        self.answered = False


class FusedGroup:
    """Requests on the same inputs that may share their first Dask computation."""

    def __init__(self) -> None:
        self._active = 0
        """Members that have neither asked to compute nor left."""
        self._asks: list[_Ask] = []
        self._fired = False
        self._deadline: float | None = None
        self._cond = threading.Condition()
        self.shared = 0
        """How many computations ran together (for the site log and tests)."""

    @property
    def fired(self) -> bool:
        return self._fired

    def member(self) -> FusedMember | None:
        """A place in the group for one request the site accepted; None once the group has run."""
        with self._cond:
            if self._fired:
                return None
            self._active += 1
        return FusedMember(self)

    def _leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _ask(self, collections: tuple[Any, ...], compute: Compute) -> tuple[Any, ...] | None:
        ask = _Ask(collections)
        with self._cond:
            self._active -= 1
            if self._fired:
                return None  # the group ran already: compute alone
            self._asks.append(ask)
            if self._deadline is None:
                self._deadline = time.monotonic() + WAIT_S
            while not ask.answered:
                if not self._fired and (self._active <= 0 or time.monotonic() >= self._deadline):
                    self._fired = True
                    asks = list(self._asks)
                    break
                self._cond.wait(None if self._fired else max(0.0, self._deadline - time.monotonic()))
            else:
                return ask.result
        self._run(asks, compute)
        return ask.result

    def _run(self, asks: list[_Ask], compute: Compute) -> None:
        """Compute every ask's collections in one call; on failure, leave each to compute alone."""
        try:
            if len(asks) > 1:
                merged = compute(tuple(item for ask in asks for item in ask.collections))
                start = 0
                for ask in asks:
                    ask.result = tuple(merged[start : start + len(ask.collections)])
                    start += len(ask.collections)
                self.shared = len(asks)
                log.info("%d requests on the same inputs computed together", len(asks))
        except Exception:
            for ask in asks:
                ask.result = None  # each runs its own computation and meets its own error
        finally:
            with self._cond:
                for ask in asks:
                    ask.answered = True
                self._cond.notify_all()


class FusedMember:
    """One request's place in its group: it asks once (its first computation) or leaves."""

    def __init__(self, group: FusedGroup) -> None:
        self.group = group
        self._done = False

    def compute(self, collections: tuple[Any, ...], compute: Compute) -> tuple[Any, ...] | None:
        """The values of ``collections``, computed with the group's; None: compute them alone."""
        if self._done:
            return None
        self._done = True
        return self.group._ask(collections, compute)

    def leave(self) -> None:
        """The request ended (or will compute no more with the group)."""
        if not self._done:
            self._done = True
            self.group._leave()


class Fusions:
    """The site's open groups, one per set of inputs."""

    def __init__(self) -> None:
        self._open: dict[frozenset[str], FusedGroup] = {}
        self._lock = threading.Lock()

    def join(self, key: frozenset[str]) -> FusedMember | None:
        """A place in the open group for ``key`` (a new group if there is none, or it has run); None for no inputs."""
        if not key:
            return None
        with self._lock:
            if len(self._open) > 1024:
                self._open = {k: g for k, g in self._open.items() if not g.fired}
            group = self._open.get(key)
            member = group.member() if group is not None else None
            if member is None:
                group = self._open[key] = FusedGroup()
                member = group.member()
            return member
