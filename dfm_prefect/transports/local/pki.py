"""A small certificate authority for a local federation: one certificate per person who runs flows.

Over FLARE, provisioning issues each person an admin kit; the local transport
gets the same kind of identity from this CA, so requests are signed per person
on both transports and a site's ``export.recipients`` rules work on both.
Keys and certificates are written owner-only (0600 in a 0700 folder).

Example:

```python
from dfm_prefect.transports.local.pki import LocalCA

ca = LocalCA.create("/tmp/dfm-ca")
cert, key = ca.issue("alice@lab.example")       # give these to alice: her federation file names them
```
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.transports.base import write_private

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")
VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: x509.Name, issuer: x509.Name, public_key: Any, signing_key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .sign(signing_key, hashes.SHA256())
    )


class LocalCA:
    """A root CA kept in a folder, which issues per-person certificates."""

    def __init__(self, folder: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.folder = folder
        self._key = key
        self.cert = cert

    @property
    def root_ca(self) -> Path:
        """The PEM root certificate sites trust (``DFM_ROOT_CA``)."""
        return self.folder / "rootCA.pem"

    @classmethod
    def create(cls, folder: str | os.PathLike[str]) -> LocalCA:
        """A new CA in ``folder`` (made private); an existing one there is replaced."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name("dfm-prefect local federation CA")
        cert = _certificate(name, name, key.public_key(), key, ca=True)
        ca = cls(root, key, cert)
        write_private(ca.root_ca, cert.public_bytes(serialization.Encoding.PEM))
        # Kept (owner-only) so the federation's operator can issue more people later.
        write_private(root / "rootCA.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return ca

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> LocalCA:
        """The CA that :meth:`create` made in ``folder``."""
        root = Path(folder)
        try:
            key = serialization.load_pem_private_key((root / "rootCA.key").read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((root / "rootCA.pem").read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{root} holds no local federation CA: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{root}/rootCA.key is not the CA key of a local federation")
        return cls(root, key, cert)

    def issued(self, cert_path: Path) -> bool:
        """True if ``cert_path`` holds a certificate this CA signed."""
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            cert.verify_directly_issued_by(self.cert)
        except (OSError, ValueError, TypeError, InvalidSignature):
            return False
        return True

    def issue(self, common_name: str) -> tuple[Path, Path]:
        """A certificate and key for one person (the common name is their identity); return their paths."""
        if not _NAME.match(common_name):
            raise ConfigError(f"identity {common_name!r}: use letters, digits and . _ @ + - (at most 128)")
        return self._issue(common_name, common_name)

    def issue_site(self, site: str) -> tuple[Path, Path]:
        """A certificate and key for a site, named ``site:<name>`` (no person's name can contain ':')."""
        if not _NAME.match(site):
            raise ConfigError(f"site name {site!r} cannot be certified")
        return self._issue(f"site:{site}", f"site-{site}")

    def _issue(self, common_name: str, file_stem: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(_name(common_name), self.cert.subject, key.public_key(), self._key, ca=False)
        pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        cert_path = write_private(self.folder / f"{file_stem}.crt", cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, write_private(self.folder / f"{file_stem}.key", pem_key)
