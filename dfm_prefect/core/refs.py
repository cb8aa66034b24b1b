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

import hashlib
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from dfm_prefect.core.codecs import decode
from dfm_prefect.core.errors import FederationError, ResultIntegrityError

Fetcher = Callable[["DataRef", Any], tuple[bytes, str]]
"""Streams a reference's bytes and digest salt from its site: ``fetcher(ref, client_or_None)``."""

_FETCHER: list[Fetcher] = []


def set_fetcher(fetcher: Fetcher) -> None:
    """Register how references are fetched (the client core does, when it is imported)."""
    _FETCHER[:] = [fetcher]

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
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of a per-result secret salt and the bytes; the site sends the salt only with the bytes, "
        "so the digest of a result that stays confirms no guess of its content.",
    )
    op: str = Field(description="The operation that produced it.")
    summary: dict[str, Any] = Field(
        default_factory=dict,
        description="Shape of the result: for xarray dims, coords, variables, dtypes (only names and dtypes "
        "where the site's policy keeps results of this kind in).",
    )
    contributors: int | None = Field(
        default=None,
        ge=0,
        description="For an aggregate: how many records or cells the site counted in its smallest non-empty "
        "group (None where the site does not release it). The site decides on its own record, never on this field.",
    )

    _payload: bytes | None = PrivateAttr(default=None)
    _salt: str = PrivateAttr(default="")

    def __repr__(self) -> str:
        return f"DataRef({self.kind} {self.op}@{self.site}, {self.size} bytes, sha256={self.sha256[:12]})"

    __str__ = __repr__

    @property
    def is_local(self) -> bool:
        """True when the value already came back with the result (no fetch needed)."""
        return self._payload is not None

    def attach_payload(self, payload: bytes, salt: str = "") -> None:
        """Keep the encoded value (and its digest salt) that the site sent along with this reference."""
        self._payload = payload
        self._salt = salt

    @property
    def salt(self) -> str:
        """The digest salt the site sent with the bytes (hex), once they came; empty before."""
        return self._salt

    def fetch(self, client: Any = None) -> Any:
        """Return the value behind this reference, if the site's export policy allows it.

        The value comes from the payload the site already sent back when there is
        one; otherwise it is streamed from the site in chunks and counted. Raises
        :class:`~dfm_prefect.core.errors.ExportRefusedError` naming the policy rule that
        refuses it.
        """
        return decode(self.format, self.fetch_bytes(client))

    def fetch_bytes(self, client: Any = None) -> bytes:
        """Like :meth:`fetch` but returns the encoded bytes (netCDF, parquet or JSON)."""
        if self._payload is None:
            if not _FETCHER:
                raise FederationError("no federation client is loaded here to fetch this reference: import dfm_prefect.client")
            self._payload, self._salt = _FETCHER[0](self, client)
        return self._payload


def check_integrity(ref: DataRef, data: bytes, salt: str | None = None) -> bytes:
    """``data`` if it is exactly the stored result ``ref`` names (size and salted sha256), else `ResultIntegrityError`.

    ``salt`` is the hex salt the site sent with the bytes (default: the one kept on
    ``ref``). The site verifies what it reads from its store; this check, end to
    end, also covers what happened to the bytes on the way.
    """
    key = bytes.fromhex(ref.salt if salt is None else salt)
    if len(data) != ref.size or hashlib.sha256(key + data).hexdigest() != ref.sha256:
        raise ResultIntegrityError(
            f"the bytes received for {ref!r} do not match its size and sha256; fetch it again", site=ref.site
        )
    return data
