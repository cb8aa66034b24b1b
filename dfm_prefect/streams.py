"""The client's side of a streaming operation: its items, in order, as the site makes them.

Example:
    ```python
    from dfm_prefect.client import get_client

    client = get_client("federation.json")
    with client.stream("north", "xarray.moments_stream", {"data": "temperature", "dims": ["lat", "lon"]}) as items:
        for part in items:                 # each a DataRef, as soon as the site has it
            print(part.fetch())
    ```

Back-pressure: the site makes item ``n`` only once the client allowed it. The
stream allows ``window`` items ahead of what the caller has taken, and allows
one more each time the caller takes one (credits are sent in batches of half a
window), so a caller that stops iterating stops the site's operation after at
most ``window`` items, and neither side holds more than that.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from dfm_prefect.core.errors import FederationError
from dfm_prefect.core.refs import DataRef
from dfm_prefect.core.wire import RunResult, SiteMessage, StreamItem, unwrap, unwrap_item

DEFAULT_WINDOW = 8


class ResultStream(Iterator[DataRef]):
    """The items of one streaming request, each a `DataRef` (its value attached where the site sent it inline)."""

    def __init__(
        self,
        site: str,
        request_id: str,
        done: Future[SiteMessage],
        *,
        window: int,
        allow: Callable[[int], None],
        cancel: Callable[[], None],
    ) -> None:
        self.site = site
        self.request_id = request_id
        self.window = window
        self.taken = 0
        """Items the caller has taken so far."""
        self._done = done
        self._allow = allow
        self._cancel = cancel
        self._allowed = window
        self._items: deque[StreamItem] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._broken: str | None = None
        done.add_done_callback(lambda _: self._wake())

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def deliver(self, item: StreamItem) -> None:
        """Called by the client (from a transport thread) with each item the site sent.

        An item past what the client allowed breaks the site's side of the protocol:
        it is not kept (the client's memory stays bounded) and the stream fails.
        """
        with self._cond:
            if item.seq >= self._allowed:
                self._broken = f"site {self.site!r} sent item {item.seq} of the stream, past the {self._allowed} it was allowed"
                self._items.clear()
            elif self._broken is None:
                self._items.append(item)
            self._cond.notify_all()

    def __iter__(self) -> ResultStream:
        return self

    def __next__(self) -> DataRef:
        return self.next()

    def next(self, timeout: float | None = None) -> DataRef:
        """The next item (waiting at most ``timeout`` seconds: `TimeoutError`); `StopIteration` after the last."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._done.done() or self._closed or self._broken, timeout):
                raise TimeoutError(f"no item of the stream from site {self.site!r} within {timeout:g} s")
            broken, item = self._broken, self._items.popleft() if self._items and not self._broken else None
            if item is not None:
                if item.seq != self.taken:
                    broken = f"site {self.site!r} sent item {item.seq} of the stream where item {self.taken} was due"
                else:
                    self.taken += 1
                    grant = self.taken + self.window
                    if grant - self._allowed >= max(1, self.window // 2):
                        self._allowed = grant
                    else:
                        grant = 0
        if broken is not None:
            self.close()
            raise FederationError(broken, site=self.site)
        if item is None:
            if self._closed:
                raise StopIteration
            self._finish()
            raise StopIteration
        if grant:
            self._allow(grant)
        return unwrap_item(item)

    def _finish(self) -> None:
        """The stream's end: the site's answer says how many items there were, or carries its error."""
        reply = self._done.result()
        assert isinstance(reply, RunResult)
        if not reply.ok:
            unwrap(reply)  # raises the site's error
        if reply.items is not None and reply.items != self.taken:
            raise FederationError(
                f"the stream from site {self.site!r} ended after {self.taken} item(s), but the site sent {reply.items}", site=self.site
            )

    @property
    def done(self) -> Future[SiteMessage]:
        """The future of the site's closing answer."""
        return self._done

    @property
    def result(self) -> RunResult | None:
        """The site's closing answer once the stream ended (None before)."""
        if not self._done.done() or self._done.exception() is not None:
            return None
        reply = self._done.result()
        return reply if isinstance(reply, RunResult) else None

    def close(self) -> None:
        """Stop the stream: the site stops its operation (items not yet taken are dropped)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._items.clear()
            self._cond.notify_all()
        if not self._done.done():
            self._cancel()

    def __enter__(self) -> ResultStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed and not self._done.done():
                self._cancel()
        except Exception:  # interpreter shutdown: nothing left to tell
            pass
