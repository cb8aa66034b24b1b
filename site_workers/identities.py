"""Who asks: the site checks each request's signature against the federation's root CA, and keeps an audit log.

The identity a site acts on (``export.recipients``, who may cancel a run, the
audit log) is the common name of the certificate that signed the request, and
only after the certificate chains to the root CA the site trusts, the signature
covers this request for this site, it is fresh and it was not seen before. An
unsigned request is anonymous: it never receives a kind that ``recipients``
restricts, and with ``identities.require: true`` it is refused outright.

Where the root CA comes from, first found wins: ``identities.root_ca`` in the
site's YAML, the FLARE site kit's ``startup/rootCA.pem`` (over FLARE), the
``DFM_ROOT_CA`` environment variable (set by the local transport's launcher).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from dfm_prefect.core.errors import AuthenticationError, ConfigError
from dfm_prefect.core.identity import Verifier
from site_workers.answers import refs_in
from site_workers.config import IdentityPolicy

ROOT_CA_ENV = "DFM_ROOT_CA"
"""Environment variable naming the PEM root CA a site trusts for request signatures."""

AUDIT_DIR_ENV = "DFM_AUDIT_DIR"
"""Environment variable naming a folder for ``<site>.audit.jsonl`` when the YAML names no audit log."""

log = logging.getLogger("dfm_prefect.site.audit")


class Identities:
    """Verifies signed requests for one site."""

    def __init__(self, site: str, policy: IdentityPolicy, root_ca: str | None = None) -> None:
        self.site = site
        self.policy = policy
        source = policy.root_ca or root_ca or os.environ.get(ROOT_CA_ENV)
        self.root_ca = source
        self._verifier = Verifier.from_file(source, max_age_s=policy.max_age_s) if source else None
        if policy.require and self._verifier is None:
            raise ConfigError(
                f"site {site!r} requires signed requests (identities.require) but trusts no root CA: "
                f"set identities.root_ca or {ROOT_CA_ENV}"
            )

    def who(self, message: Any) -> str | None:
        """The verified identity behind ``message``, None for an allowed anonymous one; `AuthenticationError` otherwise."""
        if getattr(message, "auth", None) is None:
            if self.policy.require:
                raise AuthenticationError(
                    "this site accepts only signed requests (identities.require): connect with your own "
                    "certificate (a FLARE admin kit, or cert/key in a local federation file)",
                    site=self.site,
                )
            return None
        if self._verifier is None:
            raise AuthenticationError(
                "the request is signed but this site trusts no root CA to check it; ask its administrator "
                f"to set identities.root_ca (or {ROOT_CA_ENV})",
                site=self.site,
            )
        try:
            return self._verifier.verify(message, self.site)
        except AuthenticationError as exc:
            raise AuthenticationError(str(exc), site=self.site) from None


    def grantor(self, grant: Any, for_site: str) -> str:
        """Who signed ``grant`` (a move request) for site ``for_site``; `AuthenticationError` if nobody did.

        Always signed, whatever ``identities.require`` says: a site may only fetch
        what a person asked it to move. The grant's signature names the site it was
        sent to, so a grant for one site is no grant for another.
        """
        if getattr(grant, "auth", None) is None:
            raise AuthenticationError(f"the move request site {for_site!r} presented is not signed by anyone", site=self.site)
        if self._verifier is None:
            raise AuthenticationError("the move was signed but this site trusts no root CA to check it", site=self.site)
        try:
            return self._verifier.verify(grant, for_site, once=False)
        except AuthenticationError as exc:
            raise AuthenticationError(f"the move's grant does not hold: {exc}", site=self.site) from None


class AuditLog:
    """One JSON line per event at this site: who, what, on which data, what left. Private to the site (0600)."""

    def __init__(self, site: str, path: str | None) -> None:
        self.site = site
        folder = os.environ.get(AUDIT_DIR_ENV)
        self.path = Path(path) if path else (Path(folder) / f"{site}.audit.jsonl" if folder else None)
        self._lock = threading.Lock()
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Opened once: recording must not need a file descriptor when the site has none to spare.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "a", buffering=1)

    def record(self, event: str, identity: str | None, request_id: str, **fields: Any) -> None:
        """Append one event (also to the site's log at INFO when no file is configured)."""
        entry = {"time": round(time.time(), 3), "site": self.site, "event": event, "identity": identity or "anonymous", "request": request_id, **fields}
        line = json.dumps(entry, sort_keys=True, default=str)
        if self._file is None:
            log.info("audit %s", line)
            return
        try:
            with self._lock:
                self._file.write(line + "\n")
        except (OSError, ValueError) as exc:  # a full disk must not stop the site from answering
            log.error("could not write the audit log %s: %s; the event was: %s", self.path, exc, line)

    def close(self) -> None:
        """Close the audit file."""
        if self._file is not None:
            with self._lock:
                self._file.close()


def data_inputs(params: Any) -> list[str]:
    """The sources and references a request's parameters name (what data it touched), for the audit log."""
    values = list(getattr(params, "__dict__", {}).values())
    sources = [item for value in values for item in (value if isinstance(value, (list, tuple)) else [value])]
    named = [item for item in sources if isinstance(item, str) and ("/" in item or "://" in item)]
    return named + [f"ref:{ref.uri}" for value in values for ref in refs_in(value)]
