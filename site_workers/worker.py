"""The site-worker core: decode, check, run and answer requests. Transports are thin around it.

A transport hands :meth:`SiteWorker.handle_frame` the raw bytes of one frame and
a ``reply`` callback; the worker answers every message it can identify, exactly
once, through that callback (possibly from another thread). Nothing it receives
is unpickled, imported or evaluated: operations are looked up by name in the
site's own allow-list and run with parameters validated by their pydantic model.

Every answer leaves through one place, :meth:`SiteWorker._safe_reply`, which
masks the site's credentials in its free text (`site_workers.redaction`). A
transport that authenticates individual clients passes the client's identity
with each frame; the export policy's ``recipients`` rules decide on it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from pydantic import ValidationError

from dfm_prefect.core.errors import (
    AccessDeniedError,
    AuthenticationError,
    ConfigError,
    FederationError,
    MalformedRequestError,
    RequestCancelledError,
)
from dfm_prefect.core.operations import Operation, load_operations
from dfm_prefect.core.wire import (
    CancelRequest,
    Described,
    DescribeRequest,
    Envelope,
    ErrorInfo,
    ErrorReply,
    FetchRequest,
    RunRequest,
    SiteInfo,
    SiteLoad,
    SiteMessage,
    SiteStats,
    StatsReply,
    StatsRequest,
    StreamCredit,
)
from site_workers.answers import error_info, guess_id, site_info, validation_message, wire_safe_id
from site_workers.bindings import declared_operations
from site_workers.catalog import Catalog
from site_workers.compute import make_backend
from site_workers.config import SiteConfig
from site_workers.context import SiteContext
from site_workers.deadlines import Deadlines
from site_workers.fetches import FetchAnswers, Recipient, Reply
from site_workers.fusion import FusedMember, Fusions
from site_workers.identities import AuditLog, Identities
from site_workers.moves import Mover
from site_workers.opened import OpenedSources
from site_workers.peers import SITE_IDENTITY_PREFIX, Peers
from site_workers.policy import ExportGate
from site_workers.redaction import Redactor
from site_workers.result_cache import ResultCache, cacheable
from site_workers.runs import Job, RunAnswers
from site_workers.sources import SourceResolver
from site_workers.store import ResultStore
from site_workers.views import Views

log = logging.getLogger("dfm_prefect.site")


class SiteWorker(FetchAnswers, RunAnswers):
    """Runs the operations a site offers, for any transport."""

    def __init__(
        self, config: SiteConfig, *, root_ca: str | None = None, peers: Peers | None = None, site_certificates: bool = False
    ) -> None:
        """``peers`` reaches other sites (moves); ``site_certificates``: a certificate named ``site:<name>`` speaks for
        that site (the local transport's sites sign with such certificates; over FLARE the transport says who sent)."""
        self.config = config
        self.name = config.name
        if config.user_code.enabled:
            import site_workers.user_code  # noqa: F401  (registers code.python, only on sites that opted in)
        registry = load_operations(config.operation_modules)
        unknown = sorted(set(config.operations) - set(registry))
        if unknown:
            raise ConfigError(
                f"site {config.name!r} lists operations that are not installed: {unknown}; installed: {sorted(registry)}"
            )
        self.operations: dict[str, Operation] = {name: registry[name] for name in config.operations}
        self.operations.update(declared_operations(config))  # databases, services, programs of this site's config
        self.resolver = SourceResolver(config)
        self.store = ResultStore(config.name, config.result_store)
        self.views = Views(config.name, self.store, self.resolver, self.operations)
        unknown = sorted(set(config.cache.operations) - set(self.operations))
        if unknown:
            raise ConfigError(f"site {config.name!r}: cache.operations names operations the site does not offer: {unknown}")
        streams = sorted(name for name in config.cache.operations if self.operations[name].stream)
        if streams:
            raise ConfigError(f"site {config.name!r}: cache.operations names streaming operations, which are not cached: {streams}")
        unseen = sorted(name for name in config.cache.operations if not cacheable(self.operations[name]))
        if unseen:
            raise ConfigError(
                f"site {config.name!r}: cache.operations names operations whose inputs the site cannot fingerprint "
                f"(databases, services, programs, code, or no data inputs), so a cached answer could outlive a change: {unseen}"
            )
        self.cache = ResultCache(config.cache, self.store, self.views, self.resolver)
        self.fusions = Fusions()
        self.opened = OpenedSources(partial(self.views.fingerprint, always=True))
        self.mover = Mover(config.name, config.imports, self.store, peers)
        self.site_certificates = site_certificates
        self.compute = make_backend(config.compute)
        self.redactor = Redactor.for_config(config)
        self.catalog = Catalog(self.resolver, redact=self.redactor.text)
        self.catalog.warm()
        self.gate = ExportGate(config.name, config.export, self.redactor)
        self.identities = Identities(config.name, config.identities, root_ca)
        self.audit = AuditLog(config.name, config.identities.audit_log)
        self._pool = ThreadPoolExecutor(max_workers=config.limits.concurrency, thread_name_prefix=f"site-{config.name}")
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._materializing: dict[str, tuple[str, threading.Event]] = {}
        """Views being materialized for a fetch: request id -> (client, its cancel event)."""
        self._grants: OrderedDict[tuple[str, str, str], tuple[str, float]] = OrderedDict()
        """Move grants checked in full: (site, request id, signature) -> (who signed, when a piece last used it)."""
        self._scanned: OrderedDict[tuple[str, str], None] = OrderedDict()
        """Stored results (uri, sha256) already scanned for credentials: scanned once, not for every piece."""
        self._running = 0
        self._stats = {
            "requests": 0, "completed": 0, "failed": 0, "rejected": 0, "bytes_out": 0, "bytes_stored": 0,
            "bytes_to_sites": 0, "bytes_from_sites": 0,
        }
        self._closed = False
        self._deadlines = Deadlines(config.name)

    # ------------------------------------------------------------------ frames

    def handle_frame(
        self, frame: bytes | str, reply: Reply, peer: str = "local", identity: str | None = None, from_site: str | None = None
    ) -> None:
        """Decode one frame and answer each of its messages through ``reply``.

        ``peer`` names the connection (its requests are cancelled together when it
        goes away); ``identity`` is the client identity the transport authenticated
        for it, or None where the transport has none; ``from_site`` is the site that
        sent it, where the transport authenticated a site (FLARE's mesh).
        """
        try:
            envelope = Envelope.model_validate_json(frame)
        except ValidationError as exc:
            with self._lock:
                self._stats["rejected"] += 1
            message = f"the frame does not follow the dfm-prefect wire schema v1: {validation_message(exc)}"
            self._safe_reply(reply, ErrorReply(id=guess_id(frame), error=ErrorInfo(code=MalformedRequestError.code, message=self.redactor.text(message, 8192))))
            return
        for message in envelope.messages:
            self.handle_message(message, reply, peer, identity, from_site)

    def handle_message(
        self,
        message: Any,
        reply: Reply,
        peer: str = "local",
        identity: str | None = None,
        from_site: str | None = None,
    ) -> None:
        """Answer one decoded message, acting for the identity that signed it (or the transport's).

        Another site (``from_site``, or a ``site:<name>`` certificate where sites sign)
        may only fetch results it moves for a flow.
        """
        try:
            if from_site is None:
                signed = self.identities.who(message)
                if signed is not None and signed.startswith(SITE_IDENTITY_PREFIX):
                    if not self.site_certificates:
                        raise AuthenticationError(
                            f"the request is signed with a certificate named {signed!r}; here sites are known by the "
                            "transport, and a certificate cannot speak for one",
                            site=self.name,
                        )
                    from_site, identity = signed[len(SITE_IDENTITY_PREFIX) :], None
                else:
                    identity = signed or identity
            if from_site is not None:
                if not isinstance(message, FetchRequest):
                    raise AccessDeniedError(
                        f"site {from_site!r} sent a {message.kind!r} request; another site may only fetch results it "
                        "moves for a flow",
                        site=self.name,
                    )
                self._fetch_for(message, reply, Recipient(site=from_site), peer)
                return
            if isinstance(message, RunRequest):
                self._accept_run(message, reply, peer, identity)
            elif isinstance(message, DescribeRequest):
                self._safe_reply(reply, Described(id=message.id, info=self.describe()))
            elif isinstance(message, StatsRequest):
                self._safe_reply(reply, StatsReply(id=message.id, stats=self.stats()))
            elif isinstance(message, FetchRequest):
                self._fetch_for(message, reply, Recipient(identity=identity), peer)
            elif isinstance(message, CancelRequest):
                self.cancel(message.target, by=identity)
            elif isinstance(message, StreamCredit):
                self._credit(message, identity)
        except Exception as exc:  # a bad request must never stop the site
            log.warning("request %s refused: %s", getattr(message, "id", "?"), self.redactor.text(str(exc)))
            error, request_id = self._error(exc), wire_safe_id(getattr(message, "id", None))
            who = None if isinstance(exc, AuthenticationError) else identity
            self.audit.record("refused", who, request_id, kind=getattr(message, "kind", "?"), error=error.code)
            self._safe_reply(reply, ErrorReply(id=request_id, error=error))

    def _error(self, exc: BaseException) -> ErrorInfo:
        return error_info(exc, self.config.export.error_detail, self.name, self.redactor.text)

    def _safe_reply(self, reply: Reply, message: SiteMessage) -> None:
        """Send one answer, with the site's credentials masked; a peer that is gone is not an error."""
        try:
            reply(self.redactor.message(message))
        except Exception as exc:  # the peer went away; the site keeps serving others
            log.info("could not deliver %s %s: %s", message.kind, getattr(message, "id", "?"), exc)

    def _context(
        self,
        request_id: str,
        cancelled: threading.Event,
        *,
        stopped: Callable[[], FederationError | None] | None = None,
        on_progress: Callable[[float, str], None] | None = None,
        fusion: FusedMember | None = None,
    ) -> SiteContext:
        return SiteContext(
            site=self.name,
            request_id=request_id,
            resolver=self.resolver,
            store=self.store,
            views=self.views,
            opened=self.opened,
            compute=self.compute,
            cancelled=cancelled,
            stopped=stopped,
            user_code=self.config.user_code,
            redact=self.redactor.text if self.redactor.active else None,
            disclosure=self.gate.disclosure,
            on_progress=on_progress,
            fusion=fusion,
        )

    # ---------------------------------------------------------------- control

    def cancel(self, request_id: str, *, by: str | None | bool = False) -> bool:
        """Cancel a queued request (answered as cancelled) or flag a running one.

        ``by`` is the identity asking; a run a signed identity sent is cancelled only
        by that identity (``False``: the site itself, e.g. when a client is gone).
        """
        with self._lock:
            job = self._jobs.get(request_id)
        if job is None:
            return False
        if by is not False and job.identity is not None and by != job.identity:
            raise AccessDeniedError(f"request {request_id!r} was sent by another identity; only its sender may cancel it", site=self.name)
        job.cancelled.set()
        if job.credits is not None:
            job.credits.stop()
        if job.future is not None and job.future.cancel():
            if job.fusion is not None:
                job.fusion.leave()
            with self._lock:
                self._jobs.pop(request_id, None)
            if job.deadline is not None:
                self._deadlines.discard(job.deadline)
            self._answer(job, self._failure(job.request, RequestCancelledError("cancelled before it started", site=self.name), 0.0))
        return True

    def _credit(self, message: StreamCredit, identity: str | None) -> None:
        """Let a stream send more items; only the identity that asked for the stream may."""
        with self._lock:
            job = self._jobs.get(message.target)
        if job is None or job.credits is None:
            return  # the stream ended (or never was): nothing to allow
        if job.identity is not None and identity != job.identity:
            raise AccessDeniedError(f"request {message.target!r} was sent by another identity; only its sender may take its items", site=self.name)
        job.credits.grant(message.upto)

    def cancel_peer(self, peer: str) -> int:
        """Cancel everything a client sent (it disconnected); return how many requests."""
        with self._lock:
            targets = [rid for rid, job in self._jobs.items() if job.peer == peer]
            for owner, event in self._materializing.values():
                if owner == peer:
                    event.set()
        for request_id in targets:
            self.cancel(request_id)
        return len(targets)

    def load(self) -> SiteLoad:
        with self._lock:
            return SiteLoad(
                running=self._running,
                queued=len(self._jobs) - self._running,
                capacity=self.config.limits.concurrency,
            )

    def describe(self) -> SiteInfo:
        """What this site offers: operations with parameter schemas, sources, export policy, load."""
        return site_info(
            self.name, self.operations, self.catalog.entries(), self.config.export, self.load(), self.compute.name, self.config.imports
        )

    def stats(self) -> SiteStats:
        with self._lock:
            counters = dict(self._stats)
        return SiteStats(**counters, load=self.load(), store=self.store.usage())

    def close(self) -> None:
        """Stop taking work, cancel what is queued, wait for what runs."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._deadlines.close()
        self.compute.close()
        self.audit.close()
