"""A site's own requests to other sites (the fetches of a move), over whatever its transport provides.

The transport gives the site a way to send messages to another site (``send``)
and calls :meth:`Peers.on_message` with each answer; the local transport
connects to the other site's process with a certificate that names this site
(``site:<name>``, issued by the federation's CA), FLARE sends through the mesh
job, whose server tells the other site who sent it as FLARE authenticated it.
Nothing here trusts what another site answers beyond its shape: a move checks
size and sha256 of what arrives (`site_workers.moves`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from dfm_prefect.core.errors import FederationError, SiteUnavailableError, error_class
from dfm_prefect.core.identity import Signer
from dfm_prefect.core.wire import ClientMessage, ErrorReply, SiteMessage

SITE_IDENTITY_PREFIX = "site:"
"""Identities that stand for a site, not a person (a person's certificate can never carry one)."""

Send = Callable[[str, Sequence[ClientMessage]], None]


def site_identity(site: str) -> str:
    return SITE_IDENTITY_PREFIX + site


class Answer:
    """The answer to one request to another site, waited for with the request's timeout."""

    def __init__(self, site: str, future: Future[SiteMessage], timeout: float, forget: Callable[[], None]) -> None:
        self.site = site
        self._future = future
        self._timeout = timeout
        self._forget = forget

    def result(self) -> SiteMessage:
        try:
            return self._future.result(timeout=self._timeout)
        except FutureTimeout:
            self._forget()
            raise SiteUnavailableError(f"site {self.site!r} did not answer within {self._timeout:g}s", site=self.site) from None


class Peers:
    """This site's outstanding requests to other sites, answered by id."""

    def __init__(self, site: str, send: Send, signer: Signer | None = None) -> None:
        self.site = site
        self._send = send
        self._signer = signer
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[str, Future[SiteMessage]]] = {}

    def request(self, site: str, message: Any, timeout: float) -> SiteMessage:
        """Send one message to ``site`` and wait for its answer; the other site's error is raised."""
        return self.submit(site, message, timeout).result()

    def submit(self, site: str, message: Any, timeout: float) -> Answer:
        """Send one message to ``site``; its answer to wait for (several may be in flight)."""
        if site == self.site:
            raise FederationError(f"site {site!r} cannot fetch from itself")
        if self._signer is not None:
            message = self._signer.sign(message, site)
        future: Future[SiteMessage] = Future()
        with self._lock:
            self._pending[message.id] = (site, future)
        future.add_done_callback(lambda _: self._forget(message.id))
        try:
            self._send(site, [message])
        except FederationError as exc:
            future.set_exception(exc)
        except Exception as exc:
            future.set_exception(SiteUnavailableError(f"cannot reach site {site!r}: {exc}", site=site))
        return Answer(site, future, timeout, lambda: self._forget(message.id))

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)

    def on_message(self, site: str, message: SiteMessage) -> None:
        """An answer from ``site``: resolve the request it answers (only a request that went to that site)."""
        with self._lock:
            entry = self._pending.get(getattr(message, "id", None) or "")
        if entry is None or entry[0] != site or entry[1].done():
            return
        if isinstance(message, ErrorReply):
            entry[1].set_exception(error_class(message.error.code)(message.error.message, site=site))
        else:
            entry[1].set_result(message)

    def waiting_for(self, site: str) -> bool:
        """True while a request to ``site`` waits for its answer (answers nobody waits for are dropped)."""
        with self._lock:
            return any(target == site for target, _ in self._pending.values())

    def on_lost(self, site: str, reason: str) -> None:
        """The connection to ``site`` is gone: fail what waits for it."""
        with self._lock:
            waiting = [future for target, future in self._pending.values() if target == site]
        for future in waiting:
            if not future.done():
                future.set_exception(SiteUnavailableError(f"lost site {site!r} during a move: {reason}", site=site))
