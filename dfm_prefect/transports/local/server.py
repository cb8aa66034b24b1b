"""Local transport, site side: one OS process per site, serving clients over loopback TCP.

Connections are authenticated with a shared key (HMAC challenge in both
directions, from :mod:`multiprocessing.connection`); frames are JSON bytes sent
with ``send_bytes``/``recv_bytes``, never pickles.

A connection that has not authenticated is held to a deadline and a cap
(:mod:`~dfm_prefect.transports.local.gate`); ``accept()`` failing (no
descriptors left) sheds such a connection and never ends the site. Each
client's replies wait in a bounded :class:`~dfm_prefect.core.backpressure.ReplyBuffer`:
while it is full the site reads no more of that client's frames.

Run a site::

    DFM_AUTHKEY=<hex> python -m dfm_prefect.transports.local.server north.yaml --port 0
"""

from __future__ import annotations

import argparse
import errno
import itertools
import logging
import os
import resource
import signal
import socket
import sys
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from pathlib import Path

from dfm_prefect.core.backpressure import ReplyBuffer
from dfm_prefect.core.errors import ConfigError
from dfm_prefect.core.wire import ReplyEnvelope, SiteMessage
from dfm_prefect.transports.local.client import LocalSpec, LocalTransport
from dfm_prefect.transports.local.gate import HandshakeGate, shutdown
from dfm_prefect.transports.local.protocol import AUTHKEY_ENV, MAX_FRAME, PEERS_ENV, READY
from site_workers.config import load_site_config
from site_workers.peers import Peers
from site_workers.worker import SiteWorker

log = logging.getLogger("dfm_prefect.site.local")

# accept() failures that mean "no descriptor or memory for one more connection right now".
_OUT_OF_ROOM = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
FD_RESERVE = 16
"""Descriptors the accept loop leaves free for the site's own work (result files, the store, Dask)."""


def _free_descriptors() -> int:
    """How many more files this process may open (its soft limit less those open); large where unknown."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return 1 << 20
    return (1 << 20) if soft == resource.RLIM_INFINITY else soft - used
_BACKLOG = 128


class LocalSiteServer:
    """Serves one :class:`SiteWorker` to local-transport clients."""

    def __init__(self, worker: SiteWorker, *, authkey: bytes, host: str = "127.0.0.1", port: int = 0) -> None:
        self.worker = worker
        self._authkey = authkey
        self._listener = Listener((host, port), family="AF_INET", backlog=_BACKLOG)
        self._peers = itertools.count(1)
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)  # notified whenever a connection closes
        self._closing = threading.Event()
        limits = worker.config.limits
        self.gate = HandshakeGate(timeout=limits.handshake_timeout_s, limit=limits.max_unauthenticated)

    @property
    def address(self) -> str:
        host, port = self._listener.address
        return f"{host}:{port}"

    def serve_forever(self) -> None:
        """Accept connections until :meth:`close`."""
        while not self._closing.is_set():
            if _free_descriptors() < FD_RESERVE:
                # Unauthenticated connections must not take the descriptors the site's own work
                # needs (storing a result opens a file): make room before accepting another.
                self._make_room(f"fewer than {FD_RESERVE} descriptors were left for the site's own work")
                continue
            try:
                conn = self._listener.accept()
            except OSError as exc:
                if self._closing.is_set():
                    return
                self._accept_failed(exc)
                continue
            peer = f"local-{next(self._peers)}"
            self.gate.admit(peer, conn)
            try:
                threading.Thread(target=self._serve, args=(conn, peer), name=f"site-conn-{peer}", daemon=True).start()
            except RuntimeError as exc:  # no thread for it: refuse this one connection, keep serving
                log.warning("refused connection %s: %s", peer, exc)
                self._end(conn, peer)

    def _accept_failed(self, exc: OSError) -> None:
        """A failed accept() never ends the site: make room if it ran out of descriptors, then go on."""
        if exc.errno not in _OUT_OF_ROOM:
            log.warning("accept() failed: %s; still serving", exc)
            return
        self._make_room(f"accept() failed ({exc.strerror}): a descriptor was needed")

    def _make_room(self, reason: str) -> None:
        """Shed the oldest unauthenticated connection and wait until a connection's descriptor is closed."""
        if not self.gate.shed_oldest(reason):
            log.warning("%s and no unauthenticated connection can be shed; waiting for one to end", reason)
        with self._ended:
            self._ended.wait(1.0)  # also a backstop: descriptors may be freed outside this server

    def _end(self, conn: Connection, peer: str) -> None:
        self.gate.passed(peer)
        with self._ended:
            self._connections.discard(conn)
            conn.close()
            self._ended.notify_all()

    def _serve(self, conn: Connection, peer: str) -> None:
        try:
            deliver_challenge(conn, self._authkey)
            answer_challenge(conn, self._authkey)
            refused = None if self.gate.passed(peer) else f"it did not authenticate within {self.gate.timeout:g} s"
        except (AuthenticationError, OSError, EOFError) as exc:
            refused = str(exc) or type(exc).__name__
        if refused is not None:
            log.info("refused connection %s: %s", peer, refused)
            self._end(conn, peer)
            return
        with self._lock:
            self._connections.add(conn)
        self._serve_client(conn, peer)

    def _serve_client(self, conn: Connection, peer: str) -> None:
        send_lock = threading.Lock()

        def send(batch: list[SiteMessage]) -> None:
            frame = ReplyEnvelope(messages=batch).model_dump_json().encode()
            with send_lock:
                conn.send_bytes(frame)

        limits = self.worker.config.limits
        replies = ReplyBuffer(
            send,
            name=f"site-writer-{peer}",
            on_overflow=lambda _reason: shutdown(conn),
            max_bytes=limits.reply_buffer_bytes,
            stall_s=limits.reply_stall_s,
        )
        reader = threading.get_ident()

        def reply(message: SiteMessage) -> None:
            # Only this connection's own reader may wait for room; the site's worker threads never do.
            replies.put(message, wait=threading.get_ident() == reader)

        try:
            while replies.wait_for_room():
                try:
                    frame = conn.recv_bytes(MAX_FRAME)
                except (EOFError, OSError):
                    break
                self.worker.handle_frame(frame, reply, peer)
        finally:
            cancelled = self.worker.cancel_peer(peer)
            if cancelled:
                log.info("client %s went away or was dropped; cancelled %d of its requests", peer, cancelled)
            shutdown(conn)  # a writer blocked on a client that does not read fails now, not later
            replies.close()
            self._end(conn, peer)

    def close(self) -> None:
        self._closing.set()
        # Closing a listening socket does not wake a thread blocked in accept(); a
        # throwaway connection does.
        host, port = self._listener.address
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            pass
        self._listener.close()
        self.gate.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()
        self.worker.close()


def authkey_from_env(var: str = AUTHKEY_ENV) -> bytes:
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"set {var} to the federation's shared key (hex) before starting a local site")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{var} must be hex") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve one dfm-prefect site over the local transport.")
    parser.add_argument("config", help="site config YAML")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("DFM_LOG_LEVEL", "WARNING"), format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_site_config(args.config)
        peers, transport = _peers(config.name)
        worker = SiteWorker(config, peers=peers, site_certificates=True)
        server = LocalSiteServer(worker, authkey=authkey_from_env(), host=args.host, port=args.port)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.close, daemon=True).start())
    print(f"{READY} {config.name} {server.address}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.close()
    finally:
        if transport is not None:
            transport.close()
    return 0


def _peers(site: str) -> tuple[Peers | None, LocalTransport | None]:
    """How this site reaches the others for moves: the federation file ``DFM_PEERS`` names (none: no moves)."""
    path = os.environ.get(PEERS_ENV)
    if not path:
        return None, None
    try:
        spec = LocalSpec.model_validate_json(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{PEERS_ENV}={path}: cannot read this site's federation file for moves: {exc}") from None
    transport = LocalTransport(spec)
    peers = Peers(site, transport.send, transport.signer())
    transport.open(peers.on_message, peers.on_lost)
    return peers, transport


if __name__ == "__main__":
    raise SystemExit(main())
