"""The client's view of one mesh job: its acknowledgement cursor, site states and unanswered requests.

Independent of FLARE (it only digests :class:`ExchangeReply` objects), so it is
tested on its own. The FLARE transport keeps one current link and, during a
blue/green switch, the previous job's link until its last answers are in.

A reply is taken only from the site its request went to: a message about a
request that this link sent to another site, or never sent, is dropped and counted in ``dropped`` (site -> reason ->
count). Together with the controller, which lets a site reply only as itself,
a site cannot answer for another.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field

from pydantic import ValidationError

from dfm_prefect.core.errors import MalformedRequestError
from dfm_prefect.core.wire import ClientMessage, ReplyEnvelope, SiteMessage
from dfm_prefect.transports.flare.chunks import Reassembler
from dfm_prefect.transports.flare.protocol import ExchangeReply, SiteState

OTHER_SITES_REQUEST = "about a request sent to another site"
NOT_AWAITED = "about a request it was not sent"
REMEMBER_ROUTES = 100_000
"""How many recent request ids are remembered with the site they went to (cancels get no answer when accepted)."""
SITE_PENDING_BYTES = 256 << 20
"""Bytes of unfinished frames the client holds for one site."""
ANSWERED = ("run", "describe", "fetch", "stats")
"""Message kinds a site answers exactly once (a cancel gets no answer)."""
INTERIM = ("progress", "item")
"""Site message kinds that come before the answer, not as it."""


@dataclass
class Digest:
    """What one exchange reply brought: messages per site, and sites that were lost."""

    messages: list[tuple[str, SiteMessage]] = field(default_factory=list)
    lost: dict[str, str] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)


class JobLink:
    """One mesh job as the client sees it."""

    def __init__(self, job_id: str, submitted: str = "") -> None:
        self.job_id = job_id
        self.submitted = submitted
        self.attached = time.monotonic()
        self.ack = 0
        self.told_ack = 0
        self.told_awaiting = 0
        self.states: dict[str, SiteState] = {}
        self.states_at = 0.0
        """When (monotonic) the states were last taken: they go stale while the pump is idle."""
        self.awaiting: dict[str, str] = {}
        self.last_dead: str | None = None
        self.more = False
        self.bytes_in: Counter[str] = Counter()
        self.dropped: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.pieces = 0
        self.largest_piece = 0
        self._joiners: dict[str, Reassembler] = {}
        """One per site, each with its own budget: one site's unfinished frames never crowd out another's."""
        self._routes: OrderedDict[str, str] = OrderedDict()

    def told(self, ack: int, awaiting: int) -> None:
        """Record what the job last heard from this client: its cursor and how many answers it waited for."""
        self.told_ack, self.told_awaiting = ack, awaiting

    @property
    def behind(self) -> bool:
        """The job's view is stale: pieces not yet acknowledged, or it still thinks answers are awaited."""
        return self.ack > self.told_ack or (self.told_awaiting > 0 and not self.awaiting)

    def ready(self, site: str) -> bool:
        state = self.states.get(site)
        return state is not None and state.state == "ready"

    def why_not_ready(self, site: str) -> str:
        state = self.states.get(site)
        if state is None:
            return f"site is not part of mesh job {self.job_id}"
        if state.state == "starting":
            return f"site's job process in mesh job {self.job_id} has not said hello yet"
        return f"site is dead in mesh job {self.job_id}: {state.reason}"

    def expect(self, site: str, messages: list[ClientMessage]) -> None:
        """Remember where each message went, and those that will be answered."""
        for message in messages:
            self._routes[message.id] = site
            if message.kind in ANSWERED:
                self.awaiting[message.id] = site
        while len(self._routes) > REMEMBER_ROUTES:
            self._routes.popitem(last=False)

    def forget_messages(self, messages: list[ClientMessage]) -> None:
        """Stop waiting for these messages (they were not delivered; they will be sent again)."""
        for message in messages:
            self.awaiting.pop(message.id, None)

    def awaiting_sites(self) -> set[str]:
        return set(self.awaiting.values())

    def forget(self, site: str) -> None:
        """Stop waiting for ``site`` (it was lost; the client fails those requests)."""
        self.awaiting = {rid: s for rid, s in self.awaiting.items() if s != site}
        self._joiners.pop(site, None)

    def set_states(self, states: dict[str, SiteState]) -> dict[str, str]:
        """Take new site states; return sites lost since the last ones (ready before, not now)."""
        lost: dict[str, str] = {}
        for site, new in states.items():
            old = self.states.get(site)
            if new.state == "dead":
                self.last_dead = f"{site}: {new.reason}"
            if old is not None and old.state == "ready":
                if new.state != "ready":
                    lost[site] = f"site is {new.state} in mesh job {self.job_id}: {new.reason}"
                elif new.incarnation != old.incarnation:
                    lost[site] = f"site's job process restarted in mesh job {self.job_id}"
        for site in self.awaiting_sites():
            if site not in lost and (site not in states or states[site].state != "ready"):
                lost[site] = self.why_not_ready(site) if site in self.states else f"site left mesh job {self.job_id}"
        self.states = dict(states)
        self.states_at = time.monotonic()
        return lost

    def _refusal(self, site: str, request_id: str) -> str | None:
        """Why a message from ``site`` about ``request_id`` is not taken (None: it is)."""
        sent_to = self.awaiting.get(request_id) or self._routes.get(request_id)
        if sent_to is None:
            return NOT_AWAITED
        return None if sent_to == site else OTHER_SITES_REQUEST

    def absorb(self, reply: ExchangeReply) -> Digest:
        """Digest one exchange reply (duplicates, already acknowledged, are skipped)."""
        digest = Digest()
        self.more = reply.more
        for piece in reply.pieces:
            if piece.seq <= self.ack:
                continue
            self.ack = piece.seq
            self.pieces += 1
            self.largest_piece = max(self.largest_piece, len(piece.data))
            self.bytes_in[piece.site] += len(piece.data)
            joiner = self._joiners.setdefault(piece.site, Reassembler(max_pending_bytes=SITE_PENDING_BYTES))
            try:
                frame = joiner.add(piece.frame, piece.index, piece.count, piece.data)
            except MalformedRequestError as exc:  # that site's frames only; the others' go on
                joiner.drop()
                digest.unreadable.append(f"site {piece.site} sent pieces that do not make a frame: {exc}")
                continue
            if frame is None:
                continue
            try:
                envelope = ReplyEnvelope.model_validate_json(frame)
            except ValidationError as exc:
                digest.unreadable.append(f"site {piece.site} sent a frame that is not wire v1: {exc.errors()[0]['msg']}")
                continue
            for message in envelope.messages:
                if message.id is not None:
                    refused = self._refusal(piece.site, message.id)
                    if refused is not None:
                        self.dropped[piece.site][refused] += 1
                        continue
                    if message.kind not in INTERIM:
                        self.awaiting.pop(message.id, None)
                digest.messages.append((piece.site, message))
        lost = self.set_states(reply.sites)
        for site, reason in reply.rejected.items():
            lost.setdefault(site, reason)
        digest.lost = lost
        for site in lost:
            self.forget(site)
        return digest
