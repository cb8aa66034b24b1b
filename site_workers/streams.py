"""Streaming operations at the site: each item stored, checked and sent as soon as it is made.

A streaming operation (``@operation(..., stream=True)``) is a generator. The
site resumes it for item ``n`` only once the client allowed item ``n``: the
request's ``window`` allows the first items, and each `StreamCredit` the client
sends as it takes items allows more. So a client that stops taking items stops
the generator, and the site holds at most the item being made: its memory does
not grow with the stream, however slow the client. A client that allows nothing
for ``limits.reply_stall_s`` has the stream stopped (`StreamStalledError`), so
a forgotten stream does not keep a slot of the site's pool forever.

Every item is a result like any other: stored under its kind with the
smallest group its operation counted, sent inline only where the export policy
allows it for the client that asked, and otherwise as a reference.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dfm_prefect.core.errors import StreamStalledError
from dfm_prefect.core.operations import Operation, OperationParams
from dfm_prefect.core.refs import Recipe
from dfm_prefect.core.wire import MAX_WINDOW, StreamItem, b64encode
from site_workers.context import SiteContext
from site_workers.policy import ExportGate
from site_workers.store import ResultStore
from site_workers.summaries import summarize


class Credits:
    """How far the client lets one stream go (items are numbered from 0)."""

    def __init__(self, window: int) -> None:
        self._upto = window
        self.sent = 0
        """Items sent so far (the stream counts them)."""
        self._cond = threading.Condition()
        self._stopped = False

    def grant(self, upto: int) -> None:
        """Allow items up to (not including) ``upto``, at most `MAX_WINDOW` past those sent; credits never shrink."""
        with self._cond:
            upto = min(upto, self.sent + MAX_WINDOW)
            if upto > self._upto:
                self._upto = upto
                self._cond.notify_all()

    def stop(self) -> None:
        """Wake a stream waiting for credit (it was cancelled or ran out of time)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def wait_for(self, seq: int, stall_s: float, site: str) -> None:
        """Return once item ``seq`` may be made (or the stream was stopped); `StreamStalledError` after ``stall_s``."""
        deadline = time.monotonic() + stall_s
        with self._cond:
            while self._upto <= seq and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StreamStalledError(
                        f"the client took no item of the stream for {stall_s:g} s after item {seq - 1}; "
                        "the site stopped it (iterate the stream, or close it when done)",
                        site=site,
                    )
                self._cond.wait(remaining)


@dataclass
class StreamRun:
    """One run of a streaming operation, for one client."""

    request_id: str
    op: Operation
    params: OperationParams
    ctx: SiteContext
    credits: Credits
    store: ResultStore
    gate: ExportGate
    identity: str | None
    send: Callable[[StreamItem], None]
    stall_s: float
    recipe: Recipe | None = None
    items: int = 0
    bytes_out: int = 0
    bytes_stored: int = 0

    def run(self) -> None:
        """Make, store and send every item, in order, each only once the client allowed it."""
        items = self.op.run(self.params, self.ctx)
        try:
            while True:
                self.credits.wait_for(self.items, self.stall_s, self.ctx.site)
                self.ctx.check_cancelled()
                self.ctx.contributors = None  # each item is its own result, counted on its own
                try:
                    value = next(items)
                except StopIteration:
                    return
                self.ctx.check_cancelled()
                self._send(value)
        finally:
            items.close()

    def _send(self, value: object) -> None:
        op = self.op
        counted = self.ctx.contributors if op.result_kind == "aggregate" else None
        ref, payload = self.store.put(
            value, op=op.name, kind=op.result_kind, summary=summarize(value), contributors=counted, recipe=self.recipe,
            owner=self.identity,
        )
        inline = self.gate.inline(ref, payload, self.store, self.identity)
        self.send(
            StreamItem(
                id=self.request_id,
                seq=self.items,
                ref=self.gate.outgoing(ref, self.identity),
                payload=b64encode(inline) if inline is not None else None,
                salt=self.store.salt(ref) if inline is not None else "",
            )
        )
        self.items += 1
        self.credits.sent = self.items
        self.bytes_out += len(inline or b"")
        self.bytes_stored += ref.size
