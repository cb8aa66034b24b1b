"""The mesh job's own messages: client <-> controller (app commands), controller <-> sites (aux).

Every message is a frozen pydantic model that travels as a JSON-able dict: app
commands carry JSON only, and aux Shareables carry the same dicts under one key
(FOBS serializes dicts, lists and strings natively). Our wire frames
(:class:`~dfm_prefect.core.wire.Envelope` / :class:`~dfm_prefect.core.wire.ReplyEnvelope`
JSON) ride inside as opaque strings: the controller routes frames and never
decodes them.

Flow of one request::

    client --dfm.exchange{frames}--> controller --aux dfm.dispatch--> site (acks at once)
    site --aux dfm.reply{chunk}--> controller mailbox --dfm.exchange{pieces}--> client

Between sites (a move: ``hub`` fetches from ``north``)::

    hub --aux dfm.peer{frame for north}--> controller --dfm.dispatch{frame, from_site=hub}--> north
    north --aux dfm.reply{chunk for site:hub}--> controller --dfm.dispatch{replies}--> hub
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dfm_prefect.core.wire import SiteLoad

KEY = "dfm"
"""The Shareable key that holds a message."""

SITE_CONFIG_ENV = "DFM_SITE_CONFIG"
"""Set in a site's FLARE client environment to the path of the site's YAML config."""

DEFAULT_JOB_NAME = "dfm-mesh"
STAY_TASK = "dfm_stay"
"""The one task on FLARE's task channel: it only keeps the site job processes alive."""

# server -> site (aux)
TOPIC_DISPATCH = "dfm.dispatch"
# site -> server (aux)
TOPIC_HELLO = "dfm.hello"
TOPIC_HEARTBEAT = "dfm.heartbeat"
TOPIC_REPLY = "dfm.reply"
TOPIC_PEER = "dfm.peer"
"""A site's own frame for another site (the fetches of a move); the controller says who sent it."""
# outside client -> server job (admin app commands)
CMD_EXCHANGE = "dfm.exchange"
CMD_STATUS = "dfm.status"

MAX_WAIT = 10.0
"""Longest long-poll a command may ask for (the admin path is serialized; keep it short)."""
MAX_CHUNK_CHARS = 16 << 20
"""Largest piece of a reply frame the controller takes in one aux message."""
MAX_FRAME_PIECES = 4096
"""Pieces of one reply frame at most (a frame of 4 GiB in 1 MiB pieces)."""
PIECE_OVERHEAD = 256
"""What every buffered piece costs on top of its data and frame id, so that empty pieces are not free."""


def piece_cost(frame: str, data: str) -> int:
    """The bytes a buffered piece is charged against quotas."""
    return len(data) + len(frame) + PIECE_OVERHEAD


def peer_of(mailbox: str) -> str:
    """The id sites see for the client whose mailbox secret is ``mailbox`` (one-way: it does not reveal the secret).

    A client reaches its mailbox only with the secret (``ExchangeRequest.mailbox``);
    frames go to sites, and replies come back, under this id. A site that knows
    the id cannot read the client's replies or cancel its work.
    """
    return hashlib.sha256(b"dfm-mailbox:" + mailbox.encode()).hexdigest()[:32]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ------------------------------------------------------------------ site state


SiteStateName = Literal["starting", "ready", "dead"]


class SiteState(_Model):
    """A site as the controller of one mesh job sees it."""

    state: SiteStateName
    incarnation: str | None = Field(default=None, description="Id of the site's job process; a new one means a restart.")
    reason: str | None = Field(default=None, description="Why the site is dead (or what failed at start).")
    load: SiteLoad = SiteLoad()
    pid: int | None = None
    seen_s: float | None = Field(default=None, description="Seconds since the site was last heard from.")
    rejected: dict[str, int] = Field(
        default_factory=dict,
        description="Messages from this site (as FLARE authenticated it) that the controller dropped, by reason.",
    )


# ------------------------------------------------------------ app commands


def describe_rejections(rejected: dict[str, int]) -> str:
    """``3 refused (spoke for another site: 2, ...)``; empty when nothing was refused."""
    if not rejected:
        return ""
    listed = ", ".join(f"{why}: {count}" for why, count in sorted(rejected.items()))
    return f"{sum(rejected.values())} refused ({listed})"


class ClientFrame(_Model):
    """One wire frame (Envelope JSON) for one site."""

    id: str = Field(min_length=1, max_length=64, description="Unique per frame; resending the same id is a no-op.")
    site: str = Field(min_length=1, max_length=64)
    data: str


class ExchangeRequest(_Model):
    """Send frames, acknowledge received pieces, and wait briefly for new ones, in one round trip."""

    mailbox: str = Field(
        min_length=32,
        max_length=128,
        description="A secret only this client and the controller know: it opens the client's mailbox. Sites see "
        "only peer_of(mailbox); FLARE does not tell the job which admin user sent a command, so the secret is the key.",
    )
    ack: int = Field(default=0, ge=0, description="Highest piece seq the client has processed.")
    wait: float = Field(default=0.0, ge=0.0, le=MAX_WAIT)
    max_bytes: int = Field(default=8 << 20, ge=1 << 10)
    frames: list[ClientFrame] = Field(default_factory=list, max_length=100_000)
    awaiting: int = Field(
        default=0,
        ge=0,
        description="Requests the client waits answers for, these frames' included. While it is above 0 the "
        "client keeps exchanging, and a silence longer than the mesh job's client_timeout means it is gone.",
    )
    closing: bool = Field(default=False, description="The client is leaving: drop its mailbox, cancel its work.")


class Piece(_Model):
    """One chunk of a reply frame (ReplyEnvelope JSON) in a client's mailbox."""

    seq: int
    site: str
    frame: str
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    data: str


class ExchangeReply(_Model):
    pieces: list[Piece] = Field(default_factory=list)
    more: bool = Field(default=False, description="More pieces are waiting; exchange again at once.")
    sites: dict[str, SiteState] = Field(default_factory=dict)
    rejected: dict[str, str] = Field(default_factory=dict, description="site -> why its frames were not queued.")
    expired: str | None = Field(
        default=None,
        description="The controller had declared this client gone, and why: the requests it sent before this "
        "exchange were cancelled at the sites and will not be answered.",
    )


class StatusRequest(_Model):
    wait_ready: list[str] = Field(default_factory=list, max_length=1000, description="Wait until these sites are ready ...")
    wait: float = Field(default=0.0, ge=0.0, le=MAX_WAIT, description="... for at most this long.")


class StatusReply(_Model):
    sites: dict[str, SiteState]
    clients: int = Field(description="Client mailboxes open in the controller.")
    buffered_bytes: int
    uptime_s: float
    counters: dict[str, int] = Field(default_factory=dict, description="Exchanges, frames, dispatches, reply chunks so far.")
    rejected_senders: dict[str, int] = Field(
        default_factory=dict, description="Messages from senders that are not sites of this job, by reason."
    )


class CommandError(_Model):
    """What an app command returns when its input was not understood."""

    error: str


# -------------------------------------------------------------------- aux


class Hello(_Model):
    """A site's job process announces itself: ready, or unable to serve (``error``)."""

    site: str
    incarnation: str
    pid: int
    capacity: int = 1
    error: str | None = None


class Heartbeat(_Model):
    site: str
    incarnation: str
    load: SiteLoad = SiteLoad()


class HeartbeatAck(_Model):
    known: bool = Field(description="False: the controller lost track of this site; say hello again.")
    dead_sites: list[str] = Field(default_factory=list, description="Sites of the job that are dead now (fail what waits for them).")


SITE_PEER_PREFIX = "site:"
"""The peer id under which a site's own frames reach another site (and that site's replies come back)."""


class PeerFrame(_Model):
    peer: str
    data: str
    from_site: str | None = Field(
        default=None, description="Set by the controller only: the site that sent this frame, as FLARE authenticated it."
    )


class SiteFrame(_Model):
    """A site's own frame for another site, site -> controller."""

    site: str
    incarnation: str
    target: str = Field(min_length=1, max_length=64)
    id: str = Field(min_length=1, max_length=64)
    data: str = Field(max_length=MAX_CHUNK_CHARS)


class SiteFrameAck(_Model):
    accepted: bool
    reason: str | None = None


class DispatchBatch(_Model):
    frames: list[PeerFrame] = Field(default_factory=list)
    closed_peers: list[str] = Field(default_factory=list, description="Clients that left: cancel their work.")
    replies: list[Piece] = Field(default_factory=list, description="Pieces of other sites' replies to this site's own frames.")


class DispatchAck(_Model):
    accepted: int
    error: str | None = None


class ReplyChunk(_Model):
    """One chunk of a reply frame, site -> controller."""

    site: str
    incarnation: str
    peer: str
    frame: str = Field(min_length=1, max_length=64)
    index: int = Field(ge=0)
    count: int = Field(ge=1, le=MAX_FRAME_PIECES)
    data: str = Field(max_length=MAX_CHUNK_CHARS)

    @model_validator(mode="after")
    def _a_piece_of_its_frame(self) -> ReplyChunk:
        if self.index >= self.count:
            raise ValueError(f"piece {self.index} of a frame of {self.count} pieces")
        if not self.data and self.count > 1:
            raise ValueError("an empty piece of a frame of several pieces")
        return self


class ReplyAck(_Model):
    accepted: bool
    reason: str | None = Field(default=None, description="Why not.")
    retry: bool = Field(default=True, description="Whether to resend later (a full buffer) or never (a refused chunk).")
