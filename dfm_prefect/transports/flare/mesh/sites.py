"""What the mesh controller knows about each site of its job, and what it refused from it.

A site is known only by the FLARE identity that sent its messages (see
:mod:`~dfm_prefect.transports.flare.mesh.senders`). Each message names a site
and an incarnation (the site's job process); :func:`admit` lets it through only
if it names its own sender, and counts everything else against the sender, by
reason, for ``dfm.status`` and ``dfm-prefect federation status``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from dfm_prefect.core.wire import SiteLoad
from dfm_prefect.transports.flare.protocol import PeerFrame, Piece, SiteState, SiteStateName

SPOKE_FOR_ANOTHER = "spoke for another site"
STALE_INCARNATION = "not its current job process"
NOT_ITS_CLIENT = "reply to a client that sent it nothing"
OVER_QUOTA = "reply over its buffer quota (resent later)"
NOT_A_SITE = "not a site of this mesh job"
REMEMBER_DEPARTED = 1000
"""How many clients that left are remembered per site (their late replies are dropped without a complaint)."""


@dataclass
class SiteRecord:
    """One site of the job: its state, its outbox, and the clients it may answer."""

    name: str
    state: SiteStateName = "starting"
    incarnation: str | None = None
    reason: str | None = None
    load: SiteLoad = field(default_factory=SiteLoad)
    pid: int | None = None
    last_seen: float | None = None
    outbox: deque[PeerFrame] = field(default_factory=deque)
    closed_peers: list[str] = field(default_factory=list)
    peers: set[str] = field(default_factory=set)
    """Clients whose frames were dispatched to the current incarnation: the only ones it may reply to."""
    departed: OrderedDict[str, None] = field(default_factory=OrderedDict)
    """Clients that left after using this site; replies still on their way to them are dropped quietly."""
    rejected: Counter[str] = field(default_factory=Counter)
    replies: deque[Piece] = field(default_factory=deque)
    """Pieces of other sites' replies to this site's own frames (a move), waiting to be dispatched."""
    reply_bytes: int = 0

    def serve(self, peers: list[str], closed: list[str]) -> None:
        """Frames from ``peers`` and notices that ``closed`` left go to the site now."""
        for peer in closed:
            if peer in self.peers:
                self.peers.discard(peer)
                self.departed[peer] = None
        while len(self.departed) > REMEMBER_DEPARTED:
            self.departed.popitem(last=False)
        for peer in peers:  # a client declared gone that came back: its new frames must get answers
            self.departed.pop(peer, None)
        self.peers.update(peers)

    def view(self, now: float) -> SiteState:
        return SiteState(
            state=self.state,
            incarnation=self.incarnation,
            reason=self.reason,
            load=self.load,
            pid=self.pid,
            seen_s=None if self.last_seen is None else round(now - self.last_seen, 3),
            rejected=dict(self.rejected),
        )


def admit(sender: SiteRecord, claimed: str, incarnation: str | None = None) -> str | None:
    """Why a message from ``sender`` naming site ``claimed`` (and ``incarnation``) is refused; None if admitted.

    A refusal is counted against the sender.
    """
    reason = None
    if claimed != sender.name:
        reason = SPOKE_FOR_ANOTHER
    elif incarnation is not None and incarnation != sender.incarnation:
        reason = STALE_INCARNATION
    if reason is not None:
        sender.rejected[reason] += 1
    return reason

