"""Local transport, client side: each site is an OS process on this machine.

The federation spec names each site's loopback address and the shared key that
``dfm-prefect federation up --transport local`` generated::

    {"transport": "local", "sites": {"north": "127.0.0.1:41231"}, "authkey": "9f..."}
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from dfm_prefect.core.errors import SiteUnavailableError
from dfm_prefect.core.identity import Signer
from dfm_prefect.core.wire import ClientMessage, Envelope, ReplyEnvelope
from dfm_prefect.transports.base import OnMessage, OnSiteLost, Transport
from dfm_prefect.transports.local.protocol import MAX_FRAME

log = logging.getLogger("dfm_prefect.transport.local")


class LocalSpec(BaseModel):
    """How to reach a federation of local site processes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transport: Literal["local"] = "local"
    sites: dict[str, str] = Field(description="site name -> 'host:port'")
    authkey: SecretStr = Field(description="hex shared key of the federation")
    cert: str | None = Field(default=None, description="This user's certificate (PEM), issued by the federation's CA.")
    key: str | None = Field(default=None, description="This user's private key (PEM) for signing requests.")
    links: dict[str, float] = Field(
        default_factory=dict,
        description='Relative cost per byte of moving data between two sites, by "from->to" (1.0 where not named); '
        "placement weighs the bytes an operation would move by these.",
    )


class _Link:
    """One authenticated connection to a site, with its reader thread."""

    def __init__(self, site: str, address: str, authkey: bytes, on_message: OnMessage, on_lost: OnSiteLost) -> None:
        host, port = address.rsplit(":", 1)
        self.site = site
        self.conn: Connection = Client((host, int(port)), family="AF_INET", authkey=authkey)
        self.lock = threading.Lock()
        self.alive = True
        self._on_message = on_message
        self._on_lost = on_lost
        self.reader = threading.Thread(target=self._read, name=f"dfm-local-{site}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        reason = "connection closed by the site"
        while True:
            try:
                frame = self.conn.recv_bytes(MAX_FRAME)
            except (EOFError, OSError) as exc:
                reason = f"connection lost: {exc or type(exc).__name__}"
                break
            try:
                envelope = ReplyEnvelope.model_validate_json(frame)
            except ValidationError as exc:
                log.error("site %s sent a frame that is not valid wire v1 (%d bytes): %s", self.site, len(frame), exc)
                continue
            for message in envelope.messages:
                self._on_message(self.site, message)
        was_alive, self.alive = self.alive, False
        if was_alive:
            self._on_lost(self.site, reason)

    def send(self, frame: bytes) -> None:
        with self.lock:
            self.conn.send_bytes(frame)

    def close(self) -> None:
        self.alive = False
        try:
            # Closing a descriptor does not wake a thread blocked reading it; a
            # shutdown does (the reader then sees end-of-file and exits).
            sock = socket.socket(fileno=self.conn.fileno())
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.detach()
        except OSError:
            pass  # already closed by the site
        try:
            self.conn.close()
        except OSError:
            pass


class LocalTransport(Transport):
    """Talks to site processes on this machine over authenticated loopback connections."""

    Spec = LocalSpec

    def __init__(self, spec: LocalSpec) -> None:
        self.spec = spec
        self._authkey = bytes.fromhex(spec.authkey.get_secret_value())
        self._links: dict[str, _Link] = {}
        self._lock = threading.Lock()
        self._on_message: OnMessage | None = None
        self._on_lost: OnSiteLost | None = None

    @classmethod
    def from_spec(cls, spec: LocalSpec) -> LocalTransport:
        return cls(spec)

    def signer(self) -> Signer | None:
        """The user's certificate and key from the spec; without them requests are anonymous."""
        if self.spec.cert is None or self.spec.key is None:
            return None
        return Signer.from_files(self.spec.cert, self.spec.key)

    @property
    def sites(self) -> list[str]:
        return list(self.spec.sites)

    def open(self, on_message: OnMessage, on_site_lost: OnSiteLost) -> None:
        self._on_message, self._on_lost = on_message, on_site_lost

    def _link(self, site: str) -> _Link:
        with self._lock:
            link = self._links.get(site)
            if link is not None and link.alive:
                return link
            address = self.spec.sites.get(site)
            if address is None:
                raise SiteUnavailableError(f"no site {site!r} in this federation; sites: {self.sites}", site=site)
            assert self._on_message is not None and self._on_lost is not None, "open() the transport first"
            try:
                link = _Link(site, address, self._authkey, self._on_message, self._on_lost)
            except AuthenticationError:
                raise SiteUnavailableError(
                    f"site at {address} refused the federation key; is the federation file current?", site=site
                ) from None
            except OSError as exc:
                raise SiteUnavailableError(f"cannot connect to {address}: {exc.strerror or exc}", site=site) from None
            self._links[site] = link
            return link

    def send(self, site: str, messages: Sequence[ClientMessage]) -> None:
        link = self._link(site)
        frame = Envelope(messages=list(messages)).model_dump_json().encode()
        try:
            link.send(frame)
        except OSError as exc:
            link.close()
            raise SiteUnavailableError(f"lost the connection while sending: {exc}", site=site) from None

    def close(self) -> None:
        with self._lock:
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            link.close()
        for link in links:
            link.reader.join(timeout=5)
