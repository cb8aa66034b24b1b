"""The mesh controller's core, without FLARE: site states, per-site outboxes, client mailboxes.

:class:`~dfm_prefect.transports.flare.mesh.controller.MeshController` is a thin FLARE shell
around one :class:`Router`: its app commands call :meth:`Router.exchange` and
:meth:`Router.status`, its aux handlers call :meth:`Router.hello`,
:meth:`Router.heartbeat` and :meth:`Router.reply`, one dispatcher thread per
site loops on :meth:`Router.next_batch`, and its control flow calls
:meth:`Router.check_liveness`. The router moves frames; it never decodes them.

Every site message comes with its sender, the site FLARE authenticated
(see :mod:`~dfm_prefect.transports.flare.mesh.senders`): a site says hello,
heartbeats and replies only as itself, only from its current job process, and
replies only to clients whose frames were dispatched to it; anything else is
dropped and counted against the sender (:mod:`~dfm_prefect.transports.flare.mesh.sites`).
Only the sites the job was started for exist; a hello from anyone else creates
nothing.

Clients reach their mailbox with a secret (``ExchangeRequest.mailbox``); sites
and dispatches see only ``peer_of(secret)``.

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

from dfm_prefect.core.wire import SiteLoad
from dfm_prefect.transports.flare.mesh.mailbox import Delivery, Mailboxes
from dfm_prefect.transports.flare.mesh.sites import NOT_A_SITE, NOT_ITS_CLIENT, OVER_QUOTA, SiteRecord, admit
from dfm_prefect.transports.flare.protocol import (
    SITE_PEER_PREFIX,
    DispatchBatch,
    ExchangeReply,
    ExchangeRequest,
    Heartbeat,
    Hello,
    PeerFrame,
    Piece,
    ReplyAck,
    ReplyChunk,
    SiteFrame,
    SiteFrameAck,
    SiteState,
    StatusReply,
    StatusRequest,
    peer_of,
    piece_cost,
)

SITE_REPLY_BYTES = 64 << 20
"""Reply bytes that may wait in the controller for one site's own requests (a move); beyond it the answering site resends later."""
SEEN_FRAMES = 100_000
"""How many recent frame ids are remembered to make resent frames no-ops."""


class Router:
    """Routes frames between clients and sites for one mesh job.

    Args:
        sites: the sites of the job (no other site can join it).
        site_timeout: a ready site not heard from for this long is dead.
        mailboxes: where replies wait for their clients.
        max_dispatch_frames: most frames sent to a site in one aux message.
    """

    def __init__(
        self,
        sites: Iterable[str],
        *,
        site_timeout: float = 3.0,
        mailboxes: Mailboxes | None = None,
        max_dispatch_frames: int = 500,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.site_timeout = site_timeout
        self.mailboxes = mailboxes or Mailboxes()
        self.max_dispatch_frames = max_dispatch_frames
        self._clock = clock
        self._started = clock()
        self._cond = threading.Condition()
        self._sites: dict[str, SiteRecord] = {name: SiteRecord(name) for name in sites}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._stopped: str | None = None
        self.counters: Counter[str] = Counter()
        self.rejected_senders: Counter[str] = Counter()

    @property
    def sites(self) -> list[str]:
        with self._cond:
            return list(self._sites)

    # ------------------------------------------------------------ clients

    def exchange(self, request: ExchangeRequest) -> ExchangeReply:
        """Queue the request's frames, then collect the client's replies (see `Mailboxes.collect`)."""
        rejected: dict[str, str] = {}
        expired = None
        client = peer_of(request.mailbox)
        if not request.closing:
            expired = self.mailboxes.begin(client, ack=request.ack, watched=request.awaiting > 0 or bool(request.frames))
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
                site.outbox.append(PeerFrame(peer=client, data=frame.data))
            if request.closing:
                self.counters["clients_left"] += 1
                self._cancel_client_work(client)
            self._cond.notify_all()
        if request.closing:
            self.mailboxes.close(client)
            return ExchangeReply(sites=self.states(), rejected=rejected)
        pieces, more = self.mailboxes.collect(
            client, ack=request.ack, wait=0.0 if rejected or expired else request.wait, max_bytes=request.max_bytes
        )
        return ExchangeReply(pieces=pieces, more=more, sites=self.states(), rejected=rejected, expired=expired)

    def _cancel_client_work(self, client: str) -> None:
        """Drop the client's queued frames and tell every site to cancel the rest (holding the lock)."""
        for site in self._sites.values():
            if any(frame.peer == client for frame in site.outbox):
                site.outbox = deque(frame for frame in site.outbox if frame.peer != client)
            site.closed_peers.append(client)

    def _undeliverable(self, name: str, site: SiteRecord | None) -> str | None:
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
            rejected_senders=dict(self.rejected_senders),
        )

    def states(self) -> dict[str, SiteState]:
        now = self._clock()
        with self._cond:
            return {site.name: site.view(now) for site in self._sites.values()}

    # -------------------------------------------------------------- sites

    def _sender(self, sender: str | None) -> SiteRecord | None:
        """The record of an authenticated sender (holding the lock); None, counted, if it is not a site of this job."""
        site = self._sites.get(sender) if sender is not None else None
        if site is None:
            self.rejected_senders[NOT_A_SITE] += 1
        return site

    def hello(self, hello: Hello, sender: str | None) -> str | None:
        """Site ``sender``'s job process announced itself (ready, or failed to start); why it was refused, if it was."""
        with self._cond:
            site = self._sender(sender)
            if site is None:
                return NOT_A_SITE
            refused = admit(site, hello.site)
            if refused is not None:
                return refused
            if site.incarnation != hello.incarnation:
                site.outbox.clear()  # meant for the previous process; its clients fail those requests
                site.peers.clear()
                site.departed.clear()
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
        return None

    def heartbeat(self, beat: Heartbeat, sender: str | None) -> bool | str:
        """Record a heartbeat; False asks the site to say hello again (it was marked dead); a text: refused, why."""
        with self._cond:
            site = self._sender(sender)
            if site is None:
                return NOT_A_SITE
            refused = admit(site, beat.site, beat.incarnation)
            if refused is not None:
                return refused
            if site.state != "ready":
                return False
            site.last_seen = self._clock()
            site.load = beat.load
            return True

    def reply(self, chunk: ReplyChunk, sender: str | None) -> ReplyAck:
        """Put a reply chunk from site ``sender`` in its client's mailbox, if the site may answer that client."""
        if chunk.peer.startswith(SITE_PEER_PREFIX):
            return self._site_reply(chunk, sender)
        with self._cond:
            self.counters["reply_chunks"] += 1
            site = self._sender(sender)
            refused = NOT_A_SITE if site is None else admit(site, chunk.site, chunk.incarnation)
            if site is not None and refused is None and chunk.peer in site.departed:
                return ReplyAck(accepted=True)  # its client left: nobody will take it
            if site is not None and refused is None and chunk.peer not in site.peers:
                refused = NOT_ITS_CLIENT
                site.rejected[refused] += 1
            if refused is not None:
                return ReplyAck(accepted=False, reason=refused, retry=False)
            assert site is not None
            if site.state == "ready":
                site.last_seen = self._clock()
        delivery = self.mailboxes.deliver(chunk.peer, chunk.site, chunk.frame, chunk.index, chunk.count, chunk.data)
        if delivery is Delivery.FULL:
            with self._cond:
                site.rejected[OVER_QUOTA] += 1
            return ReplyAck(accepted=False, reason="the controller's reply buffer for this site or client is full; resend later")
        return ReplyAck(accepted=True)

    # ------------------------------------------------------- site to site

    def site_frame(self, frame: SiteFrame, sender: str | None) -> SiteFrameAck:
        """Queue a frame site ``sender`` sends to another site of the job, marked with who sent it."""
        with self._cond:
            site = self._sender(sender)
            refused = NOT_A_SITE if site is None else admit(site, frame.site, frame.incarnation)
            if refused is not None:
                return SiteFrameAck(accepted=False, reason=refused)
            assert site is not None
            if frame.target == site.name:
                return SiteFrameAck(accepted=False, reason="a site does not send frames to itself")
            target = self._sites.get(frame.target)
            reason = self._undeliverable(frame.target, target)
            if reason is not None:
                return SiteFrameAck(accepted=False, reason=reason)
            assert target is not None
            self.counters["site_frames"] += 1
            if frame.id not in self._seen:
                self._remember(frame.id)
                target.outbox.append(PeerFrame(peer=SITE_PEER_PREFIX + site.name, data=frame.data, from_site=site.name))
                self._cond.notify_all()
            return SiteFrameAck(accepted=True)

    def _site_reply(self, chunk: ReplyChunk, sender: str | None) -> ReplyAck:
        """A reply chunk for another site's own frame: queued for that site, if the sender served it."""
        with self._cond:
            self.counters["site_reply_chunks"] += 1
            site = self._sender(sender)
            refused = NOT_A_SITE if site is None else admit(site, chunk.site, chunk.incarnation)
            if site is not None and refused is None and chunk.peer not in site.peers:
                refused = NOT_ITS_CLIENT
                site.rejected[refused] += 1
            if refused is not None:
                return ReplyAck(accepted=False, reason=refused, retry=False)
            assert site is not None
            target = self._sites.get(chunk.peer[len(SITE_PEER_PREFIX) :])
            if target is None or target.state != "ready":
                return ReplyAck(accepted=True)  # nobody will take it
            cost = piece_cost(chunk.frame, chunk.data)
            if target.reply_bytes + cost > SITE_REPLY_BYTES and target.replies:
                site.rejected[OVER_QUOTA] += 1
                return ReplyAck(accepted=False, reason="the controller's buffer for that site is full; resend later")
            target.replies.append(Piece(seq=0, site=site.name, frame=chunk.frame, index=chunk.index, count=chunk.count, data=chunk.data))
            target.reply_bytes += cost
            site.last_seen = self._clock()
            self._cond.notify_all()
        return ReplyAck(accepted=True)

    def dead_sites(self) -> list[str]:
        with self._cond:
            return sorted(site.name for site in self._sites.values() if site.state == "dead")

    def next_batch(self, name: str, stop: threading.Event) -> DispatchBatch | None:
        """Block until ``name`` has frames, replies or notices to send; None when stopping."""
        with self._cond:
            site = self._sites[name]
            self._cond.wait_for(lambda: stop.is_set() or site.outbox or site.closed_peers or site.replies)
            if stop.is_set():
                return None
            frames = [site.outbox.popleft() for _ in range(min(len(site.outbox), self.max_dispatch_frames))]
            closed, site.closed_peers = site.closed_peers, []
            replies: list[Piece] = []
            size = 0
            while site.replies and (not replies or size + piece_cost(site.replies[0].frame, site.replies[0].data) <= SITE_REPLY_BYTES // 8):
                piece = site.replies.popleft()
                size += piece_cost(piece.frame, piece.data)
                replies.append(piece)
            site.reply_bytes -= size
            site.serve([frame.peer for frame in frames], closed)
            self.counters["dispatches"] += 1
            return DispatchBatch(frames=frames, closed_peers=closed, replies=replies)

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
            site.replies.clear()
            site.reply_bytes = 0
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
