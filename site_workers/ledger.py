"""The result store's ledger: who stored each result, when, how large, and which results retention removed.

One append-only JSON-lines file in the store (``.retention/ledger.jsonl``, mode
0600, beside a lock file), shared by every process of the site that uses the
store. A process appends only while it holds the store's lock (``flock``, which
also excludes the other threads of the same process), and keeps its picture of
the ledger current by reading only what was appended since it last looked, so
recording a new result never lists the store. A removal leaves a record behind
(why it went and when), which is how the site can tell a user that a result was
collected rather than lost.

Records::

    {"put": "<name>", "owner": "alice@lab.example", "at": 1767225600.0, "size": 1234}
    {"gone": "<name>", "why": "max_age_s", "at": 1767312000.0}
    {"drop": "<name>"}   # removed by the site itself (a copy it made for a refused fetch)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dfm_prefect.site.retention")
_PRIVATE_DIR = 0o700
_PRIVATE_FILE = 0o600
_HEAD = 64
"""Bytes of the ledger's start that tell one rewrite from another (with its inode)."""
KEEP_GONE = 100_000
"""How many removals the ledger remembers (to say why a result is missing)."""
COMPACT_SLACK = 10_000
"""Records of history (beyond four per result held or remembered) the ledger carries before it is rewritten."""


@dataclass(frozen=True)
class Entry:
    """One result the ledger knows: its owner (the client whose run stored it), when it was stored, its bytes."""

    name: str
    owner: str
    at: float
    size: int


@dataclass(frozen=True)
class Gone:
    """Why and when retention removed a result."""

    why: str
    at: float


class Ledger:
    """The ledger of one local result store (see the module docstring)."""

    def __init__(self, root: str) -> None:
        self.folder = os.path.join(root, ".retention")
        os.makedirs(self.folder, mode=_PRIVATE_DIR, exist_ok=True)
        self.path = os.path.join(self.folder, "ledger.jsonl")
        self._lock_path = os.path.join(self.folder, "lock")
        self._mutex = threading.RLock()
        self.live: OrderedDict[str, Entry] = OrderedDict()
        """Results held, oldest first."""
        self.gone: OrderedDict[str, Gone] = OrderedDict()
        self.total = 0
        self.per_owner: dict[str, int] = {}
        self._offset = 0
        self._inode: int | None = None
        self._head = b""
        self._lines = 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (against other processes and threads) with the ledger read up to date."""
        with self._mutex:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, _PRIVATE_FILE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self.refresh()
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def refresh(self) -> None:
        """Read what other processes appended since this one last looked (all of it if the ledger was rewritten)."""
        with self._mutex:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return
            with os.fdopen(fd, "rb") as handle:
                st = os.fstat(handle.fileno())
                # A rewrite is a new file; the inode alone may be reused at once, so its first line must match too.
                head = os.pread(handle.fileno(), _HEAD, 0)
                if st.st_ino != self._inode or st.st_size < self._offset or (self._offset and head[: len(self._head)] != self._head):
                    self._reset(st.st_ino)
                handle.seek(self._offset)
                data = handle.read()
                if not self._offset:
                    self._head = os.pread(handle.fileno(), _HEAD, 0)
            complete = data.rfind(b"\n") + 1  # a line still being written is read next time
            for line in data[:complete].splitlines():
                if line.strip():
                    try:
                        self._apply(json.loads(line))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        # What a process that died mid-write left, or a damaged line; the result it named
                        # is found again by the next `site gc` (as unrecorded) rather than blocking every later record.
                        log.warning("%s: skipped a damaged record: %r", self.path, line[:200])
            self._offset += complete

    def append(self, *records: dict[str, Any]) -> None:
        """Record ``records`` (only while holding :meth:`locked`), and apply them here."""
        data = b"".join(json.dumps(record, separators=(",", ":")).encode() + b"\n" for record in records)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, _PRIVATE_FILE)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":
                data = b"\n" + data  # a record cut short by a crash stays a line of its own
            os.write(fd, data)
        finally:
            os.close(fd)
        self.refresh()

    def adopt(self, entries: list[Entry]) -> None:
        """Record results found in the store that the ledger does not know (stored before it kept one)."""
        if entries:
            self.append(*({"put": e.name, "owner": e.owner, "at": e.at, "size": e.size} for e in entries))
            self.live = OrderedDict(sorted(self.live.items(), key=lambda item: item[1].at))

    def compact(self) -> None:
        """Rewrite the ledger with only what it still needs (while holding :meth:`locked`), once it is mostly history."""
        if self._lines <= 4 * (len(self.live) + len(self.gone)) + COMPACT_SLACK:
            return
        records: list[dict[str, Any]] = [{"rewritten": secrets.token_hex(8)}]  # each rewrite starts with its own line
        records += [{"gone": name, "why": g.why, "at": g.at} for name, g in self.gone.items()]
        records += [{"put": e.name, "owner": e.owner, "at": e.at, "size": e.size} for e in self.live.values()]
        fresh = f"{self.path}.new"
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _PRIVATE_FILE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records))
        os.replace(fresh, self.path)
        self.refresh()

    def _reset(self, inode: int) -> None:
        self.live.clear()
        self.gone.clear()
        self.per_owner.clear()
        self.total, self._offset, self._inode, self._lines = 0, 0, inode, 0

    def _apply(self, record: dict[str, Any]) -> None:
        self._lines += 1
        if "rewritten" in record:
            return
        if "use" in record:
            used = self.live.pop(str(record["use"]), None)
            if used is not None:  # handed out again: as young as a new result
                self.live[used.name] = Entry(used.name, used.owner, float(record["at"]), used.size)
            return
        if "put" in record:
            name = str(record["put"])
            if name not in self.live:
                entry = Entry(name, str(record["owner"]), float(record["at"]), int(record["size"]))
                self.live[name] = entry
                self._count(entry, +1)
            return
        name = str(record.get("gone") or record.get("drop"))
        gone = self.live.pop(name, None)
        if gone is not None:
            self._count(gone, -1)
        if "gone" in record:
            self.gone[name] = Gone(str(record["why"]), float(record["at"]))
            while len(self.gone) > KEEP_GONE:
                self.gone.popitem(last=False)

    def _count(self, entry: Entry, sign: int) -> None:
        self.total += sign * entry.size
        held = self.per_owner.get(entry.owner, 0) + sign * entry.size
        if held:
            self.per_owner[entry.owner] = held
        else:
            self.per_owner.pop(entry.owner, None)
