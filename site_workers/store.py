"""The site's result store: results written once, read back only if their sha256 matches.

A result's file name binds it to the kind and format the site gave it
(``<uuid>.<kind>.<format>``), so a client cannot relabel a stored dataset as a
``value`` to get it past the export policy: the name, not the reference the
client sends, is what the site believes. An aggregate's name also binds the
size of its smallest group as the operation counted it
(``<uuid>.aggregate-n<count>.<format>``), which the disclosure rules decide on.

On local disk the store keeps a ledger of who stored each result and when
(`site_workers.ledger`), which the site's retention limits act on
(`site_workers.retention`): a result they removed fails with `ResultExpiredError`,
and one that would not fit is refused with `StoreFullError` before it enters.

On local disk results are private to the site's OS user: the store directory
is mode 0700 and every result file 0600 (created so, never readable by others
even for a moment).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import posixpath
import re
import secrets
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec

from dfm_prefect.core.codecs import codec_for, decode
from dfm_prefect.core.errors import AccessDeniedError, ConfigError, ResultExpiredError, ResultIntegrityError, StoreFullError
from dfm_prefect.core.refs import DataRef, Recipe, ResultKind
from dfm_prefect.core.wire import StoreUsage
from site_workers.config import StoreConfig
from site_workers.retention import Collector
from site_workers.sources import canonical

_CHUNK = 4 << 20
_PRIVATE_DIR = 0o700
_PRIVATE_FILE = 0o600
_BOUND_NAME = re.compile(r"^[0-9a-f]{32}\.(value|aggregate|dataset|table)(?:-n(\d{1,15}))?(-moved)?\.([a-z0-9_]+)$")
DIGEST_KEY = ".digest-key"
"""The store's secret for the salts of result digests (never a result: its name matches no result name)."""
_LEGACY_NAME = re.compile(r"^[0-9a-f]{32}\.([a-z0-9_]+)$")


def _sha256_file(path: str, salt: bytes) -> str:
    digest = hashlib.sha256(salt)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_private(path: str, data: bytes) -> None:
    """Write a new file that only the site's OS user can read (mode set at creation, not after)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _move_private(source: str, target: str) -> None:
    """Move a private file into the store; across file systems, copy it into a file created private."""
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE)
        with os.fdopen(fd, "wb") as out, open(source, "rb") as handle:
            shutil.copyfileobj(handle, out, _CHUNK)


class ResultStore:
    """Writes results under one fsspec location and hands out `DataRef`s to them."""

    def __init__(self, site: str, config: StoreConfig) -> None:
        self.site = site
        self.protocol, self.root = canonical(config.url)
        self.fs = fsspec.filesystem(self.protocol, **config.storage_options)
        self.fs.makedirs(self.root, exist_ok=True)
        if self.is_local:
            try:
                os.chmod(self.root, _PRIVATE_DIR)
            except PermissionError as exc:
                raise ConfigError(
                    f"site {site!r}: its result store {self.root} cannot be made private (mode 0700): {exc}; "
                    "point result_store at a directory the site's OS user owns"
                ) from None
        # uri -> (sha256, stamp) of results already hashed; a changed stamp re-hashes.
        self._verified: dict[str, tuple[str, Any]] = {}
        self._lock = threading.Lock()
        self._digest_key = self._load_digest_key()
        self.retention: Collector | None = None
        """The ledger and retention limits of a local store (None for other protocols, which keep no ledger)."""
        if self.is_local:
            self.retention = Collector(site, self.root, config.retention, names=self.result_names)
        elif config.retention.bounded:
            raise ConfigError(
                f"site {site!r}: result_store.retention needs a local result store (file://), whose processes can "
                f"share a lock; {config.url} is not one. Drop retention or store results on local disk"
            )

    def _load_digest_key(self) -> bytes:
        """The store's secret for digest salts, made once and kept in the store (0600 on local disk)."""
        path = f"{self.root}/{DIGEST_KEY}"
        if not self.fs.exists(path):
            key = secrets.token_bytes(32)
            try:
                if self.is_local:
                    _write_private(path, key)
                else:
                    self.fs.pipe_file(path, key)
            except FileExistsError:
                pass  # another process of this site made it first
        with self.fs.open(path, "rb") as handle:
            return bytes(handle.read())

    def salt(self, ref: DataRef) -> str:
        """The salt of ``ref``'s digest (hex): sent only together with the result's bytes.

        A digest of public content would let a client confirm guesses of a result
        that stays here (a small table has few possible values); salted with a
        secret of the site, the digest alone confirms nothing.
        """
        return self._salt_for(posixpath.basename(ref.uri)).hex()

    def keyed_digest(self, purpose: str, data: bytes) -> str:
        """A digest of ``data`` keyed with the store's secret (hex sha256 HMAC), separate per ``purpose``."""
        key = hmac.new(self._digest_key, purpose.encode(), hashlib.sha256).digest()
        return hmac.new(key, data, hashlib.sha256).hexdigest()

    def _salt_for(self, name: str) -> bytes:
        return hmac.new(self._digest_key, name.encode(), hashlib.sha256).digest()[:16]

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def put(
        self,
        value: Any,
        *,
        op: str,
        kind: ResultKind,
        summary: dict[str, Any],
        contributors: int | None = None,
        recipe: Recipe | None = None,
        owner: str | None = None,
    ) -> tuple[DataRef, bytes | None]:
        """Store a value; return its reference and, for small values, the encoded bytes.

        ``contributors`` (the smallest group an aggregate's operation counted) is
        bound into the stored name. ``owner`` is the client the result is stored for
        (None: anonymous), whose share of the store it counts against; a result that
        does not fit raises `StoreFullError` and leaves nothing behind.
        """
        codec = codec_for(value)
        counted = f"-n{contributors}" if contributors is not None else ""
        name = f"{uuid.uuid4().hex}.{kind}{counted}.{codec.format}"
        target = f"{self.root}/{name}"
        payload: bytes | None = None
        if codec.write_file is None:
            payload = codec.encode(value)
            size, sha = len(payload), hashlib.sha256(self._salt_for(name) + payload).hexdigest()
            with self._admitted(name, owner, size), self._cleaned_up(target):
                if self.is_local:
                    _write_private(target, payload)
                else:
                    self.fs.pipe_file(target, payload)
                stamp = self._stamp(target)  # inside: once the lock goes, retention may take it
        else:
            # Lazy values stream to a local file chunk by chunk, then move to the store.
            with tempfile.TemporaryDirectory(prefix="dfm-result-") as scratch:
                local = os.path.join(scratch, name)
                codec.write_file(value, local)
                size, sha = os.path.getsize(local), _sha256_file(local, self._salt_for(name))
                with self._admitted(name, owner, size), self._cleaned_up(target):  # refused: the scratch copy goes with its directory
                    if self.is_local:
                        os.chmod(local, _PRIVATE_FILE)  # in a 0700 scratch directory until it moves
                        _move_private(local, target)
                    else:
                        self.fs.put_file(local, target)
                    stamp = self._stamp(target)
        ref = DataRef(
            site=self.site,
            uri=f"{self.protocol}://{target}",
            kind=kind,
            format=codec.format,
            size=size,
            sha256=sha,
            op=op,
            summary=summary,
            contributors=contributors,
            recipe=recipe,
        )
        with self._lock:
            self._verified[ref.uri] = (sha, stamp)
        return ref, payload

    def put_file(
        self,
        local: str,
        *,
        kind: ResultKind,
        format: str,
        op: str,
        summary: dict[str, Any],
        recipe: Recipe | None = None,
        owner: str | None = None,
    ) -> DataRef:
        """Store a file that arrived from another site (a move) under a name that marks it moved; it is moved, not copied.

        The caller has checked its size and sha256 against what the sending site
        recorded; here it gets this store's own salted digest. ``owner`` as for
        :meth:`put`; when it does not fit, `StoreFullError` and ``local`` stays.
        """
        if not re.fullmatch(r"[a-z0-9_]{1,32}", format):
            raise AccessDeniedError(f"{format!r} is not a result format")
        name = f"{uuid.uuid4().hex}.{kind}-moved.{format}"
        target = f"{self.root}/{name}"
        size, sha = os.path.getsize(local), _sha256_file(local, self._salt_for(name))
        with self._admitted(name, owner, size):
            if self.is_local:
                os.chmod(local, _PRIVATE_FILE)
                _move_private(local, target)
            else:
                self.fs.put_file(local, target)
            stamp = self._stamp(target)
        ref = DataRef(
            site=self.site, uri=f"{self.protocol}://{target}", kind=kind, format=format, size=size, sha256=sha, op=op,
            summary=summary, recipe=recipe,
        )
        with self._lock:
            self._verified[ref.uri] = (sha, stamp)
        return ref

    def delete(self, ref: DataRef) -> None:
        """Remove a stored result (a copy made for a request that was then refused)."""
        path = self.check_owned(ref)
        with self._lock:
            self._verified.pop(ref.uri, None)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        if self.retention is not None:
            self.retention.forget(posixpath.basename(path))

    def _admitted(self, name: str, owner: str | None, size: int) -> contextlib.AbstractContextManager[None]:
        """Room for a new result under the retention limits, recorded in the ledger (a local store only)."""
        return self.retention.admit(name, owner, size) if self.retention is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _cleaned_up(self, target: str) -> Iterator[None]:
        """Remove what a write that failed midway (a full disk, say) left at ``target``; a full disk is `StoreFullError`."""
        try:
            yield
        except BaseException as exc:
            with contextlib.suppress(OSError):
                self.fs.rm_file(target)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise StoreFullError(f"the disk of the result store is full ({exc.strerror}); nothing was stored", site=self.site) from None
            raise

    def renew(self, ref: DataRef) -> bool:
        """Count a stored result as used now (a cached answer handed out again); False if the store no longer holds it."""
        if self.retention is None:
            return True
        return self.retention.renew(posixpath.basename(self.check_owned(ref)))

    def usage(self) -> StoreUsage | None:
        """What the store holds and its retention limits (None for a store that keeps no ledger)."""
        if self.retention is None:
            return None
        held, policy = self.retention.usage(), self.retention.policy
        return StoreUsage(
            bytes=held.bytes, results=held.results, max_bytes=policy.max_bytes,
            max_bytes_per_client=policy.max_bytes_per_client, max_age_s=policy.max_age_s,
        )

    def result_names(self) -> list[str]:
        """The names of the result files in the store (never its key, ledger or scratch)."""
        names = (posixpath.basename(str(p)) for p in self.fs.ls(self.root, detail=False))
        return [name for name in names if _BOUND_NAME.match(name) or _LEGACY_NAME.match(name)]

    def moved_bytes(self) -> int:
        """Bytes of the results in the store that came from other sites (what ``imports.quota_bytes`` caps)."""
        total = 0
        for entry in self.fs.ls(self.root, detail=True):
            name = posixpath.basename(str(entry.get("name", "")))
            bound = _BOUND_NAME.match(name)
            if bound is not None and bound.group(3):
                total += int(entry.get("size") or 0)
        return total

    def scratch(self) -> str | None:
        """A private folder for a result on its way into the store (on the store's own disk when it is local)."""
        if not self.is_local:
            return None
        folder = f"{self.root}/.incoming"
        os.makedirs(folder, mode=_PRIVATE_DIR, exist_ok=True)
        return folder

    def _stamp(self, path: str) -> Any:
        """What must be unchanged for an earlier sha256 check to still hold (size first)."""
        if self.is_local:
            # ctime and the inode change on every write or replacement, and unlike mtime
            # cannot be set back by a process that tampers with the file.
            st = os.stat(path)
            return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        info = self.fs.info(path)
        return (info.get("size"), info.get("mtime") or info.get("LastModified"), info.get("ETag"))

    def check_owned(self, ref: DataRef) -> str:
        """The path of a reference if it belongs to this store, else `AccessDeniedError`."""
        if ref.site != self.site:
            raise AccessDeniedError(f"{ref!r} is held by site {ref.site!r}, not by this site")
        protocol, path = canonical(ref.uri)
        if protocol != self.protocol or posixpath.dirname(path) != self.root.rstrip("/"):
            raise AccessDeniedError(f"{ref!r} does not point into this site's result store")
        name = posixpath.basename(path)
        bound = _BOUND_NAME.match(name)
        if bound is not None:
            if (bound.group(1), bound.group(4)) != (ref.kind, ref.format):
                raise AccessDeniedError(
                    f"{ref!r} claims kind {ref.kind!r} and format {ref.format!r}, but this site stored that result "
                    f"as {bound.group(1)!r} in {bound.group(4)!r}: the reference was altered"
                )
        elif (legacy := _LEGACY_NAME.match(name)) is None or legacy.group(1) != ref.format:
            raise AccessDeniedError(f"{ref!r} does not name a result of this site's store")
        return path

    def bound_kind(self, ref: DataRef) -> ResultKind | None:
        """The kind the site stored ``ref`` as (None for results stored before kinds were bound)."""
        bound = _BOUND_NAME.match(posixpath.basename(self.check_owned(ref)))
        return bound.group(1) if bound is not None else None  # type: ignore[return-value]

    def contributors(self, ref: DataRef) -> int | None:
        """The smallest group the site counted for ``ref`` when it stored it (None if none was counted).

        Read from the stored name, never from the reference's own field.
        """
        bound = _BOUND_NAME.match(posixpath.basename(self.check_owned(ref)))
        return int(bound.group(2)) if bound is not None and bound.group(2) is not None else None

    def came_from_a_site(self, ref: DataRef) -> bool:
        """True for a result another site sent here (a move), as the stored name records it."""
        bound = _BOUND_NAME.match(posixpath.basename(self.check_owned(ref)))
        return bound is not None and bound.group(3) is not None

    def read_bytes(self, ref: DataRef, offset: int = 0, length: int | None = None) -> bytes:
        """Read (part of) a stored result after checking it is intact."""
        path = self.verify(ref)
        with self.fs.open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(-1 if length is None else length)

    def verify(self, ref: DataRef) -> str:
        """Check the stored bytes against the reference's size and sha256; return the path."""
        path = self.check_owned(ref)
        try:
            stamp = self._stamp(path)
        except FileNotFoundError:
            why = self.retention.removed_why(posixpath.basename(path)) if self.retention is not None else None
            if why is not None:
                raise ResultExpiredError(
                    f"result {ref!r} was removed from the store by the site's retention (result_store.retention."
                    f"{why}); run the operation that produced it again",
                    site=self.site,
                ) from None
            raise ResultIntegrityError(
                f"result {ref!r} is missing from the store; run the operation that produced it again", site=self.site
            ) from None
        size = stamp[0]
        if size != ref.size:
            raise ResultIntegrityError(
                f"result {ref!r} is corrupted or the reference was altered: {size} bytes are stored; "
                "run the operation that produced it again",
                site=self.site,
            )
        with self._lock:
            if self._verified.get(ref.uri) == (ref.sha256, stamp):
                return path
        digest = hashlib.sha256(self._salt_for(posixpath.basename(path)))
        with self.fs.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(block)
        if digest.hexdigest() != ref.sha256:
            raise ResultIntegrityError(
                f"result {ref!r} is corrupted: the stored bytes do not match its size and sha256; "
                "run the operation that produced it again",
                site=self.site,
            )
        with self._lock:
            self._verified[ref.uri] = (ref.sha256, stamp)
        return path

    def open_value(self, ref: DataRef) -> Any:
        """Open a stored result for a later operation (lazily for netCDF)."""
        path = self.verify(ref)
        if ref.format == "netcdf":
            import xarray as xr

            handle = self.fs.open(path, "rb") if not self.is_local else path
            return xr.open_dataset(handle, engine="h5netcdf", chunks={})
        return decode(ref.format, self.read_bytes(ref))
