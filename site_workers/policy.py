"""The export policy: which results may leave the site, for whom, and how big they may be."""

from __future__ import annotations

from dfm_prefect.core.errors import ExportRefusedError
from dfm_prefect.core.refs import DataRef
from site_workers.config import ExportPolicy
from site_workers.redaction import Redactor
from site_workers.store import ResultStore


class ExportGate:
    """Decides, for each result and each recipient, whether its bytes may leave the site.

    ``recipient`` is the client identity the transport authenticated for the
    connection the request came on, or ``None`` where the transport has none
    (the local transport: every holder of the federation key is the same party).
    The gate trusts only what the site itself recorded about a result: callers
    check a reference against the store (`ResultStore.check_owned`) first.
    """

    def __init__(self, site: str, policy: ExportPolicy, redactor: Redactor | None = None) -> None:
        self.site = site
        self.policy = policy
        self.redactor = redactor or Redactor(())

    def refusal(self, ref: DataRef, recipient: str | None = None) -> str | None:
        """Why ``ref`` may not leave for ``recipient``, or None if it may."""
        if ref.kind not in self.policy.kinds:
            allowed = ", ".join(self.policy.kinds) or "none"
            return (
                f"results of kind {ref.kind!r} may not leave this site (allowed kinds: {allowed}); "
                "reduce the data at the site first (for example with xarray.moments) and fetch that"
            )
        if ref.size > self.policy.max_bytes:
            return (
                f"the result is {ref.size} bytes and this site lets at most {self.policy.max_bytes} bytes "
                "leave per result; reduce or subset it at the site first"
            )
        allowed_clients = self.policy.recipients.get(ref.kind)
        if allowed_clients is not None:
            if recipient is None:
                return (
                    f"results of kind {ref.kind!r} leave this site only for clients its policy names, and this "
                    "connection carries no authenticated client identity (the local transport authenticates the "
                    "federation key, not individual clients); use a transport with client identities, or reduce "
                    "the data at the site first"
                )
            if recipient not in allowed_clients:
                return (
                    f"client {recipient!r} is not among the clients this site lets receive results of kind "
                    f"{ref.kind!r}; reduce the data at the site first or ask the site's administrator"
                )
        return None

    def check_export(self, ref: DataRef, recipient: str | None = None) -> None:
        """Raise `ExportRefusedError` if ``ref`` may not leave for ``recipient``."""
        reason = self.refusal(ref, recipient)
        if reason is not None:
            raise ExportRefusedError(f"{ref!r}: {reason}", site=self.site)

    def check_content(self, ref: DataRef, data: bytes) -> None:
        """Raise `ExportRefusedError` if the bytes about to leave contain one of the site's credentials."""
        if self.redactor.found_in(data):
            raise ExportRefusedError(
                f"{ref!r}: the result contains one of this site's credentials, so it stays here; "
                "ask the site's administrator to check the operation that produced it",
                site=self.site,
            )

    def inline(self, ref: DataRef, payload: bytes | None, store: ResultStore, recipient: str | None = None) -> bytes | None:
        """The bytes to send along with a new result: only allowed results up to ``inline_bytes``."""
        if self.refusal(ref, recipient) is not None or ref.size > self.policy.inline_bytes:
            return None
        data = payload if payload is not None else store.read_bytes(ref)
        # A result holding a credential does not come back inline; fetching it says why.
        return None if self.redactor.found_in(data) else data
