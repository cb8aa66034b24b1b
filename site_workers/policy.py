"""The export policy: which results may leave the site, and how big they may be."""

from __future__ import annotations

from dfm_prefect.errors import ExportRefusedError
from dfm_prefect.refs import DataRef
from site_workers.config import ExportPolicy
from site_workers.store import ResultStore


class ExportGate:
    """Decides, for each result, whether its bytes may leave the site."""

    def __init__(self, site: str, policy: ExportPolicy) -> None:
        self.site = site
        self.policy = policy

    def refusal(self, ref: DataRef) -> str | None:
        """Why ``ref`` may not leave, or None if it may."""
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
        return None

    def check_export(self, ref: DataRef) -> None:
        """Raise `ExportRefusedError` if ``ref`` may not leave."""
        reason = self.refusal(ref)
        if reason is not None:
            raise ExportRefusedError(f"{ref!r}: {reason}", site=self.site)

    def inline(self, ref: DataRef, payload: bytes | None, store: ResultStore) -> bytes | None:
        """The bytes to send along with a new result: only allowed results up to ``inline_bytes``."""
        if self.refusal(ref) is not None or ref.size > self.policy.inline_bytes:
            return None
        return payload if payload is not None else store.read_bytes(ref)
