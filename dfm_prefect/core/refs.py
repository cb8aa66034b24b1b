"""References to results that stay on their site.

An operation's result stays at its site and the client gets a :class:`DataRef`:
where the result lives, how big it is, its sha256 and a short summary of its
shape. A later operation on the same site reads it in place; the bytes only
travel when the site's export policy allows it.

A gridded intermediate (a subset, a derived variable) is a **view**: the site
records how to produce it (:class:`Recipe`: the operation, its validated
parameters, a fingerprint of each data source it read) instead of writing a copy,
and a later operation on the view recomputes it as part of its own lazy graph, so
``subset → derive → moments`` reads each needed chunk of the source once. A view
is written out (materialized, with its sha256) only when its bytes are needed:
when it is fetched or when ``xarray.write`` stores it. Every result carries its
recipe, a lineage people can read (:meth:`DataRef.lineage`).

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
import json
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

VIEW_SCHEME = "view:"
"""The ``uri`` prefix of a view: a result its site recomputes from its recipe."""

ResultKind = Literal["value", "aggregate", "dataset", "table"]
"""What a result is, which is what export policies decide on.

``value``: small JSON data. ``aggregate``: statistics that no longer hold
row- or pixel-level data (sums, counts, histograms). ``dataset``: gridded data
(xarray). ``table``: tabular data (parquet).
"""


class Recipe(BaseModel):
    """How a result was made: the operation, its validated parameters and what it read.

    The parameters hold the operation's inputs as the client sent them: data
    source names, or the `DataRef`s of earlier results with their own recipes, so
    a recipe is the whole chain back to the sources. ``sources`` has, for a view,
    one fingerprint per data source the step read (sizes and modification stamps
    of its files, keyed with a secret of the site so it says nothing else); the
    site checks them before it recomputes the view.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: str = Field(max_length=256)
    version: str = Field(max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="Data source read -> its fingerprint when read (for a view; '' for a stored result or where the site has none).",
    )

    def lineage(self, width: int = 120) -> str:
        """One line per step, sources first: ``source → op(params) → op(params)``."""
        steps: list[str] = []
        _lineage(self, steps, width)
        return " → ".join(steps)


def _is_ref(value: Any) -> bool:
    return isinstance(value, dict) and {"site", "uri", "op"} <= set(value)


def _lineage(recipe: Recipe, steps: list[str], width: int) -> None:
    shown = []
    for key, value in recipe.params.items():
        items = value if isinstance(value, list) and value and all(_is_ref(v) or isinstance(v, str) for v in value) else [value]
        if all(_is_ref(item) or (isinstance(item, str) and item in recipe.sources) for item in items):
            for item in items:
                if isinstance(item, str):
                    steps.append(item)
                elif isinstance(inner := item.get("recipe"), dict):
                    _lineage(Recipe.model_validate(inner), steps, width)
                else:
                    steps.append(f"{item.get('op')}@{item.get('site')}")
                if recipe.op == "dfm.move" and isinstance(item, dict):
                    shown.append(f"from={item.get('site')}")
            continue
        text = json.dumps(value, separators=(",", ":"), default=str)
        shown.append(f"{key}={text if len(text) <= width else text[: width - 1] + '…'}")
    steps.append(f"{recipe.op}({', '.join(shown)})")


class DataRef(BaseModel):
    """A result held at a site: stored in its result store, or a view it recomputes on use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str = Field(description="The site that holds the result.")
    uri: str = Field(description="Location in the site's result store (site-private); ``view:<id>`` for a view.")
    kind: ResultKind
    format: str = Field(description="How the value is encoded: json, netcdf, parquet or npy.")
    size: int = Field(
        ge=0,
        description="Stored size in bytes; for a view, its size in memory (about what fetching or moving it would "
        "carry; the site materializes it first).",
    )
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of a per-result secret salt and the bytes; the site sends the salt only with the bytes, "
        "so the digest of a result that stays confirms no guess of its content. For a view: the site's keyed "
        "digest of its site, kind, format, operation, size and recipe, so a client cannot alter what the view stands for.",
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

    recipe: Recipe | None = Field(default=None, description="How the result was made (its lineage back to the sources).")

    _payload: bytes | None = PrivateAttr(default=None)
    _salt: str = PrivateAttr(default="")

    def __repr__(self) -> str:
        if self.is_view:
            return f"DataRef({self.kind} view {self.op}@{self.site}, ~{self.size} bytes in memory, id={self.uri[5:17]})"
        return f"DataRef({self.kind} {self.op}@{self.site}, {self.size} bytes, sha256={self.sha256[:12]})"

    __str__ = __repr__

    @property
    def is_view(self) -> bool:
        """True when the site holds a recipe, not bytes: it recomputes the result where it is used."""
        return self.uri.startswith(VIEW_SCHEME)

    def lineage(self) -> str:
        """What was done to which source, as one readable line (``op@site`` where no recipe came along)."""
        return self.recipe.lineage() if self.recipe is not None else f"{self.op}@{self.site}"

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
