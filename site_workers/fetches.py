"""Answering fetches: pieces of stored results for clients, and for sites that move them under a person's grant.

A fetch names a `DataRef`; the site checks it is its own and intact (size and
sha256 against the stored bytes, kind and format against the stored name),
applies the export policy for whoever asks (a client's identity, or a site
moving the result for the person who signed the move), scans it once for the
site's credentials, and sends the asked-for piece. A view is first materialized
(in the site's pool, counted against its limits like a run).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from dfm_prefect.core.errors import (
    AccessDeniedError,
    ExportRefusedError,
    FederationError,
    RequestCancelledError,
    SiteOverloadedError,
)
from dfm_prefect.core.operations import MOVE_OPERATION
from dfm_prefect.core.refs import DataRef
from dfm_prefect.core.wire import ErrorInfo, ErrorReply, FetchChunk, FetchRequest, RunRequest, SiteMessage, b64encode
from site_workers import admission
from site_workers.config import SiteConfig
from site_workers.context import SiteContext
from site_workers.identities import AuditLog, Identities
from site_workers.peers import SITE_IDENTITY_PREFIX
from site_workers.policy import ExportGate
from site_workers.redaction import Redactor
from site_workers.store import ResultStore
from site_workers.views import Views

log = logging.getLogger("dfm_prefect.site")
GRANT_IDLE_S = 600.0
"""A move's grant, checked in full on its first piece, holds for its later pieces while they keep coming this often."""

Reply = Callable[[SiteMessage], None]


@dataclass
class Recipient:
    """Who a fetch is for: a client (its identity, if any) or another site (moving the result under a person's grant)."""

    identity: str | None = None
    site: str | None = None
    grantor: str | None = None

    @property
    def audit_name(self) -> str | None:
        return f"{SITE_IDENTITY_PREFIX}{self.site} for {self.grantor or 'anonymous'}" if self.site else self.identity



class FetchAnswers:
    """The fetch side of `site_workers.worker.SiteWorker` (which provides the state below)."""

    name: str
    config: SiteConfig
    store: ResultStore
    views: Views
    gate: ExportGate
    identities: Identities
    audit: AuditLog
    redactor: Redactor
    _lock: threading.Lock
    _stats: dict[str, int]
    _jobs: dict[str, Any]
    _materializing: dict[str, tuple[str, threading.Event]]
    _grants: OrderedDict[tuple[str, str, str], tuple[str, float]]
    _scanned: OrderedDict[tuple[str, str], None]
    _pool: ThreadPoolExecutor
    _context: Callable[..., SiteContext]
    _safe_reply: Callable[[Reply, SiteMessage], None]
    _error: Callable[[BaseException], ErrorInfo]

    def _fetch_for(self, request: FetchRequest, reply: Reply, recipient: Recipient, peer: str = "local") -> None:
        """Answer a fetch: checked for the client or site asking; a view is first materialized (in the pool).

        The first piece of a view names the stored copy (``materialized``); the rest is
        fetched by it. The export policy decides on the view, then on the copy; a copy
        made for a fetch the policy then refuses is removed. Materializing counts
        against the site's limits like a run, and is cancelled with its client.
        """
        ref = request.ref
        if recipient.site is not None:
            self._check_grant(request, recipient)
        self.views.check_owned(ref)
        if not ref.is_view:
            self._safe_reply(reply, self._piece(request, ref, recipient))
            return
        self._check_export(ref, recipient, None)
        stored = self.views.materialized(ref)
        if stored is not None:
            self._safe_reply(reply, self._piece(request, stored, recipient, materialized=True))
            return
        limits = self.config.limits
        cancelled = threading.Event()
        with self._lock:
            held = len(self._jobs) + len(self._materializing)
            if held >= limits.queue + limits.concurrency:
                self._stats["rejected"] += 1
                raise SiteOverloadedError(
                    f"{held} requests are queued or running, this site's limit (concurrency {limits.concurrency} + "
                    f"queue {limits.queue}); fetch again later",
                    site=self.name,
                )
            self._materializing[request.id] = (peer, cancelled)

        def materialize() -> None:
            copy = None
            try:
                if cancelled.is_set():
                    raise RequestCancelledError("cancelled before the view was materialized", site=self.name)
                owner = recipient.grantor if recipient.site else recipient.identity
                copy = self.views.materialize(ref, self._context(request.id, cancelled), owner=owner)
                with self._lock:
                    self._stats["bytes_stored"] += copy.size
                answer: SiteMessage = self._piece(request, copy, recipient, materialized=True)
            except Exception as exc:
                if copy is not None and isinstance(exc, ExportRefusedError):
                    self.views.discard(ref)  # made for a fetch the policy refuses: not kept
                log.info("fetch %s of a view refused: %s", request.id, self.redactor.text(str(exc)))
                self.audit.record("refused", recipient.audit_name, request.id, kind="fetch", error=self._error(exc).code)
                answer = ErrorReply(id=request.id, error=self._error(exc))
            finally:
                with self._lock:
                    self._materializing.pop(request.id, None)
            self._safe_reply(reply, answer)

        self._pool.submit(materialize)

    def _check_grant(self, request: FetchRequest, recipient: Recipient) -> None:
        """A site fetches only what a person asked it to move: the signed ``dfm.move`` request, for that site, naming this result."""
        grant, site = request.grant, recipient.site
        assert site is not None
        if grant is None or grant.op != MOVE_OPERATION:
            raise AccessDeniedError(
                f"site {site!r} fetched {request.ref!r} without a move request signed for it; a site fetches only "
                "what a flow asked it to move",
                site=self.name,
            )
        recipient.grantor = self._grantor(grant, site)
        try:
            granted = admission.move_params(grant, self.config.limits, self.name).ref
        except FederationError as exc:
            raise AccessDeniedError(f"the move request site {site!r} presented is not valid: {exc}", site=self.name) from None
        if granted.uri != request.ref.uri:
            copy = self.views.materialized(granted) if granted.is_view and granted.site == self.name else None
            if copy is None or copy.uri != request.ref.uri:
                raise AccessDeniedError(f"site {site!r} fetched {request.ref!r}, but its move request names {granted!r}", site=self.name)

    def _grantor(self, grant: RunRequest, site: str) -> str:
        """Who signed ``grant`` for ``site``: checked in full on the move's first piece; later pieces of a move
        that keeps going are taken on that check (a move may take longer than a signature stays fresh)."""
        key = (site, grant.id, grant.auth.sig if grant.auth is not None else "")
        now = time.monotonic()
        with self._lock:
            known = self._grants.get(key)
            if known is not None and now - known[1] < GRANT_IDLE_S:
                self._grants[key] = (known[0], now)
                return known[0]
        grantor = self.identities.grantor(grant, site)
        with self._lock:
            self._grants[key] = (grantor, now)
            while len(self._grants) > 10_000:
                self._grants.popitem(last=False)
        return grantor

    def _check_export(self, ref: DataRef, recipient: Recipient, contributors: int | None) -> None:
        if recipient.site is not None:
            self.gate.check_site_export(ref, recipient.site, contributors)
        else:
            self.gate.check_export(ref, recipient.identity, contributors)

    def _piece(self, request: FetchRequest, ref: DataRef, recipient: Recipient, *, materialized: bool = False) -> FetchChunk:
        """One piece of a stored result, if it may go to ``recipient``; with ``materialized``, naming the copy."""
        # What the site recorded decides, not what the reference claims: size and sha256
        # are checked against the stored bytes, kind and format against the stored name.
        self.store.verify(ref)
        if self.store.bound_kind(ref) is None:
            raise ExportRefusedError(
                f"{ref!r} was stored before results were bound to their kind, so it cannot be exported; "
                "run the operation that produced it again",
                site=self.name,
            )
        self._check_export(ref, recipient, self.store.contributors(ref))
        if self.redactor.active and (ref.uri, ref.sha256) not in self._scanned:
            # The whole result, not the piece: a credential may straddle pieces. What may
            # leave is bounded by the policy's max_bytes, so this read is bounded; a result
            # that passed is not read again (verify() above holds it to the same bytes).
            self.gate.check_content(ref, self.store.read_bytes(ref))
            with self._lock:
                self._scanned[(ref.uri, ref.sha256)] = None
                while len(self._scanned) > 10_000:
                    self._scanned.popitem(last=False)
        data = self.store.read_bytes(ref, request.offset, request.length)
        with self._lock:
            self._stats["bytes_to_sites" if recipient.site else "bytes_out"] += len(data)
        event = {"to_site": recipient.site} if recipient.site else {}
        self.audit.record(
            "move-out" if recipient.site else "fetch", recipient.audit_name, request.id,
            ref=ref.uri, kind=ref.kind, offset=request.offset, bytes_out=len(data), **event,
        )
        end = request.offset + len(data)
        chunk = FetchChunk(
            id=request.id, offset=request.offset, data=b64encode(data), salt=self.store.salt(ref), total=ref.size, eof=end >= ref.size
        )
        if materialized:
            shown = self.gate.outgoing_to_site(ref, recipient.site) if recipient.site else self.gate.outgoing(ref, recipient.identity)
            chunk = chunk.model_copy(update={"materialized": shown})
        return chunk
