"""Per-client reply mailboxes of the mesh controller, with sequence cursors and a long-poll.

Independent of FLARE, so it is tested on its own. Each client (one transport
instance, named by its id) has a mailbox of reply pieces numbered by a
per-mailbox sequence. A client acknowledges what it processed by sending the
highest sequence number back (``ack``); unacknowledged pieces are delivered
again (at-least-once; the client drops duplicates by sequence). Several clients
can share one mesh job without taking each other's replies.

Example:

```python
boxes = Mailboxes()
boxes.deliver("client-1", "north", "frame-1", 0, 1, '{"v":1,"messages":[]}')
pieces, more = boxes.collect("client-1", ack=0, wait=0.5, max_bytes=1 << 20)
assert pieces[0].seq == 1 and not more
boxes.collect("client-1", ack=1, wait=0.0, max_bytes=1 << 20)  # acknowledges seq 1
```
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from dfm_prefect.flare.protocol import Piece


@dataclass
class _Mailbox:
    pieces: OrderedDict[int, Piece] = field(default_factory=OrderedDict)
    seq: int = 0
    bytes: int = 0
    used: float = field(default_factory=time.monotonic)


class Mailboxes:
    """Reply pieces waiting for their clients.

    Args:
        max_bytes: total bytes buffered for all clients; beyond it :meth:`deliver`
            refuses pieces and sites resend them later (backpressure).
        idle_expiry: a mailbox nobody collected from for this long is dropped.
    """

    def __init__(self, *, max_bytes: int = 256 << 20, idle_expiry: float = 600.0) -> None:
        self.max_bytes = max_bytes
        self.idle_expiry = idle_expiry
        self._boxes: dict[str, _Mailbox] = {}
        self._bytes = 0
        self._generation = 0
        self._stopped = False
        self._cond = threading.Condition()

    @property
    def buffered_bytes(self) -> int:
        with self._cond:
            return self._bytes

    @property
    def clients(self) -> int:
        with self._cond:
            return len(self._boxes)

    def deliver(self, client: str, site: str, frame: str, index: int, count: int, data: str) -> bool:
        """Queue one reply piece for ``client``; False when the buffer is full (try again later)."""
        with self._cond:
            if self._bytes + len(data) > self.max_bytes and self._bytes > 0:
                return False
            box = self._boxes.setdefault(client, _Mailbox())
            box.seq += 1
            box.pieces[box.seq] = Piece(seq=box.seq, site=site, frame=frame, index=index, count=count, data=data)
            box.bytes += len(data)
            self._bytes += len(data)
            self._cond.notify_all()
            return True

    def collect(self, client: str, *, ack: int, wait: float, max_bytes: int) -> tuple[list[Piece], bool]:
        """Drop pieces up to ``ack``, then return pieces after it (waiting up to ``wait`` for one).

        Returns early when any piece is there, when :meth:`wake` is called (site
        states changed) or when the mailboxes stop. The second value says whether
        more pieces are waiting beyond ``max_bytes``.
        """
        deadline = time.monotonic() + wait
        with self._cond:
            box = self._boxes.setdefault(client, _Mailbox())
            box.used = time.monotonic()
            while box.pieces and next(iter(box.pieces)) <= ack:
                _, piece = box.pieces.popitem(last=False)
                box.bytes -= len(piece.data)
                self._bytes -= len(piece.data)
            generation = self._generation
            while not box.pieces and not self._stopped and generation == self._generation:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            out: list[Piece] = []
            size = 0
            for piece in box.pieces.values():
                if out and size + len(piece.data) > max_bytes:
                    return out, True
                out.append(piece)
                size += len(piece.data)
            return out, False

    def close(self, client: str) -> None:
        """Forget a client's mailbox (it said it is leaving)."""
        with self._cond:
            box = self._boxes.pop(client, None)
            if box is not None:
                self._bytes -= box.bytes

    def expire(self) -> list[str]:
        """Drop mailboxes idle longer than ``idle_expiry``; return their clients."""
        now = time.monotonic()
        with self._cond:
            gone = [c for c, box in self._boxes.items() if now - box.used > self.idle_expiry]
            for client in gone:
                self._bytes -= self._boxes.pop(client).bytes
            return gone

    def wake(self) -> None:
        """Return every waiting collect now (site states changed)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
