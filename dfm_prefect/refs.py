"""References to results that stay on their site.

An operation's result is written to the site's result store and the client gets a
:class:`DataRef`: where the result lives, how big it is, its sha256 and a short
summary of its shape. A later operation on the same site reads it in place; the
bytes only travel when the site's export policy allows it.

Example:

```python
from prefect import flow
from adapters.xarray_ops import subset, moments
from dfm_prefect import FederationTaskRunner

@flow(task_runner=FederationTaskRunner("federation.json"))
def stats():
    box = subset.submit(data="north/temperature", time=["2001", "2002"])  # DataRef
    agg = moments.submit(data=box, dims=["lat", "lon"])                  # same site
    return agg.result().fetch()                                          # by value, if allowed
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

if TYPE_CHECKING:
    from dfm_prefect.client import FederationClient

ResultKind = Literal["value", "aggregate", "dataset", "table"]
"""What a result is, which is what export policies decide on.

``value``: small JSON data. ``aggregate``: statistics that no longer hold
row- or pixel-level data (sums, counts, histograms). ``dataset``: gridded data
(xarray). ``table``: tabular data (parquet).
"""


class DataRef(BaseModel):
    """A result held in a site's result store."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str = Field(description="The site that holds the result.")
    uri: str = Field(description="Location in the site's result store (site-private).")
    kind: ResultKind
    format: str = Field(description="How the value is encoded: json, netcdf, parquet or npy.")
    size: int = Field(ge=0, description="Stored size in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    op: str = Field(description="The operation that produced it.")
    summary: dict[str, Any] = Field(
        default_factory=dict,
        description="Shape of the result: for xarray dims, coords, variables, dtypes.",
    )

    _payload: bytes | None = PrivateAttr(default=None)

    def __repr__(self) -> str:
        return f"DataRef({self.kind} {self.op}@{self.site}, {self.size} bytes, sha256={self.sha256[:12]})"

    __str__ = __repr__

    @property
    def is_local(self) -> bool:
        """True when the value already came back with the result (no fetch needed)."""
        return self._payload is not None

    def attach_payload(self, payload: bytes) -> None:
        """Keep the encoded value that the site sent along with this reference."""
        self._payload = payload

    def fetch(self, client: FederationClient | None = None) -> Any:
        """Return the value behind this reference, if the site's export policy allows it.

        The value comes from the payload the site already sent back when there is
        one; otherwise it is streamed from the site in chunks and counted. Raises
        :class:`~dfm_prefect.errors.ExportRefusedError` naming the policy rule that
        refuses it.
        """
        from dfm_prefect.codecs import decode

        return decode(self.format, self.fetch_bytes(client))

    def fetch_bytes(self, client: FederationClient | None = None) -> bytes:
        """Like :meth:`fetch` but returns the encoded bytes (netCDF, parquet or JSON)."""
        from dfm_prefect.client import current_client, note_fetch

        if self._payload is None:
            active = client or current_client()
            self._payload = active.fetch_bytes(self)
            note_fetch(self.site, len(self._payload))
        return self._payload
