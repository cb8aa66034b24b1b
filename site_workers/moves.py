"""Moves: this site pulls a result held by another site, under both sites' policies, never through the client.

A flow asks the receiving site to run ``dfm.move`` with the reference; the
request is signed by the person running the flow, for this site. This site then:

1. checks its own ``imports`` rule for the holding site (kinds, bytes per
   result, its quota for moved-in results) before asking for a byte;
2. fetches the result from the holding site in pieces, each request carrying
   the person's signed ``dfm.move`` request as a *grant*; the holding site
   checks the grant (signed for this site, naming that result), who is asking
   (this site, as the transport authenticated it) and its ``export.sites`` rule,
   before it sends a byte (a view is materialized there first);
3. writes the pieces to a private scratch file as they come (at most
   ``window`` pieces in flight: memory stays bounded whatever the size), checks
   size and sha256 of the whole against what the holding site recorded, and only
   then stores it (as ``<id>.<kind>-moved.<format>``). A piece that does not
   fit, a damaged result or a holding site that stops answering leaves nothing
   stored.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import uuid
from collections import deque
from typing import Any

from dfm_prefect.core.errors import (
    AuthenticationError,
    ExportRefusedError,
    FederationError,
    InvalidParametersError,
    ResultIntegrityError,
)
from dfm_prefect.core.operations import MOVE, MOVE_OPERATION, OperationContext
from dfm_prefect.core.refs import DataRef, Recipe
from dfm_prefect.core.wire import FetchChunk, FetchRequest, RunRequest, b64decode
from site_workers.config import ImportPolicy
from site_workers.peers import Answer, Peers
from site_workers.store import ResultStore

MOVE_VERSION = MOVE.version
PIECE_BYTES = 4 << 20
"""Bytes per fetch of a move (each piece is one request and one answer)."""


class Mover:
    """Pulls results from other sites into this site's store."""

    def __init__(
        self,
        site: str,
        policy: ImportPolicy,
        store: ResultStore,
        peers: Peers | None,
        *,
        piece_bytes: int = PIECE_BYTES,
        window: int = 4,
        timeout: float = 300.0,
    ) -> None:
        self.site = site
        self.policy = policy
        self._store = store
        self.peers = peers
        self.piece_bytes = piece_bytes
        self.window = window
        self.timeout = timeout
        self._lock = threading.Lock()
        self._reserved = 0
        """Bytes of moves under way, counted against the quota until they are stored or dropped."""

    def refusal(self, ref: DataRef, size: int, reserved: int = 0) -> str | None:
        """Why this site will not take ``ref`` (``size`` bytes) from its holder, or None.

        ``reserved``: what this move already counts against the quota (its first estimate).
        """
        source = ref.site
        rule = self.policy.sites.get(source)
        if rule is None:
            named = ", ".join(sorted(self.policy.sites)) or "none"
            return f"this site accepts no results from site {source!r} (imports.sites names: {named})"
        if ref.kind not in rule.kinds:
            return f"this site accepts only {', '.join(rule.kinds)} results from site {source!r} (imports.sites.{source}.kinds), not {ref.kind!r}"
        if size > rule.max_bytes:
            return f"the result is {size} bytes and this site accepts at most {rule.max_bytes} bytes per result from {source!r} (imports.sites.{source}.max_bytes)"
        held = self._store.moved_bytes() + self._reserved - reserved
        if held + size > self.policy.quota_bytes:
            return (
                f"this site's store holds {held} bytes of results from other sites and takes at most "
                f"{self.policy.quota_bytes} (imports.quota_bytes); the result is {size} bytes"
            )
        return None

    def pull(self, grant: RunRequest, ref: DataRef, ctx: OperationContext, *, owner: str | None = None) -> DataRef:
        """Bring ``ref`` here under ``grant`` (the signed ``dfm.move`` request); return this site's stored copy.

        ``owner``: the client the copy is stored for (its share of the store's retention limits).
        """
        if ref.site == self.site:
            raise InvalidParametersError(f"{ref!r} is already held by site {self.site!r}: there is nothing to move", site=self.site)
        if grant.auth is None:
            raise AuthenticationError(
                "a move is made only for a signed request (the holding site checks who asked it): connect with your own "
                "certificate (a FLARE admin kit, or cert/key in a local federation file)",
                site=self.site,
            )
        if self.peers is None:
            raise FederationError(f"site {self.site!r} cannot reach other sites: its transport gave it no way to", site=self.site)
        with self._lock:
            reason = self.refusal(ref, ref.size)
            if reason is not None:
                raise ExportRefusedError(f"{ref!r} cannot move to site {self.site!r}: {reason}", site=self.site)
            self._reserved += ref.size  # concurrent moves count against the quota before they are stored
        try:
            with tempfile.TemporaryDirectory(prefix="dfm-move-", dir=self._store.scratch()) as scratch:
                path = os.path.join(scratch, uuid.uuid4().hex)
                held = self._receive(grant, ref, path, ctx)
                ctx.log.info("moved %s from %s: %s bytes", held.op, ref.site, f"{held.size:,}")
                recipe = Recipe(op=MOVE_OPERATION, version=MOVE_VERSION, params={"ref": ref.model_dump(mode="json", exclude={"summary"})})
                return self._store.put_file(path, kind=held.kind, format=held.format, op=MOVE_OPERATION, summary=held.summary, recipe=recipe, owner=owner)
        finally:
            with self._lock:
                self._reserved -= ref.size

    def _ask(self, ref: DataRef, target: DataRef, offset: int, grant: RunRequest) -> Answer:
        assert self.peers is not None
        request = FetchRequest(id=uuid.uuid4().hex, ref=target, offset=offset, length=self.piece_bytes, grant=grant)
        return self.peers.submit(ref.site, request, self.timeout)

    def _receive(self, grant: RunRequest, ref: DataRef, path: str, ctx: OperationContext) -> DataRef:
        """Fetch the whole result into ``path``; the reference the bytes belong to (the holder's stored copy)."""
        first = self._ask(ref, ref, 0, grant).result()
        if not isinstance(first, FetchChunk):
            raise ResultIntegrityError(f"site {ref.site!r} answered a fetch with {first.kind!r}", site=ref.site)
        target = ref
        if first.materialized is not None and ref.is_view:
            copy = first.materialized
            if copy.site != ref.site or copy.is_view or (copy.kind, copy.format) != (ref.kind, ref.format):
                raise ResultIntegrityError(f"site {ref.site!r} answered the fetch of {ref!r} with {copy!r}", site=ref.site)
            target = copy
        total = first.total
        if total != target.size or (target is ref and ref.is_view):
            raise ResultIntegrityError(f"site {ref.site!r} says {target!r} has {total} bytes", site=ref.site)
        reason = self.refusal(ref, total, reserved=ref.size)  # on the size the holder reports
        if reason is not None:
            raise ExportRefusedError(f"{ref!r} cannot move to site {self.site!r}: {reason}", site=self.site)
        salt = bytes.fromhex(first.salt)
        digest = hashlib.sha256(salt)
        received = 0
        pending: deque[tuple[int, Answer]] = deque()
        asked = len(b64decode(first.data))
        with open(path, "wb") as out:
            chunk: Any = first
            while True:
                data = b64decode(chunk.data)
                if chunk.offset != received or chunk.total != total or (chunk.salt and bytes.fromhex(chunk.salt) != salt):
                    raise ResultIntegrityError(f"site {ref.site!r} sent a piece of {target!r} that does not fit", site=ref.site)
                out.write(data)
                digest.update(data)
                received += len(data)
                ctx.progress(received / total if total else 1.0, f"{received:,} of {total:,} bytes from {ref.site}")
                ctx.check_cancelled()
                if received >= total or not data:
                    break
                while asked < total and len(pending) < self.window:
                    pending.append((asked, self._ask(ref, target, asked, grant)))
                    asked += min(self.piece_bytes, total - asked)
                if not pending:
                    break
                _, future = pending.popleft()
                chunk = future.result()
                if not isinstance(chunk, FetchChunk):
                    raise ResultIntegrityError(f"site {ref.site!r} answered a fetch with {chunk.kind!r}", site=ref.site)
        if received != total or digest.hexdigest() != target.sha256:
            raise ResultIntegrityError(
                f"{target!r} arrived damaged from site {ref.site!r} ({received} of {total} bytes, sha256 "
                f"{'matches' if digest.hexdigest() == target.sha256 else 'does not match'}); nothing was stored, move it again",
                site=self.site,
            )
        return target
