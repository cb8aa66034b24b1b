"""Local transport, site side: one OS process per site, serving clients over loopback TCP.

Connections are authenticated with a shared key (HMAC challenge in both
directions, from :mod:`multiprocessing.connection`); frames are JSON bytes sent
with ``send_bytes``/``recv_bytes``, never pickles.

Run a site::

    DFM_AUTHKEY=<hex> python -m dfm_prefect.transports.local.server north.yaml --port 0
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import socket
import sys
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.core.framing import BatchingWriter
from dfm_prefect.core.wire import ReplyEnvelope, SiteMessage
from dfm_prefect.transports.local.protocol import AUTHKEY_ENV, MAX_FRAME, READY
from site_workers.config import load_site_config
from site_workers.worker import SiteWorker

log = logging.getLogger("dfm_prefect.site.local")


class LocalSiteServer:
    """Serves one :class:`SiteWorker` to local-transport clients."""

    def __init__(self, worker: SiteWorker, *, authkey: bytes, host: str = "127.0.0.1", port: int = 0) -> None:
        self.worker = worker
        self._authkey = authkey
        self._listener = Listener((host, port), family="AF_INET")
        self._peers = itertools.count(1)
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()

    @property
    def address(self) -> str:
        host, port = self._listener.address
        return f"{host}:{port}"

    def serve_forever(self) -> None:
        """Accept connections until :meth:`close`."""
        while not self._closing.is_set():
            try:
                conn = self._listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                raise
            peer = f"local-{next(self._peers)}"
            threading.Thread(target=self._serve, args=(conn, peer), name=f"site-conn-{peer}", daemon=True).start()

    def _serve(self, conn: Connection, peer: str) -> None:
        try:
            deliver_challenge(conn, self._authkey)
            answer_challenge(conn, self._authkey)
        except (AuthenticationError, OSError, EOFError) as exc:
            log.warning("refused connection %s: %s", peer, exc)
            conn.close()
            return
        with self._lock:
            self._connections.add(conn)
        send_lock = threading.Lock()

        def send(batch: list[SiteMessage]) -> None:
            frame = ReplyEnvelope(messages=batch).model_dump_json().encode()
            with send_lock:
                conn.send_bytes(frame)

        writer: BatchingWriter[SiteMessage] = BatchingWriter(send, name=f"site-writer-{peer}")
        try:
            while True:
                try:
                    frame = conn.recv_bytes(MAX_FRAME)
                except (EOFError, OSError):
                    break
                self.worker.handle_frame(frame, writer.put, peer)
        finally:
            cancelled = self.worker.cancel_peer(peer)
            if cancelled:
                log.info("client %s went away; cancelled %d of its requests", peer, cancelled)
            writer.close()
            with self._lock:
                self._connections.discard(conn)
            conn.close()

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
        worker = SiteWorker(config)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
