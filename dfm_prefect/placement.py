"""Choosing the site for a task run.

The rules, in order:

1. the site the flow author named (``site=`` on the call); inputs held
   elsewhere move there;
2. the site that holds the task's `DataRef` inputs, when it offers the
   operation; otherwise (inputs on several sites, or the operation offered
   elsewhere) the site that moves the fewest bytes, weighted by the link costs
   the federation file declares, among those whose policies allow every move it
   needs (the holder's ``export.sites``, the receiver's ``imports``);
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
    """Where a task run goes and why; ``moves`` are its inputs that must come from other sites first."""

    site: str
    reason: str
    moves: tuple[DataRef, ...] = ()


LinkCosts = Mapping[str, float]
"""Relative cost per byte of a link, by ``"from->to"`` (``"north->gpu-hub": 4.0``); 1.0 where not declared."""


def move_refusal(ref: DataRef, to: str, sites: Mapping[str, SiteInfo]) -> str | None:
    """Why ``ref`` cannot move to site ``to`` by the two sites' published policies, or None if it can."""
    source, target = sites.get(ref.site), sites.get(to)
    if source is None:
        return f"its holder {ref.site!r} is not available"
    if target is None:
        return f"site {to!r} is not available"
    out = source.export.sites.get(to)
    if out is None or ref.kind not in out.kinds or ref.size > out.max_bytes:
        return f"{ref.site} does not send {ref.kind} results of {ref.size:,} bytes to {to} (its export.sites)"
    accepted = target.export.imports.get(ref.site)
    if accepted is None or ref.kind not in accepted.kinds or ref.size > accepted.max_bytes:
        return f"{to} does not accept {ref.kind} results of {ref.size:,} bytes from {ref.site} (its imports)"
    return None


def _weighted(refs: list[DataRef], to: str, links: LinkCosts) -> tuple[int, float]:
    moved = [ref for ref in refs if ref.site != to]
    return sum(ref.size for ref in moved), sum(ref.size * links.get(f"{ref.site}->{to}", 1.0) for ref in moved)


def _by_bytes(
    op: str, refs: list[DataRef], candidates: list[str], sites: Mapping[str, SiteInfo], links: LinkCosts,
    inflight: Mapping[str, int], why: str,
) -> Placement:
    """The candidate that moves the fewest (weighted) bytes among those whose policies allow every move."""
    allowed: dict[str, tuple[int, float]] = {}
    told = []
    for site in sorted(candidates):
        refusals = [reason for ref in refs if ref.site != site and (reason := move_refusal(ref, site, sites))]
        moved, cost = _weighted(refs, site, links)
        if refusals:
            told.append(f"{site}: {refusals[0]}")
        else:
            allowed[site] = (moved, cost)
            told.append(f"{site}: moves {moved:,} bytes" + (f" (cost {cost:,.0f})" if cost != moved else ""))
    if not allowed:
        raise PlacementError(f"{op!r} {why}, and no site it could run at may receive its inputs: " + "; ".join(told))
    site = min(allowed, key=lambda name: (allowed[name][1], inflight.get(name, 0), name))
    moves = tuple(ref for ref in refs if ref.site != site)
    return Placement(site, f"{why}: {site} moves the fewest bytes ({'; '.join(told)})", moves)


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
    links: LinkCosts | None = None,
) -> Placement:
    """Pick the site for one call of ``op``; ``data`` are the values of its data parameters."""
    inflight = inflight or {}
    links = links or {}
    offering = {name for name, info in sites.items() if op in info.operations}
    described = ", ".join(f"{name} ({'offers' if name in offering else 'does not offer'} {op})" for name in sorted(sites))

    if explicit is not None:
        if explicit not in sites:
            raise PlacementError(f"site {explicit!r} is not in the federation (or not healthy); sites: {described or 'none'}")
        if explicit not in offering:
            raise PlacementError(f"site {explicit!r} does not offer {op!r}; sites: {described}")
        # The sites' own rules decide on the moves (and say which rule refuses).
        moving = tuple(ref for ref in refs_in(list(data)) if ref.site != explicit)
        if moving:
            moved, _ = _weighted(list(moving), explicit, links)
            return Placement(explicit, f"named by the flow; its inputs from {', '.join(sorted({r.site for r in moving}))} move there ({moved:,} bytes)", moving)
        return Placement(explicit, "named by the flow")

    values = list(data)
    refs = refs_in(values)
    if refs:
        holders = {ref.site for ref in refs}
        for holder in holders:
            if holder not in sites:
                raise PlacementError(f"an input of {op!r} is held by site {holder!r}, which is not available now")
        if len(holders) == 1 and (holder := next(iter(holders))) in offering:
            return Placement(holder, "holds the DataRef inputs")
        if not offering:
            raise PlacementError(f"no site offers {op!r}; sites: {described or 'none'}")
        why = (
            f"takes inputs held by {', '.join(sorted(holders))}"
            if len(holders) > 1
            else f"takes inputs held by {next(iter(holders))}, which does not offer it"
        )
        preferred = sorted(offering - set(exclude)) or sorted(offering)
        return _by_bytes(op, refs, preferred, sites, links, inflight, why)

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
