"""Running requests at a site: accepted within its limits, run once, answered exactly once.

The run side of `site_workers.worker.SiteWorker` (which provides the state
below). A request is accepted if the site holds fewer than ``concurrency +
queue`` requests, joins the group of requests on the same inputs that compute
together (`site_workers.fusion`) when it can start at once, runs in the site's
pool with a `SiteContext` of its own, and is answered once: with its result, or
with the error, timeout or cancellation that ended it. A result is kept as a
view where it may be one, else stored; the export policy decides what of it is
sent. Within a request each source's files are looked at once (`one_look`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dfm_prefect.core.errors import (
    FederationError,
    MalformedRequestError,
    RequestTimeoutError,
    SiteOverloadedError,
)
from dfm_prefect.core.operations import MOVE, MOVE_OPERATION, Operation
from dfm_prefect.core.wire import ErrorInfo, ProgressUpdate, RunRequest, RunResult, SiteLoad, SiteMessage, b64encode
from site_workers import admission
from site_workers.config import SiteConfig
from site_workers.context import SiteContext
from site_workers.deadlines import Deadlines
from site_workers.fetches import Reply
from site_workers.fusion import FusedMember, Fusions, shared_inputs
from site_workers.identities import AuditLog, data_inputs
from site_workers.moves import Mover
from site_workers.policy import ExportGate
from site_workers.redaction import Redactor
from site_workers.result_cache import ResultCache
from site_workers.store import ResultStore
from site_workers.streams import Credits, StreamRun
from site_workers.views import Views, one_look

log = logging.getLogger("dfm_prefect.site")


@dataclass
class Job:
    """One accepted run request, from acceptance to its one answer."""

    request: RunRequest
    peer: str
    identity: str | None
    reply: Reply
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future[None] | None = None
    answered: bool = False
    stop: FederationError | None = None
    """Why the site stopped it (a timeout); None while it may run or when the client cancelled it."""
    deadline: int | None = None
    accepted: float = field(default_factory=time.monotonic)
    credits: Credits | None = None
    """For a streaming operation: how many items the client allows."""
    fusion: FusedMember | None = None
    """Its place in the group of requests of its frame that compute together."""


class RunAnswers:
    """The run side of `site_workers.worker.SiteWorker` (which provides the state below)."""

    name: str
    config: SiteConfig
    operations: dict[str, Operation]
    store: ResultStore
    views: Views
    cache: ResultCache
    fusions: Fusions
    mover: Mover
    gate: ExportGate
    audit: AuditLog
    redactor: Redactor
    _lock: threading.Lock
    _stats: dict[str, int]
    _jobs: dict[str, Job]
    _running: int
    _closed: bool
    _deadlines: Deadlines
    _pool: ThreadPoolExecutor
    _context: Callable[..., SiteContext]
    _safe_reply: Callable[[Reply, SiteMessage], None]
    _error: Callable[[BaseException], ErrorInfo]
    load: Callable[[], SiteLoad]

    def _accept_run(self, request: RunRequest, reply: Reply, peer: str, identity: str | None) -> None:
        with self._lock:
            self._stats["requests"] += 1
        try:
            if request.op == MOVE_OPERATION:
                op, params = MOVE, admission.move_params(request, self.config.limits, self.name)
            else:
                op = admission.operation_for(request, self.operations, self.name)
                admission.check_streaming(op, request, self.name)
                params = admission.validated_params(op, request, self.config.limits, self.views, self.name)
        except FederationError as exc:
            with self._lock:
                self._stats["rejected"] += 1
            self._safe_reply(reply, self._failure(request, exc, 0.0))
            return
        job = Job(request=request, peer=peer, identity=identity, reply=reply)
        if op.stream:
            job.credits = Credits(request.window or 1)
        limits = self.config.limits
        with self._lock:
            if self._closed:
                raise SiteOverloadedError("the site is shutting down", site=self.name)
            held = len(self._jobs)
            # The bound is on everything held: running plus waiting, never more.
            full = held >= limits.queue + limits.concurrency
            if full:
                self._stats["rejected"] += 1
            elif request.id in self._jobs:
                raise MalformedRequestError(f"request id {request.id!r} is already in use", site=self.name)
            else:
                if op is not MOVE and not op.stream and held < limits.concurrency:
                    # It starts at once: it may share its computation with others on the same inputs.
                    job.fusion = self.fusions.join(shared_inputs(op, params))
                self._jobs[request.id] = job
                if request.timeout_s is not None:
                    # Counted from acceptance: time spent queued is part of the client's budget.
                    job.deadline = self._deadlines.add(job.accepted + request.timeout_s, lambda: self._time_out(job))
                job.future = self._pool.submit(self._execute, job, op, params)
        if full:
            # Answered outside the lock: the answer reads the load, which takes the lock.
            overloaded = SiteOverloadedError(
                f"{held} requests are queued or running, this site's limit "
                f"(concurrency {limits.concurrency} + queue {limits.queue}); try again later",
                site=self.name,
            )
            self._safe_reply(reply, self._failure(request, overloaded, 0.0))

    def _execute(self, job: Job, op: Operation, params: Any) -> None:
        request = job.request
        started = time.monotonic()
        with self._lock:
            self._running += 1
        ctx = self._context(
            request.id,
            job.cancelled,
            fusion=job.fusion,
            stopped=lambda: job.stop,
            on_progress=lambda fraction, message: self._safe_reply(
                job.reply, ProgressUpdate(id=request.id, fraction=fraction, message=message)
            ),
        )
        try:
            ctx.check_cancelled()
            if op.stream:  # a stream may follow its sources as they change: it looks at them each time
                message, outcome = self._stream(job, op, params, ctx, started)
            else:
                with one_look():
                    message, outcome = self._result(job, op, params, ctx, started)
        except Exception as exc:
            if not isinstance(exc, FederationError):
                log.warning(
                    "operation %s (request %s) failed: %s: %s", op.name, request.id, type(exc).__name__, self.redactor.text(str(exc))
                )
            with self._lock:
                self._stats["failed"] += 1
            message = self._failure(request, exc, time.monotonic() - started, ctx.logs)
            outcome = {"error": message.error.code if message.error else "?"}
        finally:
            if job.fusion is not None:
                job.fusion.leave()
            with self._lock:
                self._running -= 1
                self._jobs.pop(request.id, None)
            if job.deadline is not None:
                self._deadlines.discard(job.deadline)
        self.audit.record("run", job.identity, request.id, op=op.name, inputs=data_inputs(params), **outcome)
        self._answer(job, message)

    def _result(self, job: Job, op: Operation, params: Any, ctx: SiteContext, started: float) -> tuple[RunResult, dict[str, Any]]:
        """Run an operation (or answer it from the cache) and keep its result; the answer and what the audit log records."""
        request, cached = job.request, False
        if op is MOVE:
            with ctx.capturing_logs():
                ref, payload = self.mover.pull(request, params.ref, ctx, owner=job.identity), None
                ctx.log.info("dfm.move brought %s from site %s in %.2f s", params.ref.op, params.ref.site, time.monotonic() - started)
            with self._lock:
                self._stats["bytes_from_sites"] += ref.size if ref.site == self.name and ref is not params.ref else 0
        else:
            key = self.cache.key(op, params)
            hit = self.cache.get(key, params) if key is not None else None
            if hit is not None:
                ref, payload, cached = hit, None, True
                log.info("%s (request %s) answered from the result cache", op.name, request.id)
            else:
                recipe = self.views.recipe(op, params)
                with ctx.capturing_logs():
                    value = op.run(params, ctx)
                    ctx.log.info("%s ran at site %s in %.2f s", op.name, self.name, time.monotonic() - started)
                ctx.check_cancelled()
                counted = ctx.contributors if op.result_kind == "aggregate" else None
                ref, payload = self.views.keep(value, op, recipe, contributors=counted, owner=job.identity)
                if key is not None:
                    self.cache.put(key, ref)
        inline = self.gate.inline(ref, payload, self.store, job.identity)
        message = RunResult(
            id=request.id,
            site=self.name,
            ok=True,
            ref=self.gate.outgoing(ref, job.identity),
            payload=b64encode(inline) if inline is not None else None,
            salt=self.store.salt(ref) if inline is not None else "",
            logs=ctx.logs if self.config.export.share_logs else [],
            duration_s=time.monotonic() - started,
            load=self.load(),
            cached=cached,
        )
        with self._lock:
            self._stats["completed"] += 1
            self._stats["bytes_stored"] += 0 if ref.is_view or cached else ref.size
            self._stats["bytes_out"] += len(inline or b"")
        outcome: dict[str, Any] = {"kind": ref.kind, "size": ref.size, "sha256": ref.sha256, "bytes_out": len(inline or b"")}
        if ref.is_view:
            outcome["view"] = True
        if cached:
            outcome["cached"] = True
        return message, outcome

    def _stream(self, job: Job, op: Operation, params: Any, ctx: SiteContext, started: float) -> tuple[RunResult, dict[str, Any]]:
        """Run a streaming operation: each item sent as it is made, then an answer that says how many there were."""
        request = job.request
        assert job.credits is not None
        stream = StreamRun(
            request_id=request.id, op=op, params=params, ctx=ctx, credits=job.credits, store=self.store, gate=self.gate,
            identity=job.identity, send=lambda item: self._safe_reply(job.reply, item), stall_s=self.config.limits.reply_stall_s,
            recipe=self.views.recipe(op, params),
        )
        with ctx.capturing_logs():
            try:
                stream.run()
            finally:
                with self._lock:
                    self._stats["bytes_stored"] += stream.bytes_stored
                    self._stats["bytes_out"] += stream.bytes_out
            ctx.log.info("%s sent %d item(s) from site %s in %.2f s", op.name, stream.items, self.name, time.monotonic() - started)
        message = RunResult(
            id=request.id, site=self.name, ok=True, items=stream.items, logs=ctx.logs if self.config.export.share_logs else [],
            duration_s=time.monotonic() - started, load=self.load(),
        )
        with self._lock:
            self._stats["completed"] += 1
        return message, {"kind": op.result_kind, "items": stream.items, "bytes_out": stream.bytes_out}

    def _answer(self, job: Job, message: RunResult) -> None:
        """Send a run's one answer; later ones (an operation that finished after its timeout) are dropped."""
        with self._lock:
            if job.answered:
                return
            job.answered = True
        self._safe_reply(job.reply, message)

    def _time_out(self, job: Job) -> None:
        """A request ran past its ``timeout_s``: stop it at the site and tell the client now.

        An operation that checks for cancellation stops at once; one that does not keeps
        its slot until it returns (the load stays honest), but its answer is dropped.
        """
        timeout = job.request.timeout_s
        job.stop = RequestTimeoutError(
            f"request {job.request.id} ran past its timeout_s of {timeout:g} s and was stopped at the site; "
            "give it a longer timeout_s or make the work smaller",
            site=self.name,
        )
        job.cancelled.set()
        if job.credits is not None:
            job.credits.stop()
        if job.future is not None and job.future.cancel():
            if job.fusion is not None:
                job.fusion.leave()
            with self._lock:
                self._jobs.pop(job.request.id, None)
        self._answer(job, self._failure(job.request, job.stop, time.monotonic() - job.accepted))

    def _failure(self, request: RunRequest, exc: BaseException, duration: float, logs: list[Any] | None = None) -> RunResult:
        return RunResult(
            id=request.id,
            site=self.name,
            ok=False,
            error=self._error(exc),
            logs=(logs or []) if self.config.export.share_logs else [],
            duration_s=duration,
            load=self.load(),
        )
