"""Retention of the result store: removing what is too old or over quota, oldest first, and refusing what cannot fit.

:func:`plan` is the rule, on the ledger's entries alone (no files, no clock of its
own). :class:`Collector` applies it to a local store: when a result is about to
be stored (:meth:`Collector.admit`, which also refuses one that cannot fit) and
on demand (:meth:`Collector.collect`, which ``dfm-prefect site gc`` runs). Every
step holds the store's lock, so the processes of a site that share a store never
remove the same result twice or let two new results past one free slot.

Example (what ``dfm-prefect site gc north.yaml --dry-run`` does)::

    from site_workers.config import load_site_config
    from site_workers.store import ResultStore

    config = load_site_config("north.yaml")
    report = ResultStore(config.name, config.result_store).retention.collect(dry_run=True)
    print([(r.name, r.why) for r in report.removed], report.usage.bytes)
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from dfm_prefect.core.errors import StoreFullError
from site_workers.ledger import Entry, Ledger
from site_workers.retention_config import RetentionPolicy

ANONYMOUS = "anonymous"
"""The owner of results stored for a client the transport authenticated no identity for."""
UNRECORDED = "unrecorded"
"""The owner of results found in the store that were stored before it kept a ledger."""
RETENTION_REASONS = ("max_age_s", "max_bytes", "max_bytes_per_client")

log = logging.getLogger("dfm_prefect.site.retention")


@dataclass(frozen=True)
class Removal:
    """A result retention removes, and which limit it went for."""

    name: str
    owner: str
    size: int
    at: float
    why: str


@dataclass(frozen=True)
class Usage:
    """What the store holds: bytes and results in all, and bytes per owner."""

    bytes: int
    results: int
    per_client: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    """What a collection removed (or would remove, in a dry run) and what the store holds after it."""

    removed: list[Removal]
    usage: Usage


def plan(
    entries: Iterable[Entry], policy: RetentionPolicy, now: float, incoming: tuple[str, int] | None = None
) -> tuple[list[Removal], bool]:
    """Which results go (expired first, then the oldest of a client over its share, then the oldest over the total),
    and whether ``incoming`` (owner, bytes) then fits. Results younger than ``min_age_s`` go only by age."""
    held = sorted(entries, key=lambda e: e.at)
    removed: list[Removal] = []
    keep: list[Entry] = []
    for entry in held:
        if policy.max_age_s is not None and now - entry.at > policy.max_age_s:
            removed.append(Removal(entry.name, entry.owner, entry.size, entry.at, "max_age_s"))
        else:
            keep.append(entry)
    owner, size = incoming if incoming is not None else ("", 0)
    spare = now - policy.min_age_s

    def shed(candidates: list[Entry], excess: int, why: str) -> int:
        for entry in candidates:
            if excess <= 0:
                break
            if entry.at > spare:
                continue  # too young to go to make room
            keep.remove(entry)
            removed.append(Removal(entry.name, entry.owner, entry.size, entry.at, why))
            excess -= entry.size
        return excess

    fits = True
    if policy.max_bytes_per_client is not None:
        for client in sorted({e.owner for e in keep} | ({owner} if incoming else set())):
            mine = [e for e in keep if e.owner == client]
            excess = sum(e.size for e in mine) + (size if client == owner else 0) - policy.max_bytes_per_client
            if shed(mine, excess, "max_bytes_per_client") > 0 and client == owner:
                fits = False
    if policy.max_bytes is not None:
        excess = sum(e.size for e in keep) + size - policy.max_bytes
        # The client that needs the room gives up its own oldest first, then the oldest of all.
        order = sorted(keep, key=lambda e: (e.owner != owner, e.at)) if incoming else list(keep)
        if shed(order, excess, "max_bytes") > 0:
            fits = False
    return removed, fits


class Collector:
    """Applies a `RetentionPolicy` to one local result store, keeping its ledger (see the module docstring).

    ``names`` lists the result files in the store (for results the ledger does not
    know yet); ``clock`` gives the time results are stamped and judged by.
    """

    def __init__(
        self,
        site: str,
        root: str,
        policy: RetentionPolicy,
        *,
        names: Callable[[], list[str]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.site = site
        self.root = root
        self.policy = policy
        self.ledger = Ledger(root)
        self._names = names
        self.clock = clock
        self._adopted = False

    def usage(self) -> Usage:
        """What the store holds now."""
        if not self._adopted:
            with self.ledger.locked():
                self._adopt()
        self.ledger.refresh()
        return Usage(self.ledger.total, len(self.ledger.live), dict(self.ledger.per_owner))

    def removed_why(self, name: str) -> str | None:
        """Which retention limit removed the result stored as ``name`` (None if retention did not remove it)."""
        self.ledger.refresh()
        gone = self.ledger.gone.get(name)
        return gone.why if gone is not None and gone.why in RETENTION_REASONS else None

    def collect(self, *, dry_run: bool = False) -> Report:
        """Remove every result that is expired or over quota, oldest first; with ``dry_run`` only say which."""
        with self.ledger.locked():
            self._adopt(full=True)
            removals, _ = plan(self.ledger.live.values(), self.policy, self.clock())
            if not dry_run:
                self._remove(removals)
            live = self.ledger.live
            gone = {r.name for r in removals}
            kept = [e for e in live.values() if e.name not in gone]
            per_client: dict[str, int] = {}
            for entry in kept:
                per_client[entry.owner] = per_client.get(entry.owner, 0) + entry.size
            return Report(removals, Usage(sum(e.size for e in kept), len(kept), per_client))

    @contextlib.contextmanager
    def admit(self, name: str, owner: str | None, size: int) -> Iterator[None]:
        """Make room for a new result of ``size`` bytes and record it; the caller writes it inside the block.

        Raises `StoreFullError` (after collecting what was due anyway) when it does
        not fit even then; nothing is recorded and the caller writes nothing.
        """
        client = owner or ANONYMOUS
        with self.ledger.locked():
            if not self._adopted:
                self._adopt()
            now = self.clock()
            removals: list[Removal] = []
            fits = True
            if not self._fits_as_is(client, size, now):
                removals, fits = plan(self.ledger.live.values(), self.policy, now, (client, size))
            if not fits:
                self._remove(plan(self.ledger.live.values(), self.policy, now)[0])
                raise StoreFullError(self._full_message(client, size), site=self.site)
            self._remove(removals)
            try:
                self.ledger.append({"put": name, "owner": client, "at": now, "size": size})
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                raise StoreFullError(f"the disk of the result store is full ({exc.strerror}); nothing was stored", site=self.site) from None
            try:
                yield
            except BaseException:
                self.ledger.append({"drop": name})
                raise

    def _fits_as_is(self, client: str, size: int, now: float) -> bool:
        """True when nothing is due and the new result fits: the common case, decided without a pass over the results."""
        policy, ledger = self.policy, self.ledger
        oldest = next(iter(ledger.live.values()), None)
        if policy.max_age_s is not None and oldest is not None and now - oldest.at > policy.max_age_s:
            return False
        if policy.max_bytes is not None and ledger.total + size > policy.max_bytes:
            return False
        limit = policy.max_bytes_per_client
        return limit is None or ledger.per_owner.get(client, 0) + size <= limit

    def forget(self, name: str) -> None:
        """Record that the site itself removed ``name`` (not retention)."""
        with self.ledger.locked():
            if name in self.ledger.live:
                self.ledger.append({"drop": name})

    def _full_message(self, client: str, size: int) -> str:
        policy, ledger = self.policy, self.ledger
        if policy.max_bytes_per_client is not None and ledger.per_owner.get(client, 0) + size > policy.max_bytes_per_client:
            held, limit, key = ledger.per_owner.get(client, 0), policy.max_bytes_per_client, "max_bytes_per_client"
            whose = f"client {client!r}'s share of the result store"
        else:
            held, limit, key, whose = ledger.total, policy.max_bytes or 0, "max_bytes", "the result store"
        return (
            f"{whose} is full: a new result of {size:,} bytes does not fit next to the {held:,} bytes held "
            f"(result_store.retention.{key}: {limit:,} bytes), and nothing more may be removed (results younger than min_age_s = "
            f"{policy.min_age_s:g} s stay); nothing was stored. Make the result smaller, wait for older results "
            "to expire, or ask the site's administrator to raise result_store.retention"
        )

    def _remove(self, removals: list[Removal]) -> None:
        if not removals:
            return
        now = self.clock()
        records = [{"gone": r.name, "why": r.why, "at": now} for r in removals]
        # Recorded before the files go: a crash in between leaves a file that the next collection removes.
        # On a full disk the record may not fit until the files are gone: then the files go first.
        try:
            self.ledger.append(*records)
            recorded = True
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            recorded = False
        for removal in removals:
            try:
                os.remove(os.path.join(self.root, removal.name))
            except FileNotFoundError:
                pass
            except OSError as exc:  # not a file the site wrote (a directory, say): leave it, say so
                log.warning("%s: could not remove %s: %s", self.root, removal.name, exc)
        if not recorded:
            self.ledger.append(*records)
        self.ledger.compact()

    def renew(self, name: str) -> bool:
        """Stamp a held result as used now (a cached answer handed out again), so ``min_age_s`` protects it
        as a new one; False if the store no longer holds it."""
        with self.ledger.locked():
            if name not in self.ledger.live:
                return False
            self.ledger.append({"use": name, "at": self.clock()})
            return True

    def _adopt(self, *, full: bool = False) -> None:
        """Take results the ledger does not know into it (stamped with their file's modification time);
        with ``full``, also finish removals a crash interrupted and forget results whose file is gone."""
        names = set(self._names())
        ledger = self.ledger
        found = []
        for name in names - set(ledger.live):
            path = os.path.join(self.root, name)
            if name in ledger.gone:
                if full:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                continue
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                found.append(Entry(name, UNRECORDED, st.st_mtime, st.st_size))
        ledger.adopt(found)
        if full:
            # Under the lock no result is half-written, so a recorded result without its file is gone.
            missing = [name for name in ledger.live if name not in names]
            if missing:
                ledger.append(*({"drop": name} for name in missing))
        self._adopted = True
