"""Messages between the client and the sites, the same on every transport.

Every message is a frozen pydantic model serialized as JSON. A frame on the wire
is an :class:`Envelope` (client to site) or a :class:`ReplyEnvelope` (site to
client) holding a batch of messages. Bytes travel base64-encoded inside JSON.
Nothing on the wire is ever unpickled, imported or evaluated.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from dfm_prefect.core.errors import error_class
from dfm_prefect.core.identity import RequestSignature
from dfm_prefect.core.refs import DataRef, ResultKind, check_integrity

WIRE_VERSION: Literal[1] = 1
MAX_BATCH = 10_000
"""Most messages one envelope may carry."""
MAX_TIMEOUT_S = 366 * 86400.0
"""The longest ``timeout_s`` a request may give (a year and a day)."""
MAX_WINDOW = 1024
"""Most items of a stream a client may let a site send ahead of what it has taken."""


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ----------------------------------------------------------------- client -> site


class RunRequest(_Message):
    """Run one operation at the site."""

    kind: Literal["run"] = "run"
    id: str = Field(min_length=1, max_length=64)
    op: str = Field(min_length=1, max_length=128)
    version: str | None = Field(default=None, max_length=32)
    params: dict[str, JsonValue] = Field(default_factory=dict)
    flow_run_id: str | None = Field(default=None, max_length=64)
    task_run_id: str | None = Field(default=None, max_length=64)
    attempt: int = Field(default=1, ge=1)
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S)
    window: int | None = Field(
        default=None, ge=1, le=MAX_WINDOW,
        description="For a streaming operation: how many items the site may send before the client grants more (StreamCredit).",
    )
    auth: RequestSignature | None = None


class CancelRequest(_Message):
    """Cancel a request that is queued or running."""

    kind: Literal["cancel"] = "cancel"
    id: str = Field(min_length=1, max_length=64)
    target: str = Field(min_length=1, max_length=64)
    auth: RequestSignature | None = None


class StreamCredit(_Message):
    """Let the site send the items of a stream up to (not including) number ``upto``: the client took the others.

    Credits only grow; the site sends item ``n`` once some credit says ``upto > n``.
    """

    kind: Literal["credit"] = "credit"
    id: str = Field(min_length=1, max_length=64)
    target: str = Field(min_length=1, max_length=64)
    upto: int = Field(ge=0)
    auth: RequestSignature | None = None


class DescribeRequest(_Message):
    """Ask the site what it offers."""

    kind: Literal["describe"] = "describe"
    id: str = Field(min_length=1, max_length=64)
    auth: RequestSignature | None = None


class FetchRequest(_Message):
    """Read a stored result's bytes, one chunk, if the export policy allows it."""

    kind: Literal["fetch"] = "fetch"
    id: str = Field(min_length=1, max_length=64)
    ref: DataRef
    offset: int = Field(default=0, ge=0)
    length: int = Field(default=4 << 20, gt=0, le=64 << 20)
    auth: RequestSignature | None = None
    grant: RunRequest | None = Field(
        default=None,
        description="For a fetch by another site: the person's signed request that asked that site to move this "
        f"result (a {'`'}dfm.move{'`'} run signed for the fetching site), which the holding site checks.",
    )


class StatsRequest(_Message):
    """Ask for the site's counters."""

    kind: Literal["stats"] = "stats"
    id: str = Field(min_length=1, max_length=64)
    auth: RequestSignature | None = None


ClientMessage = Annotated[
    Union[RunRequest, CancelRequest, StreamCredit, DescribeRequest, FetchRequest, StatsRequest],
    Field(discriminator="kind"),
]


class Envelope(_Message):
    """One frame from the client to a site."""

    v: Literal[1] = WIRE_VERSION
    messages: list[ClientMessage] = Field(max_length=MAX_BATCH)


# ----------------------------------------------------------------- site -> client


class ErrorInfo(_Message):
    """An error as it travels: a stable code and a message for the flow author."""

    code: str = Field(max_length=64)
    message: str = Field(max_length=8192)


class LogLine(_Message):
    """A log line the operation wrote at the site (shared only if policy allows)."""

    level: int
    message: str = Field(max_length=8192)
    time: float


class SiteLoad(_Message):
    """How busy the site is."""

    running: int = 0
    queued: int = 0
    capacity: int = 1


class OperationInfo(_Message):
    """What the site says about one operation it offers."""

    name: str
    version: str
    result_kind: ResultKind
    description: str = ""
    params_schema: dict[str, Any] = Field(default_factory=dict)
    stream: bool = Field(default=False, description="The operation sends many results, each as soon as it is made.")


class SourceInfo(_Message):
    """A data source the site publishes in its catalog."""

    name: str
    url: str
    format: str
    size: int | None = None
    summary: dict[str, Any] = Field(default_factory=dict)


class SiteRule(_Message):
    """What may move between this site and one other site: kinds and bytes per result."""

    kinds: list[ResultKind]
    max_bytes: int


class ExportInfo(_Message):
    """The public part of the site's export policy."""

    kinds: list[ResultKind]
    max_bytes: int
    inline_bytes: int
    share_logs: bool
    sites: dict[str, SiteRule] = Field(default_factory=dict, description="What may move from this site to each other site.")
    imports: dict[str, SiteRule] = Field(default_factory=dict, description="What this site accepts from each other site.")
    min_group_size: int = Field(default=1, description="Smallest group an aggregate that leaves may have.")
    min_subset_size: int = Field(default=1, description="Smallest selection (and smallest left-out part) allowed.")


class SiteInfo(_Message):
    """A site's answer to :class:`DescribeRequest`."""

    name: str
    operations: dict[str, OperationInfo]
    sources: list[SourceInfo]
    export: ExportInfo
    load: SiteLoad
    compute: str = "cpu"
    wire_version: int = WIRE_VERSION


class StoreUsage(_Message):
    """What a site's result store holds now, and the retention limits its administrator set (None: unbounded)."""

    bytes: int = Field(default=0, ge=0)
    results: int = Field(default=0, ge=0)
    max_bytes: int | None = None
    max_bytes_per_client: int | None = None
    max_age_s: float | None = None


class SiteStats(_Message):
    """Counters kept by the site since it started, and its result store's usage (None where the site keeps no ledger)."""

    requests: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    bytes_out: int = Field(default=0, description="Result bytes that left the site for clients.")
    bytes_stored: int = Field(default=0, description="Result bytes written to the store.")
    bytes_to_sites: int = Field(default=0, description="Result bytes that left the site for other sites (moves).")
    bytes_from_sites: int = Field(default=0, description="Result bytes this site received from other sites (moves).")
    load: SiteLoad = SiteLoad()
    store: StoreUsage | None = None


class RunResult(_Message):
    """The outcome of a :class:`RunRequest`."""

    kind: Literal["result"] = "result"
    id: str
    site: str
    ok: bool
    ref: DataRef | None = None
    payload: str | None = Field(default=None, description="base64 of the encoded value, when exported inline.")
    salt: str = Field(default="", max_length=128, pattern=r"^([0-9a-f]{2})*$", description="hex salt of the result's sha256, sent with the payload only.")
    error: ErrorInfo | None = None
    logs: list[LogLine] = Field(default_factory=list)
    duration_s: float = 0.0
    load: SiteLoad = SiteLoad()
    cached: bool = Field(default=False, description="The site answered with the result it stored for the same request before.")
    items: int | None = Field(default=None, ge=0, description="For a streaming operation: how many items it sent (each a StreamItem).")


class StreamItem(_Message):
    """One result of a streaming operation, sent as soon as the site has it (number ``seq``, from 0, in order)."""

    kind: Literal["item"] = "item"
    id: str
    seq: int = Field(ge=0)
    ref: DataRef
    payload: str | None = Field(default=None, description="base64 of the encoded value, when exported inline.")
    salt: str = Field(default="", max_length=128, pattern=r"^([0-9a-f]{2})*$")


class Described(_Message):
    kind: Literal["described"] = "described"
    id: str
    info: SiteInfo


class FetchChunk(_Message):
    kind: Literal["chunk"] = "chunk"
    id: str
    offset: int
    data: str = Field(description="base64 of the bytes from offset.")
    salt: str = Field(default="", max_length=128, pattern=r"^([0-9a-f]{2})*$", description="hex salt of the result's sha256, sent with its bytes.")
    total: int
    eof: bool
    materialized: DataRef | None = Field(
        default=None,
        description="When a view was fetched: the stored result the site materialized it into; the bytes are its bytes "
        "(fetch the rest of them by this reference).",
    )


class StatsReply(_Message):
    kind: Literal["stats"] = "stats"
    id: str
    stats: SiteStats


class ProgressUpdate(_Message):
    """How far a running request has come (sent at most a few times a second)."""

    kind: Literal["progress"] = "progress"
    id: str
    fraction: float = Field(ge=0.0, le=1.0)
    message: str = Field(default="", max_length=512)


class ErrorReply(_Message):
    """A request that failed before it could run (or could not be decoded at all)."""

    kind: Literal["error"] = "error"
    id: str | None
    error: ErrorInfo


SiteMessage = Annotated[
    Union[RunResult, StreamItem, Described, FetchChunk, StatsReply, ProgressUpdate, ErrorReply],
    Field(discriminator="kind"),
]


class ReplyEnvelope(_Message):
    """One frame from a site to the client."""

    v: Literal[1] = WIRE_VERSION
    messages: list[SiteMessage]


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64size(text: str) -> int:
    """The number of bytes a base64 text decodes to."""
    return len(text) * 3 // 4 - text[-2:].count("=")


def b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def unwrap_item(item: StreamItem) -> DataRef:
    """The `DataRef` of a stream's item, with its inline value attached (checked against its sha256)."""
    if item.payload:
        item.ref.attach_payload(check_integrity(item.ref, b64decode(item.payload), item.salt), item.salt)
    return item.ref


def unwrap(reply: RunResult) -> DataRef:
    """The `DataRef` of a successful result (with its inline value attached), or raise its error."""
    if not reply.ok or reply.ref is None:
        error = reply.error
        code, message = (error.code, error.message) if error else ("federation_error", "the site sent no result")
        raise error_class(code)(message, site=reply.site)
    if reply.payload:
        reply.ref.attach_payload(check_integrity(reply.ref, b64decode(reply.payload), reply.salt), reply.salt)
    return reply.ref
