"""The FLARE transport's pump: one thread that owns the admin session and talks to the mesh job.

Each ``dfm.exchange`` app command carries every frame queued since the last
one, acknowledges the reply pieces already processed and long-polls briefly
for new ones: FLARE serializes admin commands in the server, so one round trip
does all three and the poll stays short (``poll_window``). While nothing is
queued or unanswered the pump blocks on a local condition and makes no FLARE
calls at all.

Site states come with every exchange; a site that dies, restarts or leaves is
reported with ``on_lost`` (the client fails its requests, naming the site). An idle
pump makes no exchange, so a frame for a site that the last states called not ready
first brings them up to date: a site that said hello again meanwhile is served.
When the mesh job itself ends, every site with unanswered requests is lost;
the pump then follows the newest running job of the same name (the
federation's supervisor starts one), holding new frames meanwhile for up to
``rejoin_wait`` seconds, and drains the previous job during a blue/green switch.
An exchange not answered within its long-poll plus ``answer_timeout`` seconds
makes the pump ask for the job's status; if the FLARE server itself cannot be
reached, every unanswered request fails with an error naming the federation
server, and new frames wait (up to ``rejoin_wait``) for it and a mesh job to
be back.

Each exchange says how many answers the client still waits for. The mesh job
declares a client that waits for answers but stops exchanging gone and cancels
its work at the sites (``client_timeout``), so the pump keeps exchanging while
anything is unanswered, and tells the job with one last exchange when nothing
is. If the job had declared this client gone (a frozen process), the exchange
says so and the requests sent before it fail at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dfm_prefect.core.errors import FederationError
from dfm_prefect.core.wire import ClientMessage, ErrorInfo, ErrorReply, SiteMessage
from dfm_prefect.transports.flare import admin
from dfm_prefect.transports.flare.link import JobLink
from dfm_prefect.transports.flare.protocol import ClientFrame, ExchangeReply, ExchangeRequest

log = logging.getLogger("dfm_prefect.transport.flare")
HOLD_POLL = 0.5
"""Seconds between looks for a new mesh job or a site's hello while frames are held."""
SETTLE_S = 10.0
"""A new mesh job whose sites are still starting is used anyway after this long."""
UNANSWERED_S = 10.0
"""A running mesh job that does not answer for this long is treated as gone."""
SILENT_S = 1.0
"""A site silent this much longer than the others when its mesh job ended is named as the likely cause."""
FRESH_S = 0.5
"""Site states older than this are asked for again before a frame is failed because its site is not ready."""


@dataclass(frozen=True)
class Outgoing:
    """One frame waiting to go to a site, with the messages it carries."""

    site: str
    frame: ClientFrame
    messages: list[ClientMessage]


@dataclass(frozen=True)
class PumpSettings:
    job_name: str
    poll_window: float
    rejoin_wait: float
    max_exchange_bytes: int
    answer_timeout: float = 10.0
    server: str = "FLARE server"
    """How errors name the federation server (with its admin address)."""


class MeshPump:
    """Moves frames between one client and the mesh job, following the job when it is replaced."""

    def __init__(
        self,
        session: Any,
        link: JobLink,
        settings: PumpSettings,
        *,
        mailbox: str,
        on_message: Callable[[str, SiteMessage], None],
        on_lost: Callable[[str, str], None],
    ) -> None:
        self.settings = settings
        self._mailbox = mailbox
        self.exchanges = 0
        self.switches: list[str] = []
        self._session = session
        self._on_message = on_message
        self._on_lost = on_lost
        self._cond = threading.Condition()
        self._outbox: list[Outgoing] = []
        self._link: JobLink | None = link
        self._draining: list[JobLink] = []
        self._gone_since: float | None = None
        self._next_lookup = 0.0
        self._candidate: JobLink | None = None
        self._unreachable_since: float | None = None
        self._server_down: str | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dfm-flare-pump", daemon=True)

    @property
    def link(self) -> JobLink | None:
        return self._link

    @property
    def links(self) -> list[JobLink]:
        return [link for link in [self._link, *self._draining] if link is not None]

    def start(self) -> None:
        self._thread.start()

    def put(self, outs: list[Outgoing]) -> bool:
        """Queue frames; False if the pump is stopping."""
        with self._cond:
            if self._stopping:
                return False
            self._outbox.extend(outs)
            self._cond.notify()
            return True

    def stop(self, timeout: float) -> None:
        """Stop the thread, then tell every job this client is leaving."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for link in self.links:
            self._say_goodbye(link)

    def _attach(self, job: admin.MeshJob) -> JobLink:
        link = JobLink(job.id, job.submitted)
        link.set_states(admin.status(self._session, job.id).sites)
        return link

    def _busy(self) -> bool:
        return bool(self._outbox or any(link.awaiting or link.more or link.behind for link in self.links))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._busy():
                    self._cond.wait()
                if self._stopping:
                    return
                batch, self._outbox = self._take(self._outbox)
                queued = bool(self._outbox)
            try:
                self._cycle(batch, queued)
            except Exception as exc:  # the pump must survive anything: fail what it carried, keep serving
                log.exception("FLARE pump cycle failed")
                for site in sorted({out.site for out in batch}):
                    self._lose(None, site, f"the FLARE transport failed: {type(exc).__name__}: {exc}")

    def _take(self, outbox: list[Outgoing]) -> tuple[list[Outgoing], list[Outgoing]]:
        size = 0
        for i, out in enumerate(outbox):
            size += len(out.frame.data)
            if i and size > self.settings.max_exchange_bytes:
                return outbox[:i], outbox[i:]
        return outbox, []

    def _cycle(self, batch: list[Outgoing], queued: bool) -> None:
        """Route the batch, then run one exchange per job that has something to send or to collect."""
        link = self._link
        needy = {out.site for out in batch if link is None or not link.ready(out.site)}
        if needy and link is not None and time.monotonic() - link.states_at > FRESH_S:
            # The states are as old as the last exchange (none while idle): a site that was
            # dead may have said hello since, so ask before failing its frames.
            self._exchange(link, [], 0.0)
            link = self._link
            needy = {site for site in needy if link is None or not link.ready(site)}
        if needy or link is None:
            self._look_for_newer_job(needy)
            link = self._link
        deliver: list[Outgoing] = []
        hold: list[Outgoing] = []
        for out in batch:
            if link is not None and link.ready(out.site):
                deliver.append(out)
            elif self._worth_waiting(out.site):
                hold.append(out)
            else:
                reason = link.why_not_ready(out.site) if link is not None else self._no_job_reason()
                self._lose(link, out.site, reason)
        self._requeue(hold)
        # A long-poll returns early when a site says hello, so held frames go out as soon as they can.
        awaiting = bool(deliver or (link is not None and link.awaiting))
        wait = HOLD_POLL if hold else 0.0 if queued or not awaiting else self.settings.poll_window
        active = link is not None and bool(deliver or hold or link.awaiting or link.more or link.behind)
        for old in list(self._draining):
            self._exchange(old, [], 0.0 if active else wait)
        if link is not None and (active or not self._draining):
            self._exchange(link, deliver, wait)
        elif hold:
            with self._cond:  # no mesh job yet, and no event announces one: look again shortly
                self._cond.wait_for(lambda: self._stopping, timeout=HOLD_POLL)

    def _worth_waiting(self, site: str) -> bool:
        """Hold a frame while its site's job process starts or the mesh job is replaced (up to ``rejoin_wait``)."""
        now = time.monotonic()
        if self._link is None:
            return now - (self._gone_since or now) < self.settings.rejoin_wait
        for link in (self._link, self._candidate):
            state = link.states.get(site) if link is not None else None
            if link is not None and state is not None and state.state == "starting" and now - link.attached < self.settings.rejoin_wait:
                return True
        return False

    def _no_job_reason(self) -> str:
        waited = time.monotonic() - (self._gone_since or time.monotonic())
        if self._server_down is not None:
            return f"the federation server ({self.settings.server}) cannot be reached (waited {waited:.0f}s for it): {self._server_down}"
        return f"no mesh job named {self.settings.job_name!r} is running (waited {waited:.0f}s for one)"

    def _exchange(self, link: JobLink, deliver: list[Outgoing], wait: float) -> None:
        before = dict(link.awaiting)
        for out in deliver:
            link.expect(out.site, out.messages)
        request = ExchangeRequest(
            mailbox=self._mailbox,
            ack=link.ack,
            wait=wait,
            max_bytes=self.settings.max_exchange_bytes,
            frames=[out.frame for out in deliver],
            awaiting=len(link.awaiting),
        )
        started = time.perf_counter()
        try:
            reply = admin.exchange(self._session, link.job_id, request, timeout=wait + self.settings.answer_timeout)
        except admin.MeshJobGoneError as exc:
            self._job_gone(link, str(exc), requeue=deliver)
            return
        except admin.AdminUnreachableError as exc:
            now = time.monotonic()
            self._unreachable_since = self._unreachable_since or now
            try:
                status = admin.job_state(self._session, link.job_id)
            except admin.AdminUnreachableError as down:
                self._server_down = str(down)
                cause = f"the federation server ({self.settings.server}) cannot be reached: {exc}"
                self._job_gone(link, cause, requeue=[], server=True)
                return
            if status != "RUNNING" or now - self._unreachable_since > UNANSWERED_S:
                self._job_gone(link, f"{exc}; job status {status}", requeue=[])
                return
            log.info("exchange with mesh job %s failed, retrying: %s", link.job_id, exc)
            for out in deliver:
                link.forget_messages(out.messages)
            self._requeue(deliver)  # same frame ids: the controller ignores ones it already queued
            with self._cond:  # the job's server process is busy or going away: give it a moment
                self._cond.wait_for(lambda: self._stopping, timeout=HOLD_POLL / 2)
            return
        except FederationError as exc:
            for site in sorted({out.site for out in deliver}):
                self._lose(link, site, str(exc))
            return
        self.exchanges += 1
        self._unreachable_since = None
        self._server_down = None
        link.told(request.ack, request.awaiting)
        if reply.expired is not None:
            self._expired(link, before, reply)
        digest = link.absorb(reply)
        log.debug(
            "exchange with %s: %d frames out, %d pieces in, %d awaiting, %.1f ms",
            link.job_id[:8], len(deliver), len(reply.pieces), len(link.awaiting), (time.perf_counter() - started) * 1e3,
        )
        for site, message in digest.messages:
            self._on_message(site, message)
        for problem in digest.unreadable:
            log.error("%s", problem)
        for site, reason in digest.lost.items():
            self._lose(None, site, reason)
        if link is not self._link and not link.awaiting and link in self._draining:
            self._draining.remove(link)
            self._say_goodbye(link)

    def _expired(self, link: JobLink, before: dict[str, str], reply: ExchangeReply) -> None:
        """The job had declared this client gone: what it sent before this exchange was cancelled."""
        log.warning("mesh job %s had declared this client gone (%s); failing %d requests", link.job_id, reply.expired, len(before))
        reason = (
            f"the mesh job {link.job_id} declared this client gone ({reply.expired}) and cancelled its requests; "
            "is the client process being paused or starved?"
        )
        for request_id, site in before.items():
            if link.awaiting.pop(request_id, None) is not None:
                self._on_message(site, ErrorReply(id=request_id, error=ErrorInfo(code="site_unavailable", message=reason)))

    def _requeue(self, outs: list[Outgoing]) -> None:
        if outs:
            with self._cond:
                self._outbox[:0] = outs
                self._cond.notify()

    def _lose(self, link: JobLink | None, site: str, reason: str) -> None:
        if link is not None:
            link.forget(site)
        self._on_lost(site, reason)

    def _job_gone(self, link: JobLink, reason: str, *, requeue: list[Outgoing], server: bool = False) -> None:
        """The job is lost: fail what was unanswered there; ``server``: because the server is unreachable."""
        self._unreachable_since = None
        if server:  # the server's loss explains everything; site states from before it are stale
            cause = f"{reason}; the requests in flight through mesh job {link.job_id} are lost"
        else:
            cause = f"mesh job {link.job_id} ended ({reason})"
            seen = {site: state.seen_s for site, state in link.states.items() if state.seen_s is not None}
            freshest = min(seen.values(), default=0.0)
            silent = sorted(site for site, age in seen.items() if age > freshest + SILENT_S)
            if link.last_dead:
                cause += f"; last site failure: {link.last_dead}"
            elif silent:
                cause += f"; {', '.join(silent)} had stopped sending heartbeats before it ended"
        log.warning("%s", cause)
        for out in requeue:
            link.forget_messages(out.messages)
        for site in sorted(link.awaiting_sites()):
            self._lose(link, site, cause)
        if link is self._link:
            self._link = None
            self._gone_since = time.monotonic()
        elif link in self._draining:
            self._draining.remove(link)
        self._requeue(requeue)

    def _look_for_newer_job(self, needy: set[str]) -> None:
        """Switch to a newer running mesh job if the current one is gone or lacks a needed site."""
        now = time.monotonic()
        if now < self._next_lookup:
            return
        self._next_lookup = now + 0.5
        current = self._link
        try:
            candidates = admin.mesh_jobs(self._session, self.settings.job_name)
        except Exception as exc:  # the server may be restarting: the same as "no job yet"
            log.warning("cannot list mesh jobs: %s", exc)
            if isinstance(exc, admin.AdminUnreachableError):
                self._server_down = str(exc)
            return
        self._server_down = None
        newest = candidates[0] if candidates else None
        if newest is None or (current is not None and (newest.id == current.job_id or newest.submitted <= current.submitted)):
            self._candidate = None
            return
        try:
            fresh = self._attach(newest)
        except FederationError as exc:
            log.info("mesh job %s does not answer yet: %s", newest.id, exc)
            return
        if self._candidate is not None and self._candidate.job_id == fresh.job_id:
            fresh.attached = self._candidate.attached
        ready = {site for site, state in fresh.states.items() if state.state == "ready"}
        starting = {site for site, state in fresh.states.items() if state.state == "starting"}
        settled = not starting or now - fresh.attached > SETTLE_S
        if (current is None and ready and settled) or (needy and needy <= ready):
            self._switch(fresh)
        else:
            self._candidate = fresh

    def _switch(self, fresh: JobLink) -> None:
        old = self._link
        if old is not None and old.awaiting:
            self._draining.append(old)
        elif old is not None:
            self._say_goodbye(old)
        self._link = fresh
        self._candidate = None
        self._gone_since = None
        self.switches.append(fresh.job_id)
        log.warning("now using mesh job %s (was %s)", fresh.job_id, old.job_id if old else "none")

    def _say_goodbye(self, link: JobLink) -> None:
        try:
            admin.exchange(self._session, link.job_id, ExchangeRequest(mailbox=self._mailbox, closing=True))
        except FederationError:
            pass  # the job is gone already: nothing to tidy up there
