"""Helpers for the trust and resilience tests: private federations, in-process workers, raw connections.

Test modules that kill or misconfigure sites start their own federation with
:func:`private_federation` (local transport) or :func:`private_flare_federation`
(a FLARE POC) so the session federations of ``conftest.py`` are never
disturbed. Each such module exposes it through a fixture parametrized over the
transports; the helpers below (:func:`signal_site`, :func:`restart_site`,
:func:`serves_again`) hide what differs between them.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import yaml

from dfm_prefect.core.errors import PlacementError, SiteUnavailableError
from dfm_prefect.core.wire import Envelope, ReplyEnvelope, RunRequest, SiteMessage
from dfm_prefect.transports.base import write_spec
from dfm_prefect.transports.flare.deploy.job import MeshJobConfig
from dfm_prefect.transports.local.launcher import LocalFederation
from site_workers.worker import SiteWorker
from tests.conftest import ROOT


def _write_configs(root: Path, configs: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, config in configs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(dict(config)))
        paths.append(path)
    return paths


@contextmanager
def private_federation(
    root: Path, configs: Mapping[str, Mapping[str, Any]], env: Mapping[str, str] | None = None
) -> Iterator[LocalFederation]:
    """Write one YAML per site config under ``root``, start the sites, stop them afterwards."""
    from dfm_prefect.client import get_client

    paths = _write_configs(root, configs)
    fed = LocalFederation(paths, workdir=root, env=dict(env or {}), pythonpath=[str(ROOT)])
    fed.start()
    try:
        yield fed
    finally:
        fed.stop()
        # Only this federation's client (the session's shared clients stay open). Closed
        # after the sites: their connections are then at EOF, so its reader threads end
        # at once instead of waiting out LocalTransport.close's join timeout.
        get_client(fed.federation_file).close()


class FlareSites:
    """A FLARE POC federation as the tests use a `LocalFederation`: sites, a federation file, site control.

    Its federation file names the mesh job by name only, so one client follows
    the job through replacements (as every client does) and stays the same
    shared client from test to test.
    """

    def __init__(self, fed: Any) -> None:
        self.fed = fed
        self.workdir: Path = fed.workdir
        self.federation_file = write_spec(fed.spec.model_copy(update={"job_id": None}), fed.workdir / "federation-by-name.json")

    @property
    def sites(self) -> list[str]:
        return list(self.fed.sites)

    def stop_site(self, name: str, *, kill: bool = False) -> None:
        self.fed.stop_site(name, kill=kill)

    def start_site(self, name: str) -> None:
        self.fed.start_site(name)

    def pids(self) -> dict[str, list[int]]:
        """Each live site's processes: its FLARE client first, then its job processes."""
        return self.fed.pids()

    def site_log(self, site: str) -> str:
        """Everything the site wrote: its FLARE client's log and each mesh job's log."""
        kit = self.fed.poc.kit(site)
        logs = [self.fed.poc.log_path(site), *sorted(kit.glob("*/log.txt"))]
        return "".join(path.read_text(errors="replace") for path in logs if path.exists())


@contextmanager
def private_flare_federation(
    root: Path, configs: Mapping[str, Mapping[str, Any]], env: Mapping[str, str] | None = None, *, job: MeshJobConfig = MeshJobConfig()
) -> Iterator[FlareSites]:
    """The same as :func:`private_federation`, behind a FLARE POC on 127.0.0.1 (mTLS kits, a supervised mesh job)."""
    from dfm_prefect.client import get_client
    from dfm_prefect.transports.flare.deploy.launcher import FlareFederation

    paths = _write_configs(root, configs)
    fed = FlareFederation(paths, workdir=root / "fed", env=dict(env or {}), pythonpath=[str(ROOT)], job=job)
    fed.start()
    sites = FlareSites(fed)
    try:
        yield sites
    finally:
        get_client(sites.federation_file).close()  # says goodbye to the mesh job while it still runs
        fed.stop()


def site_processes(fed: LocalFederation | FlareSites, site: str) -> list[int]:
    """The live processes of a site on either transport."""
    if isinstance(fed, FlareSites):
        return fed.fed.site_pids(site)
    return fed.site_pids(site)


def signal_site(fed: LocalFederation | FlareSites, site: str, sig: int) -> None:
    """Send ``sig`` to every process of a site (SIGSTOP/SIGCONT freeze and thaw the whole site)."""
    for pid in site_processes(fed, site):
        os.kill(pid, sig)


def serves_again(client: Any, site: str, timeout: float = 60.0) -> Any:
    """The result of an echo at ``site`` once it serves; over FLARE a site that returns needs a hello or a new mesh job."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.call(site, "core.echo", {"value": "back"}, timeout=30).fetch(client=client)
        except (SiteUnavailableError, PlacementError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # the mesh announces no "site is back" event to clients


def restart_site(fed: LocalFederation | FlareSites, client: Any, site: str) -> None:
    """Start a stopped site again and return once it serves (a local site serves when it listens)."""
    fed.start_site(site)
    if isinstance(fed, FlareSites):
        assert serves_again(client, site, timeout=90) == "back"


class Answers:
    """Collects a worker's answers by request id (progress updates aside) and waits for them."""

    def __init__(self) -> None:
        self.messages: list[SiteMessage] = []
        self.unsendable: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, message: SiteMessage) -> None:
        # Every answer must be sendable on the wire: encode and decode it as the transports do.
        # (Raising here would be swallowed by the worker, so failures are recorded instead.)
        try:
            ReplyEnvelope.model_validate_json(ReplyEnvelope(messages=[message]).model_dump_json())
        except Exception as exc:
            self.unsendable.append(f"{message!r}: {exc}")
        if message.kind == "progress":
            return
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = 20.0) -> list[SiteMessage]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"expected {count} answers, got {len(self.messages)}: {self.messages}")
            assert not self.unsendable, f"answers that cannot travel: {self.unsendable}"
            return list(self.messages)


def ask(worker: SiteWorker, frame: bytes | str, expected: int = 1, identity: str | None = None) -> list[SiteMessage]:
    """Hand one frame to an in-process worker and wait for ``expected`` answers."""
    answers = Answers()
    worker.handle_frame(frame, answers, "test-peer", identity)
    return answers.wait(expected)


def run_frame(op: str, params: dict[str, Any], request_id: str = "r-1", **fields: Any) -> str:
    return Envelope(messages=[RunRequest(id=request_id, op=op, params=params, **fields)]).model_dump_json()


class RawSiteConnection:
    """A local-transport connection that sends arbitrary bytes as frames (what a hostile client can do)."""

    def __init__(self, fed: LocalFederation, site: str) -> None:
        host, port = fed.spec.sites[site].rsplit(":", 1)
        self.conn: Connection = Client((host, int(port)), family="AF_INET", authkey=bytes.fromhex(fed.authkey))

    def send(self, frame: bytes) -> None:
        self.conn.send_bytes(frame)

    def receive(self, count: int, timeout: float = 20.0) -> list[SiteMessage]:
        """The next ``count`` answers (progress updates aside), from however many reply frames."""
        deadline = time.monotonic() + timeout
        messages: list[SiteMessage] = []
        while len(messages) < count and self.conn.poll(max(deadline - time.monotonic(), 0)):
            frame = ReplyEnvelope.model_validate_json(self.conn.recv_bytes())
            messages.extend(m for m in frame.messages if m.kind != "progress")
        if len(messages) < count:
            raise AssertionError(f"expected {count} answers within {timeout}s, got {len(messages)}; the last: {messages[-3:]}")
        return messages

    def close(self) -> None:
        self.conn.close()


class RawMeshConnection:
    """An admin session that sends arbitrary text as frames to a site through the FLARE mesh job.

    What a client holding a valid admin kit can do: the controller routes frames
    without reading them, so the site's decoder sees exactly what was sent.
    """

    def __init__(self, fed: FlareSites, site: str) -> None:
        from dfm_prefect.spec import load_spec
        from dfm_prefect.transports.flare import admin
        from dfm_prefect.transports.flare.link import JobLink

        spec = load_spec(fed.federation_file)
        self.site = site
        self.mailbox = uuid.uuid4().hex  # its mailbox secret (32 hex characters)
        self.session = admin.open_session(spec.admin_kit, spec.username)  # type: ignore[attr-defined]
        self.job_id = admin.find_mesh_job(self.session, spec.job_name).id  # type: ignore[attr-defined]
        # A raw connection takes every answer (its frames are not requests the link could
        # route); the tests check the ids themselves.
        self.link = type("RawLink", (JobLink,), {"_refusal": lambda self, site, request_id: None})(self.job_id)
        self.pending: list[SiteMessage] = []
        self.problems: list[str] = []
        """Reply frames that were not wire v1, and sites the mesh reported lost."""

    def exchange(self, frames: list[str], *, wait: float = 0.0) -> None:
        from dfm_prefect.transports.flare import admin
        from dfm_prefect.transports.flare.protocol import ClientFrame, ExchangeRequest

        request = ExchangeRequest(
            mailbox=self.mailbox,
            ack=self.link.ack,
            wait=wait,
            awaiting=1,
            frames=[ClientFrame(id=uuid.uuid4().hex, site=self.site, data=frame) for frame in frames],
        )
        digest = self.link.absorb(admin.exchange(self.session, self.job_id, request))
        self.problems += digest.unreadable + [f"site {site} lost: {why}" for site, why in digest.lost.items()]
        self.pending += [message for _, message in digest.messages if message.kind != "progress"]

    @staticmethod
    def as_text(frame: bytes | str) -> str:
        """The frame as it travels in an admin command, which carries text: bytes as Latin-1, one character each."""
        return frame.decode("latin-1") if isinstance(frame, bytes) else frame

    def send(self, frame: bytes | str) -> None:
        self.exchange([self.as_text(frame)])

    def receive(self, count: int, timeout: float = 20.0) -> list[SiteMessage]:
        deadline = time.monotonic() + timeout
        while len(self.pending) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} answers within {timeout}s, got {len(self.pending)}; the last: {self.pending[-3:]}")
            self.exchange([], wait=0.3)
        messages, self.pending = self.pending[:count], self.pending[count:]
        return messages

    def close(self) -> None:
        from dfm_prefect.transports.flare import admin
        from dfm_prefect.transports.flare.protocol import ExchangeRequest

        admin.exchange(self.session, self.job_id, ExchangeRequest(mailbox=self.mailbox, closing=True))
        admin.close_session(self.session)


