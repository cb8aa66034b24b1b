"""One pass over shared data: the requests of one frame compute their Dask graphs as one.

A flow that asks one site for several statistics of the same data (moments and a
histogram of the same box, say) sends the requests together: the client batches
what is ready at the same time into one frame per site. Each operation still
runs as its own request, in its own thread, with its own result, but the first
Dask computation of each waits for the others of its frame (those the site could
start at once), and the site runs them as one ``dask.compute``: tasks with the
same key (reading and decoding a chunk, cutting a box out of it) run once, so
each chunk is read once for all of them.

A request that computes nothing (a view, an answer from the cache) leaves its
group when it ends, so the others do not wait for it. A group never waits more
than :data:`WAIT_S` for a member, and a shared computation that fails is run
again per request, so one request's error is never another's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

WAIT_S = 2.0
"""The longest a request's computation waits for the other requests of its frame."""

Compute = Callable[[tuple[Any, ...]], tuple[Any, ...]]


class _Ask:
    def __init__(self, collections: tuple[Any, ...]) -> None:
        self.collections = collections
        self.result: tuple[Any, ...] | None = None
        self.answered = False


class FusedGroup:
    """The requests of one frame that may share their first Dask computation."""

    def __init__(self, members: int) -> None:
        self._active = members
        """Members that have neither asked to compute nor left."""
        self._asks: list[_Ask] = []
        self._fired = False
        self._deadline: float | None = None
        self._cond = threading.Condition()
        self.joined = 0
        self.shared = 0
        """How many computations ran together (for the site log and tests)."""

    def member(self) -> FusedMember:
        """A place in the group for one request the site accepted."""
        with self._cond:
            self.joined += 1
        return FusedMember(self)

    def settle(self, joined: int, expected: int) -> None:
        """Only ``joined`` of the ``expected`` requests became members (the others were refused or answered at once)."""
        self._leave(expected - joined)

    def _leave(self, count: int = 1) -> None:
        with self._cond:
            self._active -= count
            self._cond.notify_all()

    def _ask(self, collections: tuple[Any, ...], compute: Compute) -> tuple[Any, ...] | None:
        ask = _Ask(collections)
        with self._cond:
            if self._fired:
                self._active -= 1
                return None  # the group ran already: compute alone
            self._asks.append(ask)
            self._active -= 1
            if self._deadline is None:
                self._deadline = time.monotonic() + WAIT_S
            while not ask.answered:
                if not self._fired and (self._active <= 0 or time.monotonic() >= self._deadline):
                    self._fired = True
                    asks = list(self._asks)
                    break
                if self._fired:
                    self._cond.wait()
                else:
                    self._cond.wait(max(0.0, self._deadline - time.monotonic()))
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
