"""The export policy: which results may leave the site, for whom, and how big they may be."""

from __future__ import annotations

from dfm_prefect.core.errors import DisclosureRefusedError, ExportRefusedError
from dfm_prefect.core.refs import DataRef
from site_workers.config import ExportPolicy
from site_workers.disclosure import DisclosureRules
from site_workers.redaction import Redactor
from site_workers.store import ResultStore
from site_workers.summaries import structure_only

# What reduces a result of each kind to an aggregate that may leave.
_REDUCE_HINT = {
    "table": "for example with table.groupby_aggregate",
    "dataset": "for example with xarray.moments or xarray.reduce",
}


class ExportGate:
    """Decides, for each result and each recipient, whether its bytes may leave the site.

    ``recipient`` is the client identity the transport authenticated for the
    connection the request came on, or ``None`` where the transport has none
    (the local transport: every holder of the federation key is the same party).
    The gate trusts only what the site itself recorded about a result: callers
    check a reference against the store (`ResultStore.check_owned`) first, and
    pass ``contributors``, the smallest group the store recorded for an aggregate
    (`ResultStore.contributors`), never the reference's own field.
    """

    def __init__(self, site: str, policy: ExportPolicy, redactor: Redactor | None = None) -> None:
        self.site = site
        self.policy = policy
        self.redactor = redactor or Redactor(())
        self.disclosure = DisclosureRules(policy.disclosure)

    def refusal(self, ref: DataRef, recipient: str | None = None, contributors: int | None = None) -> str | None:
        """Why ``ref`` may not leave for ``recipient``, or None if it may."""
        return self._export_refusal(ref, recipient) or self._group_refusal(ref, contributors)

    def _export_refusal(self, ref: DataRef, recipient: str | None) -> str | None:
        if ref.kind not in self.policy.kinds:
            return self._kind_refusal(ref, recipient)
        if ref.size > self.policy.max_bytes:
            return (
                f"the result is {ref.size} bytes and this site lets at most {self.policy.max_bytes} bytes "
                "leave per result; reduce or subset it at the site first"
            )
        return self._kind_refusal(ref, recipient)

    def _group_refusal(self, ref: DataRef, contributors: int | None) -> str | None:
        return self.disclosure.group_refusal(contributors) if ref.kind == "aggregate" else None

    def _kind_refusal(self, ref: DataRef, recipient: str | None) -> str | None:
        """Why results of this kind may not leave for ``recipient`` at all (kinds, recipients), or None."""
        if ref.kind not in self.policy.kinds:
            allowed = ", ".join(self.policy.kinds) or "none"
            return (
                f"results of kind {ref.kind!r} may not leave this site (allowed kinds: {allowed}); "
                f"reduce the data at the site first ({_REDUCE_HINT.get(ref.kind, _REDUCE_HINT['dataset'])}) and fetch that"
            )
        allowed_clients = self.policy.recipients.get(ref.kind)
        if allowed_clients is not None:
            if recipient is None:
                return (
                    f"results of kind {ref.kind!r} leave this site only for people its policy names, and this "
                    "request carries no authenticated client identity (it was not signed with a certificate of the "
                    "federation); connect with your own federation file or admin kit"
                )
            if recipient not in allowed_clients:
                return (
                    f"client {recipient!r} is not among the clients this site lets receive results of kind "
                    f"{ref.kind!r}; reduce the data at the site first or ask the site's administrator"
                )
        return None

    def check_export(self, ref: DataRef, recipient: str | None = None, contributors: int | None = None) -> None:
        """Raise `ExportRefusedError` (`DisclosureRefusedError` for the disclosure rules) if ``ref`` may not leave."""
        if (reason := self._export_refusal(ref, recipient)) is not None:
            raise ExportRefusedError(f"{ref!r}: {reason}", site=self.site)
        if (reason := self._group_refusal(ref, contributors)) is not None:
            raise DisclosureRefusedError(f"{ref!r}: {reason}", site=self.site)

    def site_refusal(self, ref: DataRef, site: str, contributors: int | None = None) -> str | None:
        """Why ``ref`` may not move to ``site`` (``export.sites``), or None if it may."""
        rule = self.policy.sites.get(site)
        if rule is None:
            named = ", ".join(sorted(self.policy.sites)) or "none"
            return f"this site sends no results to site {site!r} (export.sites names: {named})"
        if ref.kind not in rule.kinds:
            return f"this site sends only {', '.join(rule.kinds)} results to site {site!r} (export.sites.{site}.kinds), not {ref.kind!r}"
        if ref.size > rule.max_bytes:
            return f"the result is {ref.size} bytes and this site sends at most {rule.max_bytes} bytes per result to {site!r} (export.sites.{site}.max_bytes)"
        return None

    def check_site_export(self, ref: DataRef, site: str, contributors: int | None = None) -> None:
        """Raise `ExportRefusedError` (`DisclosureRefusedError` for the disclosure rules) if ``ref`` may not move to ``site``."""
        if (reason := self.site_refusal(ref, site)) is not None:
            raise ExportRefusedError(f"{ref!r} cannot move to site {site!r}: {reason}", site=self.site)
        if (reason := self._group_refusal(ref, contributors)) is not None:
            raise DisclosureRefusedError(f"{ref!r}: {reason}", site=self.site)

    def outgoing_to_site(self, ref: DataRef, site: str) -> DataRef:
        """``ref`` as another site may see it: its full summary only where it may move there."""
        if self.site_refusal(ref, site) is None and self._group_refusal(ref, ref.contributors) is None:
            return ref
        return ref.model_copy(update={"summary": structure_only(ref.summary), "contributors": None})

    def outgoing(self, ref: DataRef, recipient: str | None = None) -> DataRef:
        """``ref`` as the client may see it: the full summary and group count only where the result could leave.

        ``ref.contributors`` is the count the site itself just recorded (the store's
        `put`), not one a client sent.
        """
        if self._kind_refusal(ref, recipient) is None and self._group_refusal(ref, ref.contributors) is None:
            return ref
        return ref.model_copy(update={"summary": structure_only(ref.summary), "contributors": None})

    def check_content(self, ref: DataRef, data: bytes) -> None:
        """Raise `ExportRefusedError` if the bytes about to leave contain one of the site's credentials."""
        if self.redactor.found_in(data):
            raise ExportRefusedError(
                f"{ref!r}: the result contains one of this site's credentials, so it stays here; "
                "ask the site's administrator to check the operation that produced it",
                site=self.site,
            )

    def inline(self, ref: DataRef, payload: bytes | None, store: ResultStore, recipient: str | None = None) -> bytes | None:
        """The bytes to send along with a new result (``ref`` as the store just made it): only allowed results up to ``inline_bytes``.

        Never for a view: its bytes do not exist until something needs them (a fetch materializes it).
        """
        if ref.is_view or ref.size > self.policy.inline_bytes:
            return None
        # The count the store bound into the result's name, never the reference's own field.
        if self.refusal(ref, recipient, store.contributors(ref)) is not None:
            return None
        data = payload if payload is not None else store.read_bytes(ref)
        # A result holding a credential does not come back inline; fetching it says why.
        return None if self.redactor.found_in(data) else data
