"""A site's replies to one client, held in a bounded buffer: a client that stops reading cannot grow the site.

Each transport's site side sends a client's replies through one
:class:`ReplyBuffer`. It batches them like a
:class:`~dfm_prefect.core.framing.BatchingWriter` (which sends them) and holds at
most ``max_bytes`` of replies not yet sent:

- a reply put with ``wait=True`` (by the thread that reads that client's frames)
  waits for room: the site stops reading that client's frames, so it stops
  taking new work from it, until the client reads (back-pressure);
- a reply put without waiting (from the site's shared worker threads, which must
  never block on one client) that does not fit is made lighter: a progress update
  is dropped, a run result loses its inline payload and logs (the client fetches
  the value by reference instead, which waits for room like any fetch), a fetched
  chunk becomes a ``site_overloaded`` error that says to fetch again;
- if even that would take the buffer past twice ``max_bytes``, or the client has
  read nothing for ``stall_s`` seconds while the site waits, the buffer gives up
  on the client: ``on_overflow`` is called once with the reason (the transport
  drops the connection and cancels the client's work) and later replies are
  discarded.

Example::

    buffer = ReplyBuffer(send_frame, name="site-writer-1", on_overflow=drop_connection)
    worker.handle_frame(frame, lambda message: buffer.put(message, wait=reading_thread()))
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dfm_prefect.core.errors import SiteOverloadedError
from dfm_prefect.core.framing import BatchingWriter
from dfm_prefect.core.wire import ErrorInfo, ErrorReply, FetchChunk, ProgressUpdate, RunResult, SiteMessage

log = logging.getLogger("dfm_prefect.core.backpressure")

DEFAULT_MAX_BYTES = 64 << 20
"""Replies one client may have waiting at a site, in bytes of JSON."""
DEFAULT_STALL_S = 120.0
"""How long a site waits for a client that reads nothing before it drops the client."""


def _lighter(message: SiteMessage, held: int) -> SiteMessage | None:
    """A smaller stand-in for a reply that does not fit, or None to drop it."""
    if isinstance(message, ProgressUpdate):
        return None  # advisory; the result follows
    if isinstance(message, RunResult) and (message.payload is not None or message.logs):
        return message.model_copy(update={"payload": None, "salt": "", "logs": []})
    if isinstance(message, FetchChunk):
        text = (
            f"this site holds {held >> 20} MiB of replies that this client has not read yet, so it did not send "
            "this chunk; read the replies, then fetch it again"
        )
        return ErrorReply(id=message.id, error=ErrorInfo(code=SiteOverloadedError.code, message=text))
    return message


class ReplyBuffer:
    """The bounded reply buffer of one client connection (see the module docstring)."""

    def __init__(
        self,
        send: Callable[[list[SiteMessage]], None],
        *,
        name: str,
        on_overflow: Callable[[str], None],
        max_bytes: int = DEFAULT_MAX_BYTES,
        stall_s: float = DEFAULT_STALL_S,
        linger: float = 0.0,
    ) -> None:
        self.max_bytes = max_bytes
        self._name = name
        self.stall_s = stall_s
        self._send = send
        self._on_overflow = on_overflow
        self._cond = threading.Condition()
        self._held = 0
        self._drained = time.monotonic()
        self._gave_up = False
        self._closed = False
        self.lightened = 0
        """Replies made lighter or dropped because the buffer was full."""
        self._writer: BatchingWriter[tuple[SiteMessage, int]] = BatchingWriter(self._send_sized, name=name, linger=linger)

    @property
    def held(self) -> int:
        """Bytes of replies waiting to be sent."""
        with self._cond:
            return self._held

    def put(self, message: SiteMessage, *, wait: bool = False) -> None:
        """Queue one reply; with ``wait``, block until it fits (only the client's own reading thread may)."""
        size = len(message.model_dump_json())
        reason = None
        with self._cond:
            if wait:
                if not self._wait(lambda: self._held == 0 or self._held + size <= self.max_bytes):
                    return
            elif self._held + size > self.max_bytes and not self._gave_up:
                lighter = _lighter(message, self._held)
                self.lightened += 1
                if lighter is None:
                    return
                message, size = lighter, len(lighter.model_dump_json())
                if self._held + size > 2 * self.max_bytes:
                    reason = f"{self._held >> 20} MiB of replies wait unread, more than this site holds for one client"
            if reason is None and not self._gave_up:
                self._held += size
                self._writer.put((message, size))
        if reason is not None:
            self._give_up(reason)

    def wait_for_room(self) -> bool:
        """Block while the buffer is full (the caller then reads no more frames); False once given up or closed."""
        with self._cond:
            return self._wait(lambda: self._held < self.max_bytes)

    def _wait(self, room: Callable[[], bool]) -> bool:
        """Wait (holding the condition) until ``room()``; gives up on a client that reads nothing for ``stall_s``."""
        since = time.monotonic()
        while not room():
            if self._gave_up or self._closed:
                return False
            left = self.stall_s - (time.monotonic() - max(since, self._drained))
            if left <= 0:
                reason = f"the client read none of its {self._held >> 20} MiB of replies for {self.stall_s:g} s"
                self._cond.release()
                try:
                    self._give_up(reason)
                finally:
                    self._cond.acquire()
                return False
            self._cond.wait(left)
        return not (self._gave_up or self._closed)

    def _give_up(self, reason: str) -> None:
        with self._cond:
            if self._gave_up:
                return
            self._gave_up = True
            self._cond.notify_all()
        log.warning("%s: giving up on the client: %s", self._name, reason)
        self._on_overflow(reason)

    def _send_sized(self, batch: list[tuple[SiteMessage, int]]) -> None:
        try:
            if not self._gave_up:
                self._send([message for message, _ in batch])
        finally:
            with self._cond:
                self._held -= sum(size for _, size in batch)
                self._drained = time.monotonic()
                self._cond.notify_all()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop sending; wake anything waiting for room."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._writer.close(timeout)
