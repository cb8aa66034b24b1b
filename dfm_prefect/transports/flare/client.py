"""FLARE transport, client side: reach the sites through a long-lived NVIDIA FLARE mesh job.

The federation spec names the admin startup kit (an mTLS identity) and the mesh
job; ``dfm-prefect federation up`` writes it::

    {"transport": "flare", "admin_kit": "/srv/kits/admin@example.org",
     "username": "admin@example.org", "job_name": "dfm-mesh", "sites": ["north", "south"]}

One pump thread (:class:`~dfm_prefect.transports.flare.pump.MeshPump`) owns the admin
session: each ``dfm.exchange`` app command sends the queued frames,
acknowledges replies and long-polls briefly; while nothing is due it makes no
FLARE calls. Site losses reach the client through ``on_site_lost``; when the
mesh job is replaced (:mod:`dfm_prefect.transports.flare.deploy.supervisor`) the pump follows it.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import secrets
import tempfile
import threading
import uuid
import weakref
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dfm_prefect.core.errors import ConfigError, SiteUnavailableError
from dfm_prefect.core.identity import Signer
from dfm_prefect.core.wire import ClientMessage, Envelope
from dfm_prefect.transports.base import OnMessage, OnSiteLost, Transport
from dfm_prefect.transports.flare import admin
from dfm_prefect.transports.flare.link import JobLink
from dfm_prefect.transports.flare.protocol import DEFAULT_JOB_NAME, MAX_WAIT, ClientFrame, describe_rejections
from dfm_prefect.transports.flare.pump import MeshPump, Outgoing, PumpSettings
from dfm_prefect.transports.flare.trust import admin_address

_KIT_DIRS: dict[str, str] = {}


def _materialize_kit(files: dict[str, str]) -> str:
    key = json.dumps(sorted(files.items()))
    if key in _KIT_DIRS and Path(_KIT_DIRS[key]).exists():
        return _KIT_DIRS[key]
    root = Path(tempfile.mkdtemp(prefix="dfm-admin-kit-"))
    os.chmod(root, 0o700)
    for relative, content in files.items():
        target = (root / relative).resolve()
        if root.resolve() not in target.parents:
            raise ConfigError(f"admin kit entry {relative!r} points outside the kit")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(content))
        os.chmod(target, 0o600)
    _KIT_DIRS[key] = str(root)
    return str(root)


class FlareSpec(BaseModel):
    """How to reach a federation through its FLARE mesh job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transport: Literal["flare"] = "flare"
    admin_kit: str = Field(description="The admin (or lead) user's startup kit folder, the one holding startup/.")
    username: str = Field(description="The user's name as in its certificate, e.g. admin@example.org.")
    job_name: str = DEFAULT_JOB_NAME
    job_id: str | None = Field(default=None, description="Use this mesh job; default: the newest running one named job_name.")
    sites: list[str] = Field(default_factory=list, description="The federation's sites (default: those of the job).")
    command_timeout: float = Field(default=30.0, gt=MAX_WAIT)
    connect_timeout: float = Field(default=30.0, gt=0)
    poll_window: float = Field(default=0.2, gt=0, le=MAX_WAIT, description="Long-poll of one exchange while answers are due.")
    rejoin_wait: float = Field(default=30.0, ge=0, description="How long to hold requests while no mesh job runs.")
    answer_timeout: float = Field(
        default=10.0,
        gt=0,
        description="An exchange not answered within its long-poll plus this long makes the client check the job "
        "and the server; unanswered requests fail at once if the server cannot be reached.",
    )
    max_exchange_bytes: int = Field(default=8 << 20, ge=1 << 16)
    links: dict[str, float] = Field(
        default_factory=dict,
        description='Relative cost per byte of moving data between two sites, by "from->to" (1.0 where not named); '
        "placement weighs the bytes an operation would move by these.",
    )


class FlareTransport(Transport):
    """Talks to sites through the FLARE mesh job, with admin app commands (see :mod:`dfm_prefect.transports.flare.pump`)."""

    Spec = FlareSpec

    def __init__(self, spec: FlareSpec) -> None:
        self.spec = spec
        # Opens this client's mailbox in the mesh job; sites see only protocol.peer_of(it). Never logged or sent elsewhere.
        self._mailbox = secrets.token_hex(32)
        self._session: Any = None
        self._pump: MeshPump | None = None

    @classmethod
    def from_spec(cls, spec: FlareSpec) -> FlareTransport:
        return cls(spec)

    def signer(self) -> Signer:
        """The admin kit's own certificate and key: every request is signed as that person."""
        startup = admin.admin_kit_folder(self.spec.admin_kit) / "startup"
        return Signer.from_files(startup / "client.crt", startup / "client.key")

    @classmethod
    def portable_spec(cls, spec: FlareSpec) -> dict[str, Any]:
        """The spec with the admin kit's files embedded (relative path -> base64), not its path."""
        kit = Path(spec.admin_kit)
        files = {str(file.relative_to(kit)): base64.b64encode(file.read_bytes()).decode() for file in sorted(kit.rglob("*")) if file.is_file()}
        return {**spec.model_dump(mode="json", exclude={"admin_kit"}), "admin_kit_files": files}

    @classmethod
    def spec_from_portable(cls, data: dict[str, Any]) -> FlareSpec:
        """Write the embedded admin kit to a private folder (once per process) and point the spec at it."""
        data = dict(data)
        files = data.pop("admin_kit_files", None)
        if not isinstance(files, dict):
            raise ConfigError("a portable FLARE spec holds the admin kit's files as 'admin_kit_files'")
        return FlareSpec.model_validate({**data, "admin_kit": _materialize_kit(files)})

    def open(self, on_message: OnMessage, on_site_lost: OnSiteLost) -> None:
        spec = self.spec
        self._session = admin.open_session(spec.admin_kit, spec.username, command_timeout=spec.command_timeout, connect_timeout=spec.connect_timeout)
        try:
            link = self._attach(spec.job_id)
        except BaseException:
            admin.close_session(self._session)
            raise
        host, port = admin_address(spec.admin_kit)
        settings = PumpSettings(
            spec.job_name,
            spec.poll_window,
            spec.rejoin_wait,
            spec.max_exchange_bytes,
            answer_timeout=spec.answer_timeout,
            server=f"FLARE server {host}:{port}",
        )
        self._pump = MeshPump(self._session, link, settings, mailbox=self._mailbox, on_message=on_message, on_lost=on_site_lost)
        self._pump.start()
        _close_at_exit(self)

    def _attach(self, job_id: str | None) -> JobLink:
        job = admin.find_mesh_job(self._session, self.spec.job_name, job_id)
        try:
            states = admin.status(self._session, job.id).sites
        except admin.MeshJobGoneError:
            # A job the server lists as RUNNING but that does not run: after a server restart
            # the job store keeps the job that died with it. Use the newest other one.
            job = admin.find_mesh_job(self._session, self.spec.job_name, None, skip=frozenset({job.id}))
            states = admin.status(self._session, job.id).sites
        link = JobLink(job.id, job.submitted)
        link.set_states(states)
        return link

    @property
    def sites(self) -> list[str]:
        if self.spec.sites:
            return list(self.spec.sites)
        link = self._pump.link if self._pump else None
        return sorted(link.states) if link else []

    def send(self, site: str, messages: Sequence[ClientMessage]) -> None:
        if site not in self.sites:
            raise SiteUnavailableError(f"no site {site!r} in this federation; sites: {self.sites}", site=site)
        outs = [Outgoing(site, ClientFrame(id=uuid.uuid4().hex, site=site, data=data), group) for data, group in _frames(messages)]
        if self._pump is None or not self._pump.put(outs):
            raise SiteUnavailableError("the FLARE transport is not open", site=site)

    def close(self) -> None:
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.stop(self.spec.command_timeout + 5)
        if self._session is not None:
            admin.close_session(self._session)
            self._session = None

    def site_states(self) -> dict[str, str]:
        link = self._pump.link if self._pump else None
        if link is None:
            return {site: "no mesh job is running" for site in self.sites}
        out = {}
        for site in self.sites:
            state = link.states.get(site)
            if state is None:
                out[site] = f"not in mesh job {link.job_id}"
            elif state.state == "ready":
                out[site] = f"ready: mesh job {link.job_id[:8]}, pid {state.pid}, heard {state.seen_s:.1f}s ago"
            else:
                out[site] = f"{state.state}: {state.reason or 'no hello yet'}"
            refused = describe_rejections(state.rejected)
            if refused:
                out[site] += f"; mesh job: {refused}"
            dropped = sum(link.dropped[site].values())
            if dropped:
                out[site] += f"; this client dropped {dropped} of its replies ({', '.join(sorted(link.dropped[site]))})"
        return out

    @property
    def job_id(self) -> str | None:
        link = self._pump.link if self._pump else None
        return link.job_id if link else None

    @property
    def counters(self) -> dict[str, Any]:
        """Reply bytes received per site, replies dropped per site, pieces, the largest piece and exchanges, over every job used."""
        links = self._pump.links if self._pump else []
        bytes_in: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        for link in links:
            bytes_in.update(link.bytes_in)
            dropped.update({site: sum(reasons.values()) for site, reasons in link.dropped.items()})
        return {
            "bytes_in": dict(bytes_in),
            "dropped_replies": dict(dropped),
            "pieces": sum(link.pieces for link in links),
            "largest_piece": max((link.largest_piece for link in links), default=0),
            "exchanges": self._pump.exchanges if self._pump else 0,
            "switches": list(self._pump.switches) if self._pump else [],
        }


def _frames(messages: Sequence[ClientMessage], limit: int = 4 << 20) -> list[tuple[str, list[ClientMessage]]]:
    """Envelope JSON frames of at most about ``limit`` bytes each, with the messages in each."""
    frames: list[tuple[str, list[ClientMessage]]] = []
    group: list[ClientMessage] = []
    size = 0
    for message in messages:
        length = len(message.model_dump_json())
        if group and size + length > limit:
            frames.append((Envelope(messages=group).model_dump_json(), group))
            group, size = [], 0
        group.append(message)
        size += length
    if group:
        frames.append((Envelope(messages=group).model_dump_json(), group))
    return frames


def _close_at_exit(transport: FlareTransport) -> None:
    """Close the transport when the main thread ends, before Python joins non-daemon threads.

    FLARE's admin connection runs a non-daemon thread until its session is
    closed; a plain ``atexit`` hook runs only after those threads are joined, so
    a script that forgot to close its client would never exit. This is the hook
    `concurrent.futures` uses for the same reason.
    """
    ref = weakref.ref(transport)

    def close() -> None:
        alive = ref()
        if alive is not None:
            alive.close()

    try:
        threading._register_atexit(close)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # another Python, or already shutting down
        atexit.register(close)
