"""Per-client reply mailboxes of the mesh controller, with sequence cursors, a long-poll and client liveness.

Independent of FLARE, so it is tested on its own. Each client (one transport
instance, named by its id) has a mailbox of reply pieces numbered by a
per-mailbox sequence. A client acknowledges what it processed by sending the
highest sequence number back (``ack``); unacknowledged pieces are delivered
again (at-least-once; the client drops duplicates by sequence). Several clients
can share one mesh job without taking each other's replies.

Buffer space is per party, so that no one can starve the rest: each site may
hold at most ``max_site_bytes`` across all mailboxes and each client's mailbox
at most ``max_client_bytes``, beyond which :meth:`Mailboxes.deliver` answers
``FULL`` and the site resends later; ``max_bytes`` bounds the total. A site
with nothing buffered in a mailbox can always add one piece to it, so a site
or client that fills its own share never blocks another's. Pieces for a client
that has no mailbox (it never exchanged, or it left) are dropped.

Clients are not connected to the controller: they only send exchanges. So a
client's liveness is judged from them. A client that said it waits for answers
(``watched``) exchanges all the time; one that has not done so for
``client_timeout`` seconds is gone (killed, frozen, cut off), and
:meth:`Mailboxes.expire` returns it so that its work is cancelled at the sites.
A client that waits for nothing makes no calls at all and is never declared
gone for that; its empty mailbox is dropped after ``idle_expiry``. A gone
client that exchanges again is told so (its earlier requests were cancelled)
and gets a fresh mailbox whose sequence continues after its ``ack``.

Example:

```python
boxes = Mailboxes()
boxes.begin("client-1", ack=0, watched=True)       # its first exchange opens the mailbox
boxes.deliver("client-1", "north", "frame-1", 0, 1, '{"v":1,"messages":[]}')
pieces, more = boxes.collect("client-1", ack=0, wait=0.5, max_bytes=1 << 20)
assert pieces[0].seq == 1 and not more
boxes.collect("client-1", ack=1, wait=0.0, max_bytes=1 << 20)  # acknowledges seq 1
```
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from dfm_prefect.transports.flare.protocol import Piece, piece_cost

REMEMBER_GONE = 10_000
"""How many gone clients are remembered (to tell them, and to drop late replies for them)."""


class Delivery(enum.Enum):
    """What became of a reply piece handed to :meth:`Mailboxes.deliver`."""

    QUEUED = "queued"
    FULL = "full"
    """Over the site's, the client's or the total quota: resend later."""
    DROPPED = "dropped"
    """The client is gone or never had a mailbox: nobody will collect it."""


@dataclass
class _Mailbox:
    pieces: OrderedDict[int, Piece] = field(default_factory=OrderedDict)
    seq: int = 0
    bytes: int = 0
    by_site: Counter[str] = field(default_factory=Counter)
    used: float = 0.0
    watched: bool = False
    active: int = 0


class Mailboxes:
    """Reply pieces waiting for their clients, and which clients are still there.

    Args:
        max_bytes: total bytes buffered for all clients; beyond it :meth:`deliver`
            refuses pieces and sites resend them later (backpressure).
        max_site_bytes: bytes one site may have buffered, over all mailboxes.
        max_client_bytes: bytes one client's mailbox may hold.
        client_timeout: a client that waits for answers and has not exchanged for
            this long is gone.
        idle_expiry: a mailbox of a client that waits for nothing is dropped after
            this long without an exchange.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 256 << 20,
        max_site_bytes: int = 64 << 20,
        max_client_bytes: int = 64 << 20,
        client_timeout: float = 10.0,
        idle_expiry: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_site_bytes = max_site_bytes
        self.max_client_bytes = max_client_bytes
        self._site_bytes: Counter[str] = Counter()
        self.client_timeout = client_timeout
        self.idle_expiry = idle_expiry
        self.dropped = 0
        self._clock = clock
        self._boxes: dict[str, _Mailbox] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()
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

    def begin(self, client: str, *, ack: int, watched: bool) -> str | None:
        """An exchange from ``client`` starts: note it is alive; the reason if it had been declared gone.

        ``watched`` says whether the client waits for answers (it then keeps
        exchanging, and a silence longer than ``client_timeout`` means it is gone).
        """
        with self._cond:
            expired = self._gone.pop(client, None)
            box = self._boxes.get(client)
            if box is None:
                # Continue after the client's cursor, so that nothing new looks acknowledged.
                box = self._boxes[client] = _Mailbox(seq=ack)
            box.used = self._clock()
            box.watched = watched
            return expired

    def deliver(self, client: str, site: str, frame: str, index: int, count: int, data: str) -> Delivery:
        """Queue one reply piece from ``site`` for ``client`` (see the module doc for the quotas)."""
        size = piece_cost(frame, data)
        with self._cond:
            box = self._boxes.get(client)
            if box is None:
                self.dropped += 1
                return Delivery.DROPPED
            held = self._site_bytes[site]
            if held and (held + size > self.max_site_bytes or self._bytes + size > self.max_bytes):
                return Delivery.FULL
            if box.by_site[site] and box.bytes + size > self.max_client_bytes:
                return Delivery.FULL
            box.seq += 1
            box.pieces[box.seq] = Piece(seq=box.seq, site=site, frame=frame, index=index, count=count, data=data)
            self._account(box, site, size)
            self._cond.notify_all()
            return Delivery.QUEUED

    def _account(self, box: _Mailbox, site: str, size: int) -> None:
        """Add (or with a negative ``size`` release) buffered bytes of ``site`` in ``box`` (holding the lock)."""
        box.bytes += size
        box.by_site[site] += size
        self._site_bytes[site] += size
        self._bytes += size
        if not self._site_bytes[site]:
            del self._site_bytes[site]

    def collect(self, client: str, *, ack: int, wait: float, max_bytes: int) -> tuple[list[Piece], bool]:
        """Drop pieces up to ``ack``, then return pieces after it (waiting up to ``wait`` for one).

        Returns early when any piece is there, when :meth:`wake` is called (site
        states changed) or when the mailboxes stop. The second value says whether
        more pieces are waiting beyond ``max_bytes``. A client is never declared
        gone while it waits here.
        """
        deadline = time.monotonic() + wait
        with self._cond:
            box = self._boxes.get(client)
            if box is None:
                box = self._boxes[client] = _Mailbox(seq=ack)
            box.active += 1
            try:
                while box.pieces and next(iter(box.pieces)) <= ack:
                    _, piece = box.pieces.popitem(last=False)
                    self._account(box, piece.site, -piece_cost(piece.frame, piece.data))
                generation = self._generation
                while not box.pieces and not self._stopped and generation == self._generation:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                out: list[Piece] = []
                size = 0
                for piece in box.pieces.values():
                    cost = piece_cost(piece.frame, piece.data)
                    if out and size + cost > max_bytes:
                        return out, True
                    out.append(piece)
                    size += cost
                return out, False
            finally:
                box.active -= 1
                box.used = self._clock()

    def close(self, client: str, reason: str = "it said goodbye") -> None:
        """Forget a client's mailbox (it is leaving); later replies for it are dropped."""
        with self._cond:
            self._forget(client, reason)

    def expire(self) -> list[tuple[str, str]]:
        """Declare gone the clients that stopped exchanging (see the class doc); return them with the reason."""
        now = self._clock()
        gone: list[tuple[str, str]] = []
        with self._cond:
            for client, box in list(self._boxes.items()):
                if box.active:
                    continue
                silent = now - box.used
                if box.watched and silent > self.client_timeout:
                    reason = (
                        f"it waited for answers but sent no exchange for {silent:.1f}s "
                        f"(client_timeout {self.client_timeout:g}s)"
                    )
                elif silent > self.idle_expiry:
                    reason = f"it sent no exchange for {silent:.0f}s (idle_expiry {self.idle_expiry:g}s)"
                else:
                    continue
                self._forget(client, reason)
                gone.append((client, reason))
        return gone

    def _forget(self, client: str, reason: str) -> None:
        box = self._boxes.pop(client, None)
        if box is not None:
            for piece in box.pieces.values():
                self._account(box, piece.site, -piece_cost(piece.frame, piece.data))
        self._gone[client] = reason
        self._gone.move_to_end(client)
        while len(self._gone) > REMEMBER_GONE:
            self._gone.popitem(last=False)

    def wake(self) -> None:
        """Return every waiting collect now (site states changed)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
