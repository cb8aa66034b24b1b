"""The mesh controller's core, without FLARE: site states, per-site outboxes, client mailboxes.

:class:`~dfm_prefect.transports.flare.mesh.controller.MeshController` is a thin FLARE shell
around one :class:`Router`: its app commands call :meth:`Router.exchange` and
:meth:`Router.status`, its aux handlers call :meth:`Router.hello`,
:meth:`Router.heartbeat` and :meth:`Router.reply`, one dispatcher thread per
site loops on :meth:`Router.next_batch`, and its control flow calls
:meth:`Router.check_liveness`. The router moves frames; it never decodes them.

A site is ``starting`` until its job process says hello, ``ready`` while it
sends heartbeats, and ``dead`` (with a reason) when heartbeats stop, a dispatch
fails, FLARE reports it gone, or it could not start. Frames for a site that is
not ready are refused at once (``rejected``) and frames still queued for a site
that dies are dropped; clients learn both from the site states every exchange
returns and fail their requests on that site.

A client that leaves (``closing``) or is declared gone by its mailbox (it
waited for answers but stopped exchanging, see
:class:`~dfm_prefect.transports.flare.mesh.mailbox.Mailboxes`) has its frames that are still
queued dropped, and every site is told in its next dispatch to cancel the rest
of its work (``closed_peers``, handled before that dispatch's frames).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dfm_prefect.core.wire import SiteLoad
from dfm_prefect.transports.flare.mesh.mailbox import Mailboxes
from dfm_prefect.transports.flare.protocol import (
    DispatchBatch,
    ExchangeReply,
    ExchangeRequest,
    Heartbeat,
    Hello,
    PeerFrame,
    ReplyAck,
    ReplyChunk,
    SiteState,
    SiteStateName,
    StatusReply,
    StatusRequest,
)

SEEN_FRAMES = 100_000
"""How many recent frame ids are remembered to make resent frames no-ops."""


@dataclass
class _Site:
    name: str
    state: SiteStateName = "starting"
    incarnation: str | None = None
    reason: str | None = None
    load: SiteLoad = field(default_factory=SiteLoad)
    pid: int | None = None
    last_seen: float | None = None
    outbox: deque[PeerFrame] = field(default_factory=deque)
    closed_peers: list[str] = field(default_factory=list)


class Router:
    """Routes frames between clients and sites for one mesh job.

    Args:
        sites: the sites of the job (more may join by saying hello).
        site_timeout: a ready site not heard from for this long is dead.
        mailboxes: where replies wait for their clients.
        max_dispatch_frames: most frames sent to a site in one aux message.
        on_new_site: called (outside the lock) with a site name first seen by hello.
    """

    def __init__(
        self,
        sites: Iterable[str],
        *,
        site_timeout: float = 3.0,
        mailboxes: Mailboxes | None = None,
        max_dispatch_frames: int = 500,
        on_new_site: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.site_timeout = site_timeout
        self.mailboxes = mailboxes or Mailboxes()
        self.max_dispatch_frames = max_dispatch_frames
        self._on_new_site = on_new_site
        self._clock = clock
        self._started = clock()
        self._cond = threading.Condition()
        self._sites: dict[str, _Site] = {name: _Site(name) for name in sites}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._stopped: str | None = None
        self.counters: Counter[str] = Counter()

    @property
    def sites(self) -> list[str]:
        with self._cond:
            return list(self._sites)

    # ------------------------------------------------------------ clients

    def exchange(self, request: ExchangeRequest) -> ExchangeReply:
        """Queue the request's frames, then collect the client's replies (see `Mailboxes.collect`)."""
        rejected: dict[str, str] = {}
        expired = None
        if not request.closing:
            expired = self.mailboxes.begin(request.client, ack=request.ack, watched=request.awaiting > 0 or bool(request.frames))
        with self._cond:
            self.counters["exchanges"] += 1
            if expired is not None:
                self.counters["clients_returned"] += 1
            self.counters["frames"] += len(request.frames)
            for frame in request.frames:
                if frame.id in self._seen:
                    continue
                site = self._sites.get(frame.site)
                reason = self._undeliverable(frame.site, site)
                if reason is not None:
                    rejected[frame.site] = reason
                    continue
                assert site is not None
                self._remember(frame.id)
                site.outbox.append(PeerFrame(peer=request.client, data=frame.data))
            if request.closing:
                self.counters["clients_left"] += 1
                self._cancel_client_work(request.client)
            self._cond.notify_all()
        if request.closing:
            self.mailboxes.close(request.client)
            return ExchangeReply(sites=self.states(), rejected=rejected)
        pieces, more = self.mailboxes.collect(
            request.client, ack=request.ack, wait=0.0 if rejected or expired else request.wait, max_bytes=request.max_bytes
        )
        return ExchangeReply(pieces=pieces, more=more, sites=self.states(), rejected=rejected, expired=expired)

    def _cancel_client_work(self, client: str) -> None:
        """Drop the client's queued frames and tell every site to cancel the rest (holding the lock)."""
        for site in self._sites.values():
            if any(frame.peer == client for frame in site.outbox):
                site.outbox = deque(frame for frame in site.outbox if frame.peer != client)
            site.closed_peers.append(client)

    def _undeliverable(self, name: str, site: _Site | None) -> str | None:
        if self._stopped is not None:
            return self._stopped
        if site is None:
            return f"site {name!r} is not part of this mesh job; sites: {sorted(self._sites)}"
        if site.state == "starting":
            return f"site {name!r} has not said hello yet (its job process is starting)"
        if site.state == "dead":
            return f"site {name!r} is dead: {site.reason}"
        return None

    def _remember(self, frame_id: str) -> None:
        self._seen[frame_id] = None
        if len(self._seen) > SEEN_FRAMES:
            self._seen.popitem(last=False)

    def status(self, request: StatusRequest) -> StatusReply:
        """Site states; with ``wait_ready``, first wait (up to ``wait``) until those sites are ready."""
        if request.wait_ready and request.wait > 0:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stopped is not None
                    or all(self._sites.get(n) is not None and self._sites[n].state == "ready" for n in request.wait_ready),
                    timeout=request.wait,
                )
        return StatusReply(
            sites=self.states(),
            clients=self.mailboxes.clients,
            buffered_bytes=self.mailboxes.buffered_bytes,
            uptime_s=self._clock() - self._started,
            counters=dict(self.counters),
        )

    def states(self) -> dict[str, SiteState]:
        now = self._clock()
        with self._cond:
            return {
                site.name: SiteState(
                    state=site.state,
                    incarnation=site.incarnation,
                    reason=site.reason,
                    load=site.load,
                    pid=site.pid,
                    seen_s=None if site.last_seen is None else round(now - site.last_seen, 3),
                )
                for site in self._sites.values()
            }

    # -------------------------------------------------------------- sites

    def hello(self, hello: Hello) -> None:
        """A site's job process announced itself (ready, or failed to start)."""
        with self._cond:
            new = hello.site not in self._sites
            site = self._sites.setdefault(hello.site, _Site(hello.site))
            if site.incarnation != hello.incarnation:
                site.outbox.clear()  # meant for the previous process; its clients fail those requests
            site.incarnation = hello.incarnation
            site.pid = hello.pid
            site.last_seen = self._clock()
            site.load = SiteLoad(capacity=hello.capacity)
            if hello.error:
                site.state, site.reason = "dead", f"could not start: {hello.error}"
            else:
                site.state, site.reason = "ready", None
            self._cond.notify_all()
        self.mailboxes.wake()
        if new and self._on_new_site is not None:
            self._on_new_site(hello.site)

    def heartbeat(self, beat: Heartbeat) -> bool:
        """Record a heartbeat; False asks the site to say hello again (it was marked dead or replaced)."""
        with self._cond:
            site = self._sites.get(beat.site)
            if site is None or site.state != "ready" or site.incarnation != beat.incarnation:
                return False
            site.last_seen = self._clock()
            site.load = beat.load
            return True

    def reply(self, chunk: ReplyChunk) -> ReplyAck:
        """Put a reply chunk in its client's mailbox."""
        with self._cond:
            self.counters["reply_chunks"] += 1
            site = self._sites.get(chunk.site)
            if site is not None and site.incarnation == chunk.incarnation and site.state == "ready":
                site.last_seen = self._clock()
        if self.mailboxes.deliver(chunk.peer, chunk.site, chunk.frame, chunk.index, chunk.count, chunk.data):
            return ReplyAck(accepted=True)
        return ReplyAck(accepted=False, reason="the controller's reply buffer is full; resend later")

    def next_batch(self, name: str, stop: threading.Event) -> DispatchBatch | None:
        """Block until ``name`` has frames or notices to send; None when stopping."""
        with self._cond:
            site = self._sites[name]
            self._cond.wait_for(lambda: stop.is_set() or site.outbox or site.closed_peers)
            if stop.is_set():
                return None
            frames = [site.outbox.popleft() for _ in range(min(len(site.outbox), self.max_dispatch_frames))]
            closed, site.closed_peers = site.closed_peers, []
            self.counters["dispatches"] += 1
            return DispatchBatch(frames=frames, closed_peers=closed)

    def dispatch_failed(self, name: str, reason: str) -> None:
        self.mark_dead(name, f"dispatch failed: {reason}")

    def mark_dead(self, name: str, reason: str) -> bool:
        """Mark a site dead (dropping its queued frames); True if it was not dead already."""
        with self._cond:
            site = self._sites.get(name)
            if site is None or site.state == "dead":
                return False
            site.state, site.reason = "dead", reason
            site.outbox.clear()
            self._cond.notify_all()
        self.mailboxes.wake()
        return True

    def check_liveness(self) -> list[str]:
        """Mark ready sites without a recent heartbeat dead; return them (clients: see `expire_clients`)."""
        now = self._clock()
        with self._cond:
            late = [
                (s.name, now - s.last_seen)
                for s in self._sites.values()
                if s.state == "ready" and s.last_seen is not None and now - s.last_seen > self.site_timeout
            ]
        return [name for name, age in late if self.mark_dead(name, f"no heartbeat for {age:.1f}s")]

    def expire_clients(self) -> list[tuple[str, str]]:
        """Declare gone the clients that stopped exchanging and cancel their work; return them with the reason."""
        gone = self.mailboxes.expire()
        if gone:
            with self._cond:
                for client, _ in gone:
                    self.counters["clients_expired"] += 1
                    self._cancel_client_work(client)
                self._cond.notify_all()
        return gone

    def stop(self, reason: str) -> None:
        """Refuse new frames with ``reason`` and release every waiter."""
        with self._cond:
            self._stopped = reason
            self._cond.notify_all()
        self.mailboxes.stop()
