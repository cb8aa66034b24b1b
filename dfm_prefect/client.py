"""The client core: requests, futures, placement data and byte accounting, for any transport.

One :class:`FederationClient` per federation per process, shared by every flow
run in that process (:func:`get_client`). It owns the transport, matches replies
to requests, fails the requests of a site that is lost, and counts every byte
that comes back from each site.
"""

from __future__ import annotations

import atexit
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from pydantic_core import to_jsonable_python

from dfm_prefect.core.errors import (
    FederationError,
    PlacementError,
    RequestCancelledError,
    ResultIntegrityError,
    SiteUnavailableError,
    error_class,
)
from dfm_prefect.core.framing import BatchingWriter
from dfm_prefect.core.identity import Signer
from dfm_prefect.core.refs import DataRef, check_integrity, set_fetcher
from dfm_prefect.core.wire import (
    CancelRequest,
    ClientMessage,
    Described,
    DescribeRequest,
    ErrorReply,
    FetchChunk,
    FetchRequest,
    ProgressUpdate,
    RunRequest,
    RunResult,
    SiteInfo,
    SiteMessage,
    SiteStats,
    StatsReply,
    StatsRequest,
    StreamCredit,
    StreamItem,
    b64decode,
    b64size,
    unwrap,
)
from dfm_prefect.placement import Placement, place
from dfm_prefect.spec import load_spec, spec_key
from dfm_prefect.streams import DEFAULT_WINDOW, ResultStream
from dfm_prefect.transports import Transport, transport_class

log = logging.getLogger("dfm_prefect.client")
FETCH_CHUNK = 4 << 20


def new_id() -> str:
    return uuid.uuid4().hex


class FederationClient:
    """Sends requests to sites and returns futures of their replies."""

    def __init__(self, transport: Transport, *, describe_timeout: float = 60.0) -> None:
        self.transport = transport
        self.describe_timeout = describe_timeout
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[str, Future[SiteMessage]]] = {}
        self._progress: dict[str, Callable[[ProgressUpdate], None]] = {}
        self._streams: dict[str, ResultStream] = {}
        self._infos: dict[str, SiteInfo] = {}
        self._down: dict[str, str] = {}
        self._inflight: Counter[str] = Counter()
        self.bytes_in: Counter[str] = Counter()
        self._writer: BatchingWriter[tuple[str, ClientMessage]] | None = None
        self._opened = False
        self.signer: Signer | None = transport.signer()
        """Signs every request with this user's certificate, so sites know who asks (None: anonymous)."""

    # ------------------------------------------------------------ lifecycle

    def open(self) -> FederationClient:
        """Connect and learn what every site offers."""
        if self._opened:
            return self
        self.transport.open(self._on_message, self._on_site_lost)
        self._writer = BatchingWriter(self._send_batch, name="dfm-client-writer")
        self._opened = True
        self.refresh()
        return self

    def refresh(self) -> dict[str, SiteInfo]:
        """Ask every site to describe itself; sites that do not answer are marked down."""
        futures = {site: self.request(site, DescribeRequest(id=new_id())) for site in self.transport.sites}
        for site, future in futures.items():
            try:
                reply = future.result(timeout=self.describe_timeout)
            except FederationError as exc:
                self._mark_down(site, str(exc))
                continue
            except TimeoutError:
                self._mark_down(site, f"no answer to describe within {self.describe_timeout}s")
                continue
            assert isinstance(reply, Described)
            with self._lock:
                self._infos[site] = reply.info
                self._down.pop(site, None)
        return self.sites

    def close(self) -> None:
        if not self._opened:
            return
        self._opened = False
        self._fail_pending(None, RequestCancelledError("the federation client was closed"))
        if self._writer is not None:
            self._writer.close()
        self.transport.close()

    def __enter__(self) -> FederationClient:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- state

    @property
    def sites(self) -> dict[str, SiteInfo]:
        """Healthy sites and what they offer."""
        with self._lock:
            return {name: info for name, info in self._infos.items() if name not in self._down}

    @property
    def down(self) -> dict[str, str]:
        """Sites that are currently unreachable, with the reason."""
        with self._lock:
            return dict(self._down)

    def inflight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._inflight)

    def place(self, op: str, *, data: list[object], explicit: str | None = None, exclude: set[str] | frozenset[str] = frozenset()) -> Placement:
        """Choose a site for ``op`` (see :mod:`dfm_prefect.placement`), re-describing down sites first."""
        if self.down:
            self.refresh()
        sites = self.sites
        if not sites:
            raise PlacementError(f"no site is reachable; down: {self.down}")
        links = getattr(getattr(self.transport, "spec", None), "links", None) or {}
        return place(op, data=data, sites=sites, explicit=explicit, inflight=self.inflight(), exclude=exclude, links=links)

    # -------------------------------------------------------------- requests

    @property
    def identity(self) -> str | None:
        """Who this client's requests are signed as (the certificate's common name), if anyone."""
        return self.signer.identity if self.signer is not None else None

    def request(
        self, site: str, message: ClientMessage, *, on_progress: Callable[[ProgressUpdate], None] | None = None
    ) -> Future[SiteMessage]:
        """Send one message to a site, signed; the future holds its reply or the error it carried.

        ``on_progress`` is called (from a transport thread: keep it quick) with each
        progress update the site sends for this request.
        """
        if not self._opened or self._writer is None:
            raise FederationError("the federation client is not open")
        future: Future[SiteMessage] = Future()
        with self._lock:
            self._pending[message.id] = (site, future)
            if on_progress is not None:
                self._progress[message.id] = on_progress
            if isinstance(message, RunRequest):
                self._inflight[site] += 1
        self._writer.put((site, self._sign(message, site)))
        return future

    def stream(
        self,
        site: str,
        op: str,
        params: dict[str, Any],
        *,
        version: str | None = None,
        window: int = DEFAULT_WINDOW,
        timeout_s: float | None = None,
        flow_run_id: str | None = None,
        task_run_id: str | None = None,
    ) -> ResultStream:
        """Run a streaming operation at ``site``; iterate the returned stream for its items as the site makes them.

        The site makes at most ``window`` items ahead of what the caller has taken.
        Close the stream (or use it as a context manager) to stop the operation early.
        """
        request = RunRequest(
            id=new_id(), op=op, version=version, params=to_jsonable_python(params), flow_run_id=flow_run_id, task_run_id=task_run_id,
            timeout_s=timeout_s, window=window,
        )
        done: Future[SiteMessage] = Future()
        stream = ResultStream(
            site, request.id, done, window=window,
            allow=lambda upto: self._send_control(site, StreamCredit(id=new_id(), target=request.id, upto=upto)),
            cancel=lambda: self.cancel(site, request.id),
        )
        with self._lock:
            self._streams[request.id] = stream
        forwarded = self.request(site, request)
        forwarded.add_done_callback(lambda f: _settle(done, f))
        return stream

    def _send_control(self, site: str, message: ClientMessage) -> None:
        if self._writer is not None:
            self._writer.put((site, self._sign(message, site)))

    def _sign(self, message: ClientMessage, site: str) -> ClientMessage:
        return self.signer.sign(message, site) if self.signer is not None else message

    def run(
        self,
        site: str,
        op: str,
        params: dict[str, Any],
        *,
        version: str | None = None,
        flow_run_id: str | None = None,
        task_run_id: str | None = None,
        attempt: int = 1,
        timeout_s: float | None = None,
        on_progress: Callable[[ProgressUpdate], None] | None = None,
    ) -> tuple[str, Future[SiteMessage]]:
        """Run ``op`` at ``site``; return the request id and the future of its `RunResult`.

        ``params`` are JSON values; a `DataRef` among them (an earlier result) is sent as its JSON form.
        """
        request = RunRequest(
            id=new_id(),
            op=op,
            version=version,
            params=to_jsonable_python(params),
            flow_run_id=flow_run_id,
            task_run_id=task_run_id,
            attempt=attempt,
            timeout_s=timeout_s,
        )
        return request.id, self.request(site, request, on_progress=on_progress)

    def call(self, site: str, op: str, params: dict[str, Any], *, version: str | None = None, timeout: float | None = 300.0) -> DataRef:
        """Run ``op`` at ``site`` and wait: the result's `DataRef`, or the site's error raised."""
        _, future = self.run(site, op, params, version=version)
        reply = future.result(timeout=timeout)
        assert isinstance(reply, RunResult)
        return unwrap(reply)

    def cancel(self, site: str, request_id: str) -> None:
        """Ask the site to drop a request and fail its future here at once."""
        with self._lock:
            entry = self._pending.get(request_id)
        if entry is not None:
            self._resolve(request_id, error=RequestCancelledError("cancelled by the client", site=site))
        if self._opened and self._writer is not None:
            self._writer.put((site, self._sign(CancelRequest(id=new_id(), target=request_id), site)))

    def stats(self, site: str, timeout: float = 30.0) -> SiteStats:
        reply = self.request(site, StatsRequest(id=new_id())).result(timeout=timeout)
        assert isinstance(reply, StatsReply)
        return reply.stats

    def fetch_bytes(self, ref: DataRef, timeout: float = 300.0) -> bytes:
        """Stream a stored result from its site in chunks (the site checks its export policy)."""
        return self.fetch_salted(ref, timeout)[0]

    def fetch_salted(self, ref: DataRef, timeout: float = 300.0) -> tuple[bytes, str]:
        """The stored result's bytes and the salt of its digest (sent only with the bytes), checked end to end.

        For a view the site first materializes it and names the stored copy in its
        first chunk; the rest is fetched by, and checked against, that copy.
        """
        parts: list[bytes] = []
        offset, salt, target = 0, "", ref
        while True:
            reply = self.request(target.site, FetchRequest(id=new_id(), ref=target, offset=offset, length=FETCH_CHUNK)).result(
                timeout=timeout
            )
            assert isinstance(reply, FetchChunk)
            if reply.materialized is not None and target is ref and ref.is_view:
                copy = reply.materialized
                if copy.site != ref.site or copy.is_view or (copy.kind, copy.format) != (ref.kind, ref.format):
                    raise ResultIntegrityError(f"site {ref.site!r} answered the fetch of {ref!r} with {copy!r}", site=ref.site)
                target = copy
            data = b64decode(reply.data)
            parts.append(data)
            salt = reply.salt or salt
            offset += len(data)
            if reply.eof or not data:
                break
        return check_integrity(target, b"".join(parts), salt), salt

    # ------------------------------------------------------------- plumbing

    def _send_batch(self, batch: list[tuple[str, ClientMessage]]) -> None:
        by_site: dict[str, list[ClientMessage]] = {}
        for site, message in batch:
            by_site.setdefault(site, []).append(message)
        for site, messages in by_site.items():
            try:
                self.transport.send(site, messages)
            except FederationError as exc:
                error = exc if isinstance(exc, SiteUnavailableError) else SiteUnavailableError(str(exc), site=site)
                for message in messages:
                    self._resolve(message.id, error=error)

    def _on_message(self, site: str, message: SiteMessage) -> None:
        if isinstance(message, RunResult) and message.payload:
            self.bytes_in[site] += b64size(message.payload)
        elif isinstance(message, FetchChunk):
            self.bytes_in[site] += b64size(message.data)
        if isinstance(message, ProgressUpdate):
            with self._lock:
                callback = self._progress.get(message.id) if self._pending.get(message.id, (site,))[0] == site else None
            if callback is not None:
                callback(message)
            return
        if isinstance(message, StreamItem):
            if message.payload:
                self.bytes_in[site] += b64size(message.payload)
            with self._lock:
                stream = self._streams.get(message.id)
            if stream is not None and stream.site == site:
                stream.deliver(message)
            return
        if message.id is not None and not self._sent_to(message.id, site):
            # Only the site a request went to may answer it (a site may learn other requests' ids).
            log.warning("dropped a %s from site %s about a request it was not sent", message.kind, site)
            return
        if isinstance(message, ErrorReply):
            error = error_class(message.error.code)(message.error.message, site=site)
            if message.id is None:
                log.warning("site %s could not read a frame: %s", site, message.error.message)
                return
            self._resolve(message.id, error=error)
            return
        self._resolve(message.id, value=message)

    def _sent_to(self, request_id: str, site: str) -> bool:
        """True unless ``request_id`` is pending at another site (an unknown id is answered by no one: harmless)."""
        with self._lock:
            entry = self._pending.get(request_id)
        return entry is None or entry[0] == site

    def _resolve(self, request_id: str, *, value: SiteMessage | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            entry = self._pending.pop(request_id, None)
            self._progress.pop(request_id, None)
            self._streams.pop(request_id, None)
            if entry is None:
                return
            site, future = entry
            if self._inflight.get(site) and (isinstance(value, RunResult) or error is not None):
                self._inflight[site] -= 1
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def _mark_down(self, site: str, reason: str) -> None:
        with self._lock:
            self._down[site] = reason
        log.warning("site %s is unavailable: %s", site, reason)

    def _on_site_lost(self, site: str, reason: str) -> None:
        self._mark_down(site, reason)
        self._fail_pending(site, SiteUnavailableError(f"site lost while requests were in flight: {reason}", site=site))

    def _fail_pending(self, site: str | None, error: FederationError) -> None:
        with self._lock:
            ids = [rid for rid, (s, _) in self._pending.items() if site is None or s == site]
        for request_id in ids:
            self._resolve(request_id, error=error)


def _settle(target: Future[SiteMessage], source: Future[SiteMessage]) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


# ------------------------------------------------------------ process-wide clients

_clients: dict[str, FederationClient] = {}
_clients_lock = threading.Lock()


def get_client(federation: Any = None) -> FederationClient:
    """The open client for a federation (file, mapping, spec or ``None`` for ``$DFM_FEDERATION``).

    Clients are shared by all flow runs in the process and closed at exit.
    """
    spec = load_spec(federation)
    key = spec_key(spec)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            transport = transport_class(spec.transport).from_spec(spec)  # type: ignore[attr-defined]
            client = FederationClient(transport)
            _clients[key] = client
    return client.open()


class FlowSession(Protocol):
    """What the front end's running flow offers the client core: its client and its byte report."""

    @property
    def client(self) -> FederationClient: ...

    def record_fetch(self, site: str, nbytes: int) -> None: ...


_SESSION_LOOKUP: list[Callable[[], FlowSession | None]] = []


def set_session_lookup(lookup: Callable[[], FlowSession | None]) -> None:
    """Register how to find the running flow's session (the Prefect side does, when it is imported)."""
    _SESSION_LOOKUP[:] = [lookup]


def _current_runner() -> FlowSession | None:
    return _SESSION_LOOKUP[0]() if _SESSION_LOOKUP else None


def note_fetch(site: str, nbytes: int) -> None:
    """Count a fetched value against the running flow's report (if a flow is running)."""
    runner = _current_runner()
    if runner is not None:
        runner.record_fetch(site, nbytes)


def current_client() -> FederationClient:
    """The client of the running flow's `FederationTaskRunner`, else the only open client."""
    runner = _current_runner()
    if runner is not None:
        return runner.client
    with _clients_lock:
        open_clients = [c for c in _clients.values() if c._opened]
    if len(open_clients) == 1:
        return open_clients[0]
    raise FederationError(
        "no federation client is active here; call ref.fetch(client=get_client(federation)) "
        "or fetch inside a flow that uses FederationTaskRunner"
    )


def close_clients() -> None:
    """Close every shared client (done automatically at exit)."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        client.close()


def _fetch(ref: DataRef, client: FederationClient | None) -> tuple[bytes, str]:
    active = client or current_client()
    payload, salt = active.fetch_salted(ref)
    note_fetch(ref.site, len(payload))
    return payload, salt


atexit.register(close_clients)
set_fetcher(_fetch)

