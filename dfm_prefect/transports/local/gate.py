"""Local transport, site side: connections that have not yet authenticated, held to a deadline and a cap.

Anyone on the machine can connect to a site's port. Until a connection has
passed the key handshake it costs the site a descriptor and a thread, so the
gate bounds both: each such connection is shut down when its handshake has
not finished ``timeout`` seconds after it was accepted (a client that sends
nothing, or one byte at a time, gains nothing), and at most ``limit`` wait at
once: one more sheds the oldest (an honest handshake takes milliseconds, so the
oldest waiting connection is the likeliest to be silent). When ``accept()``
fails for lack of descriptors, the server sheds the oldest one too.

Example::

    gate = HandshakeGate(timeout=10.0, limit=64)
    gate.admit(peer, conn)           # before the handshake
    if gate.passed(peer): ...        # after it: False if the gate shut it down meanwhile
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict
from multiprocessing.connection import Connection

log = logging.getLogger("dfm_prefect.site.local")


def shutdown(conn: Connection) -> None:
    """Wake a thread blocked on ``conn`` (it sees end-of-file) without closing the descriptor under it."""
    try:
        sock = socket.socket(fileno=conn.fileno())
    except OSError:
        return  # already closed
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the peer is gone already
    finally:
        sock.detach()


class HandshakeGate:
    """Unauthenticated connections of one site: each with a deadline, at most ``limit`` at once."""

    def __init__(self, *, timeout: float, limit: int) -> None:
        self.timeout = timeout
        self.limit = limit
        self.shed = 0
        """Connections shut down before they authenticated (late, or shed for room)."""
        self._waiting: OrderedDict[str, tuple[float, Connection]] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._reap, name="site-handshake-deadlines", daemon=True).start()

    def admit(self, peer: str, conn: Connection) -> None:
        """Hold ``conn`` to the deadline; if the gate is full, shed the oldest waiting connection."""
        with self._cond:
            self._waiting[peer] = (time.monotonic() + self.timeout, conn)
            while len(self._waiting) > self.limit:
                self._shed_oldest(f"more than {self.limit} connections were waiting to authenticate")
            self._cond.notify()

    def passed(self, peer: str) -> bool:
        """The connection is done with its handshake (either way); False if the gate had shut it down."""
        with self._cond:
            return self._waiting.pop(peer, None) is not None

    def shed_oldest(self, reason: str) -> bool:
        """Shut down the connection that has waited longest to authenticate; False if none waits."""
        with self._cond:
            return self._shed_oldest(reason)

    def _shed_oldest(self, reason: str) -> bool:
        if not self._waiting:
            return False
        peer, (_, conn) = self._waiting.popitem(last=False)
        # Still registered, so its thread has not closed it: the descriptor is still this connection's.
        shutdown(conn)
        self.shed += 1
        log.info("shut down unauthenticated connection %s: %s", peer, reason)
        return True

    def _reap(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._waiting and next(iter(self._waiting.values()))[0] <= now:
                    self._shed_oldest(f"it did not authenticate within {self.timeout:g} s")
                # Entries are in admission order, so the first holds the earliest deadline.
                wait = next(iter(self._waiting.values()))[0] - now if self._waiting else None
                self._cond.wait(wait)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            while self._shed_oldest("the site is shutting down"):
                pass
            self._cond.notify()
