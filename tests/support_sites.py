"""Helpers for the trust and resilience tests: private federations, in-process workers, raw connections.

Test modules that kill or misconfigure sites start their own federation with
:func:`private_federation` so the session federation of ``conftest.py`` is never
disturbed. Each such module exposes it through a fixture, so a later transport
(FLARE) can parametrize the fixture without touching the tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import yaml

from dfm_prefect.local_federation import LocalFederation
from dfm_prefect.wire import Envelope, ReplyEnvelope, RunRequest, SiteMessage
from site_workers.worker import SiteWorker
from tests.conftest import ROOT


@contextmanager
def private_federation(
    root: Path, configs: Mapping[str, Mapping[str, Any]], env: Mapping[str, str] | None = None
) -> Iterator[LocalFederation]:
    """Write one YAML per site config under ``root``, start the sites, stop them afterwards."""
    from dfm_prefect.client import get_client

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, config in configs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(dict(config)))
        paths.append(path)
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
            raise AssertionError(f"expected {count} answers within {timeout}s, got {messages}")
        return messages

    def close(self) -> None:
        self.conn.close()


class Sampler:
    """Samples values in a background thread (the sites and psutil offer no push notifications)."""

    def __init__(self, probes: Mapping[str, Callable[[], float]], interval: float = 0.1) -> None:
        self.probes = dict(probes)
        self.interval = interval
        self.peaks: dict[str, float] = {name: 0.0 for name in self.probes}
        self.samples = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dfm-test-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for name, probe in self.probes.items():
                try:
                    self.peaks[name] = max(self.peaks[name], float(probe()))
                except Exception as exc:  # a probe of a site that is restarting: note it, keep sampling
                    self.errors.append(f"{name}: {exc}")
            self.samples += 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
