"""Mutual TLS for the Dask clusters a site starts, and a client certificate for one it is pointed at.

Dask runs the pickled functions it is sent, so whoever can talk to a site's
scheduler, nannies or workers runs code as the site, with its credentials and
its federation key. Every cluster a site starts therefore gets its own
certificate authority, made when the cluster starts and used by nothing else:
its scheduler, nannies, workers and the site's client all hold one certificate
signed by that CA and accept only peers that present one too
(``require_encryption``, TLS 1.3). The CA's private key signs that certificate
and is dropped; it is never written anywhere, so no file can mint another
certificate the cluster trusts. The certificate and its key live in a private
directory (0700, files 0600) that :meth:`ClusterCertificates.close` removes.

Dask's HTTP servers (the scheduler's on 8787, one per worker: metrics, task and
worker information, logs) have no authentication at all, so a site's clusters
serve no routes (:data:`NO_HTTP_ROUTES`) and close those listeners once started.

Example::

    from distributed import Client, LocalCluster
    from site_workers.dask_tls import ClusterCertificates

    certificates = ClusterCertificates()
    security = certificates.security()
    cluster = LocalCluster(protocol="tls://", host="127.0.0.1", security=security)
    client = Client(cluster, security=security)
    ...
    client.close(); cluster.close(); certificates.close()
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import ssl
import stat
import tempfile
import weakref
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin
from distributed.security import Security

from dfm_prefect.core.errors import ConfigError

NO_HTTP_ROUTES: dict[str, Any] = {"distributed.scheduler.http.routes": [], "distributed.worker.http.routes": []}
"""Dask config under which a cluster's HTTP servers serve nothing (set while the cluster is made)."""

_VALID_FOR = datetime.timedelta(days=3650)  # a cluster lives as long as its site; its CA dies with it


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, data)
    finally:
        os.close(fd)


class ClusterCertificates:
    """A private CA and one certificate signed by it, for one cluster, in a 0700 directory.

    ``ca.pem`` (the CA's certificate), ``cluster.pem`` and ``cluster-key.pem``
    (the certificate every member of the cluster presents, and its key).
    """

    def __init__(self, label: str = "dfm-dask") -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=f"{label}-"))  # mode 0700, owned by this user
        # Removed at interpreter exit even if nobody calls close (not after SIGKILL: see docs/security.md).
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        try:
            self._generate(label)
        except BaseException:
            self.close()
            raise

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.directory / "cluster.pem"

    @property
    def key_file(self) -> Path:
        return self.directory / "cluster-key.pem"

    def _generate(self, label: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{label} cluster CA {os.urandom(8).hex()}")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{label} cluster member")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(label), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        _write_private(self.ca_file, ca_cert.public_bytes(pem))
        _write_private(self.cert_file, cert.public_bytes(pem))
        _write_private(
            self.key_file, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )

    def security(self) -> Security:
        """A `distributed.security.Security` for every role (scheduler, worker, client): mutual TLS 1.3 only."""
        return tls_security(str(self.ca_file), str(self.cert_file), str(self.key_file))

    def close(self) -> None:
        """Remove the directory with the key (the cluster's connections must be closed first)."""
        self._finalizer()


def tls_security(ca_file: str, cert_file: str, key_file: str) -> Security:
    """Mutual-TLS `Security` that presents ``cert_file`` in every role and trusts only ``ca_file``."""
    return Security(
        require_encryption=True,
        tls_min_version=ssl.TLSVersion.TLSv1_3,
        tls_ca_file=ca_file,
        tls_client_cert=cert_file,
        tls_client_key=key_file,
        tls_scheduler_cert=cert_file,
        tls_scheduler_key=key_file,
        tls_worker_cert=cert_file,
        tls_worker_key=key_file,
    )


def admin_security(ca_file: str, cert_file: str, key_file: str) -> Security:
    """The client `Security` for an existing TLS scheduler, from files the admin named; refuses unusable ones.

    Raises `ConfigError` when a file is missing or the key can be read by other users.
    """
    for what, name in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if not Path(name).is_file():
            raise ConfigError(f"compute.scheduler_tls.{what} {name!r} is not a readable file at this site; give the path of the PEM file")
    mode = stat.S_IMODE(Path(key_file).stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"compute.scheduler_tls.key_file {key_file!r} can be read by other users (mode {mode:o}); "
            f"run chmod 600 {key_file} so that only the site's user can use it"
        )
    return Security(require_encryption=True, tls_ca_file=ca_file, tls_client_cert=cert_file, tls_client_key=key_file)


class NoHttpListener(WorkerPlugin):
    """Closes a worker's HTTP listener when the worker starts (restarted workers included)."""

    name = "dfm-no-http-listener"

    def setup(self, worker: Any) -> None:
        worker.http_server.stop()


def _stop_scheduler_http(dask_scheduler: Any) -> None:
    dask_scheduler.http_server.stop()


def close_http_servers(client: Any) -> None:
    """Close the HTTP listeners of the scheduler and of every worker, present and future."""
    client.run_on_scheduler(_stop_scheduler_http)
    client.register_plugin(NoHttpListener())
