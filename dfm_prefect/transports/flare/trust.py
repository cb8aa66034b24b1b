"""What an admin kit says about its FLARE server: where it is, and whether mTLS trust holds both ways."""

from __future__ import annotations

import json
import os
import socket
import ssl
from pathlib import Path

from dfm_prefect.core.errors import ConfigError


def admin_address(kit: str | os.PathLike[str]) -> tuple[str, int]:
    """The FLARE server's admin host and port that an admin kit connects to."""
    path = Path(kit) / "startup" / "fed_admin.json"
    try:
        admin = json.loads(path.read_text())["admin"]
        return str(admin["host"]), int(admin["port"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the server address from {path}: {exc}") from None


def tls_problem(kit: str | os.PathLike[str], host: str, port: int, *, timeout: float = 3.0, listen: float = 1.0) -> str | None:
    """Why the server at ``host:port`` and this kit's mTLS identity do not trust each other, or None.

    One handshake with the kit's root CA and certificate: the server's
    certificate must be signed by the kit's root CA, and the server must keep
    the connection once it has seen the kit's certificate (with TLS 1.3 a
    server that refuses a client certificate closes the connection right after
    the handshake; ``listen`` is how long to watch for that, 0 to check only the
    server's certificate). None also when the port cannot be reached at all:
    that is not a question of trust.
    """
    startup = Path(kit) / "startup"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # FLARE certificates name participants, not hosts
    try:
        context.load_verify_locations(str(startup / "rootCA.pem"))
        context.load_cert_chain(str(startup / "client.crt"), str(startup / "client.key"))
    except (OSError, ssl.SSLError) as exc:
        return f"the kit's certificate files cannot be used: {exc}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    try:
        with context.wrap_socket(sock) as tls:
            if listen <= 0:
                return None
            tls.settimeout(listen)
            try:
                closed = tls.recv(1) == b""
            except TimeoutError:
                return None  # the server kept the connection: it accepted the certificate
            except ssl.SSLError as exc:
                return f"the server refused the kit's certificate: {exc.reason or exc}"
            if closed:
                return "the server closed the connection after seeing the kit's certificate"
            return None
    except ssl.SSLCertVerificationError as exc:
        return f"the server's certificate is not signed by the kit's root CA: {exc.verify_message}"
    except (ssl.SSLError, OSError) as exc:
        return f"the TLS handshake failed: {exc}"
    finally:
        sock.close()
