"""Per-person identities: each request is signed with the key of a certificate the federation's CA issued.

The client signs every request it sends to a site with the private key of its
own certificate (over FLARE, the admin startup kit's ``client.crt`` and
``client.key``); the signature covers the message, the destination site and a
timestamp. The site checks the certificate against the federation's root CA, the
signature, the time window and that it has not seen the same request before.
The identity a site acts on is the certificate's common name, never a name the
client writes.

Example:

```python
from dfm_prefect.core.identity import Signer, Verifier
from dfm_prefect.core.wire import StatsRequest

signer = Signer.from_files("kit/startup/client.crt", "kit/startup/client.key")
signed = signer.sign(StatsRequest(id="r1"), site="north")
assert Verifier.from_file("kit/startup/rootCA.pem").verify(signed, site="north") == signer.identity
```
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, Field

from dfm_prefect.core.errors import AuthenticationError, ConfigError

MAX_AGE_S = 120.0
"""How old (or how far ahead of the site's clock) a signed request may be."""

M = TypeVar("M", bound=BaseModel)


class RequestSignature(BaseModel):
    """Who sent a request, verifiably: their certificate, when they signed, the signature."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert: str = Field(min_length=1, max_length=8192, description="The signer's certificate, base64 DER.")
    ts: float = Field(description="When the client signed (seconds since the epoch).")
    sig: str = Field(min_length=1, max_length=2048, description="base64 signature over the signed payload.")


def signed_payload(message: BaseModel, site: str, ts: float) -> bytes:
    """The bytes a signature covers: the message without its signature, the destination site, the time."""
    body = message.model_dump(mode="json", exclude={"auth"})
    return json.dumps({"message": body, "site": site, "ts": ts}, sort_keys=True, separators=(",", ":")).encode()


def common_name(cert: x509.Certificate) -> str:
    """The certificate's subject common name (the identity)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise AuthenticationError("the certificate names no subject common name")
    return str(names[0].value)


class Signer:
    """Signs requests with one person's certificate and private key."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
            raise ConfigError(f"unsupported private key type {type(key).__name__}: use RSA, EC or Ed25519")
        self._key = key
        self.identity = common_name(self.cert)
        self._cert_b64 = base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path) -> Signer:
        """Read a PEM certificate and its unencrypted PEM private key."""
        try:
            return cls(Path(cert).read_bytes(), Path(key).read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read the identity certificate or key: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{cert} / {key} is not a PEM certificate and private key: {exc}") from None

    def sign(self, message: M, site: str) -> M:
        """A copy of ``message`` carrying this person's signature for ``site``."""
        ts = time.time()
        data = signed_payload(message, site, ts)
        key = self._key
        if isinstance(key, rsa.RSAPrivateKey):
            sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
        else:
            sig = key.sign(data)
        auth = RequestSignature(cert=self._cert_b64, ts=ts, sig=base64.b64encode(sig).decode())
        return message.model_copy(update={"auth": auth})


class Verifier:
    """Checks signed requests against the federation's root CA, once each, within a time window."""

    def __init__(self, root_ca_pem: bytes, *, max_age_s: float = MAX_AGE_S, clock: Callable[[], float] = time.time) -> None:
        self.root = x509.load_pem_x509_certificate(root_ca_pem)
        self.max_age_s = max_age_s
        self._clock = clock
        self._certs: dict[str, x509.Certificate] = {}
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> Verifier:
        """Trust the PEM root CA in ``path``."""
        try:
            return cls(Path(path).read_bytes(), **options)
        except OSError as exc:
            raise ConfigError(f"cannot read the federation's root CA {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"{path} is not a PEM certificate: {exc}") from None

    def verify(self, message: BaseModel, site: str, *, once: bool = True) -> str:
        """The identity that signed ``message`` for ``site``; `AuthenticationError` if anything does not hold.

        ``once=False`` checks a signed request that is shown again on purpose (a move's
        grant, presented with each piece the receiving site fetches): everything but the
        replay check, which the request already passed where it was sent.
        """
        auth = getattr(message, "auth", None)
        if not isinstance(auth, RequestSignature):
            raise AuthenticationError("the request is not signed")
        now = self._clock()
        if abs(now - auth.ts) > self.max_age_s:
            raise AuthenticationError(
                f"the request was signed {now - auth.ts:.0f}s from this site's time (at most {self.max_age_s:.0f}s): "
                "check the clocks of the client and the site"
            )
        try:
            der = base64.b64decode(auth.cert, validate=True)
        except (ValueError, binascii.Error):
            raise AuthenticationError("the request's certificate is not base64") from None
        # Keyed on the certificate's bytes, not on its base64 spelling: one certificate
        # has several spellings (unused padding bits), and each must hit the same entry.
        fingerprint = hashlib.sha256(der).hexdigest()
        cert = self._certificate(der, fingerprint, now)
        self._check_signature(cert, signed_payload(message, site, auth.ts), auth.sig)
        if once:
            self._remember(fingerprint, str(getattr(message, "id", "")), now)
        return common_name(cert)

    def _certificate(self, der: bytes, fingerprint: str, now: float) -> x509.Certificate:
        cert = self._certs.get(fingerprint)
        if cert is None:
            try:
                cert = x509.load_der_x509_certificate(der)
                cert.verify_directly_issued_by(self.root)
            except (ValueError, TypeError, binascii.Error, InvalidSignature) as exc:
                raise AuthenticationError(f"the certificate was not issued by this federation's root CA ({exc or 'bad signature'})") from None
            with self._lock:
                if len(self._certs) > 10_000:
                    self._certs.clear()
                self._certs[fingerprint] = cert
        moment = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            raise AuthenticationError(f"the certificate of {common_name(cert)!r} is not valid now")
        return cert

    def _check_signature(self, cert: x509.Certificate, data: bytes, sig_b64: str) -> None:
        try:
            sig = base64.b64decode(sig_b64, validate=True)
            key = cert.public_key()
            if isinstance(key, rsa.RSAPublicKey):
                key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(sig, data)
            else:
                raise AuthenticationError(f"unsupported key type {type(key).__name__} in the certificate")
        except (InvalidSignature, ValueError, binascii.Error):
            raise AuthenticationError("the request's signature does not match its content, site and time") from None

    def _remember(self, fingerprint: str, request_id: str, now: float) -> None:
        key = (fingerprint, request_id)
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - 2 * self.max_age_s:
                self._seen.popitem(last=False)
            if key in self._seen:
                raise AuthenticationError(f"request {request_id!r} was already received: a replayed request is refused")
            self._seen[key] = now
