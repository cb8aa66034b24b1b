"""Choosing the site for a task run.

The rules, in order:

1. the site the flow author named (``site=`` on the call);
2. the site that holds the task's `DataRef` inputs;
3. the site whose catalog owns the data named in the parameters
   (``dfm://site/source``, a source name, or a URL under a source's URL);
4. the only site that offers the operation;
5. otherwise the least loaded healthy site among those that offer it (with the
   data, when data was named), or a `PlacementError` listing the candidates.

Sites in ``exclude`` (those that failed an earlier attempt) are avoided when
another candidate exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from dfm_prefect.core.errors import PlacementError
from dfm_prefect.core.refs import DataRef
from dfm_prefect.core.wire import SiteInfo


@dataclass(frozen=True)
class Placement:
    """Where a task run goes and why."""

    site: str
    reason: str


def _norm(url: str) -> str:
    if "://" not in url and url.startswith("/"):
        url = "file://" + url
    return url.rstrip("/")


def owners(data: str, sites: Mapping[str, SiteInfo]) -> set[str]:
    """The sites whose catalog holds the data named by ``data``."""
    if data.startswith("dfm://"):
        site = urlsplit(data).netloc
        return {site} if site in sites else set()
    if "://" not in data and not data.startswith("/"):
        return {name for name, info in sites.items() if any(s.name == data for s in info.sources)}
    wanted = _norm(data)
    found = set()
    for name, info in sites.items():
        for source in info.sources:
            root = _norm(source.url)
            if wanted == root or wanted.startswith(root + "/"):
                found.add(name)
    return found


def refs_in(values: Iterable[object]) -> list[DataRef]:
    """Every `DataRef` in the values (looking inside lists, tuples and dicts)."""
    found: list[DataRef] = []
    for value in values:
        if isinstance(value, DataRef):
            found.append(value)
        elif isinstance(value, (list, tuple, set)):
            found.extend(refs_in(value))
        elif isinstance(value, dict):
            found.extend(refs_in(value.values()))
    return found


def _strings_in(values: Iterable[object]) -> list[str]:
    found: list[str] = []
    for value in values:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(_strings_in(value))
    return found


def place(
    op: str,
    *,
    data: Iterable[object],
    sites: Mapping[str, SiteInfo],
    explicit: str | None = None,
    inflight: Mapping[str, int] | None = None,
    exclude: Iterable[str] = (),
) -> Placement:
    """Pick the site for one call of ``op``; ``data`` are the values of its data parameters."""
    inflight = inflight or {}
    offering = {name for name, info in sites.items() if op in info.operations}
    described = ", ".join(f"{name} ({'offers' if name in offering else 'does not offer'} {op})" for name in sorted(sites))

    if explicit is not None:
        if explicit not in sites:
            raise PlacementError(f"site {explicit!r} is not in the federation (or not healthy); sites: {described or 'none'}")
        if explicit not in offering:
            raise PlacementError(f"site {explicit!r} does not offer {op!r}; sites: {described}")
        return Placement(explicit, "named by the flow")

    values = list(data)
    refs = refs_in(values)
    if refs:
        holders = {ref.site for ref in refs}
        if len(holders) > 1:
            raise PlacementError(
                f"{op!r} takes DataRefs held by different sites ({sorted(holders)}); an operation runs at one "
                "site, so reduce each input at its own site first"
            )
        holder = holders.pop()
        if holder not in sites:
            raise PlacementError(f"the input {refs[0]!r} is held by site {holder!r}, which is not available now")
        if holder not in offering:
            raise PlacementError(f"the input {refs[0]!r} is held by site {holder!r}, which does not offer {op!r}")
        return Placement(holder, "holds the DataRef inputs")

    named = _strings_in(values)
    if named:
        candidates: set[str] | None = None
        for item in named:
            holders = owners(item, sites)
            if not holders:
                raise PlacementError(f"no site in the federation holds data {item!r}; sites: {described or 'none'}")
            candidates = holders if candidates is None else candidates & holders
        assert candidates is not None
        with_op = candidates & offering
        if not with_op:
            raise PlacementError(
                f"the data {named} is held by {sorted(candidates) or 'no single site'}, "
                f"but none of those offers {op!r}; sites: {described}"
            )
        return _least_loaded(with_op, inflight, exclude, "owns the data")

    if not offering:
        raise PlacementError(f"no site offers {op!r}; sites: {described or 'none'}")
    if len(offering) == 1:
        return Placement(next(iter(offering)), f"the only site that offers {op}")
    return _least_loaded(offering, inflight, exclude, f"least loaded of the sites that offer {op}")


def _least_loaded(candidates: set[str], inflight: Mapping[str, int], exclude: Iterable[str], reason: str) -> Placement:
    excluded = set(exclude)
    preferred = candidates - excluded or candidates
    site = min(sorted(preferred), key=lambda name: inflight.get(name, 0))
    return Placement(site, reason if len(candidates) == 1 else f"{reason} ({len(candidates)} candidates)")
