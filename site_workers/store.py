"""The site's result store: results written once, read back only if their sha256 matches."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import uuid
from typing import Any

import fsspec

from dfm_prefect.codecs import codec_for, decode
from dfm_prefect.errors import AccessDeniedError, ResultIntegrityError
from dfm_prefect.refs import DataRef, ResultKind
from site_workers.config import StoreConfig
from site_workers.sources import canonical

_CHUNK = 4 << 20


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class ResultStore:
    """Writes results under one fsspec location and hands out `DataRef`s to them."""

    def __init__(self, site: str, config: StoreConfig) -> None:
        self.site = site
        self.protocol, self.root = canonical(config.url)
        self.fs = fsspec.filesystem(self.protocol, **config.storage_options)
        self.fs.makedirs(self.root, exist_ok=True)
        # uri -> (sha256, stamp) of results already hashed; a changed stamp re-hashes.
        self._verified: dict[str, tuple[str, Any]] = {}
        self._lock = threading.Lock()

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def put(self, value: Any, *, op: str, kind: ResultKind, summary: dict[str, Any]) -> tuple[DataRef, bytes | None]:
        """Store a value; return its reference and, for small values, the encoded bytes."""
        codec = codec_for(value)
        name = f"{uuid.uuid4().hex}.{codec.format}"
        target = f"{self.root}/{name}"
        payload: bytes | None = None
        if codec.write_file is None:
            payload = codec.encode(value)
            size, sha = len(payload), hashlib.sha256(payload).hexdigest()
            self.fs.pipe_file(target, payload)
        else:
            # Lazy values stream to a local file chunk by chunk, then move to the store.
            with tempfile.TemporaryDirectory(prefix="dfm-result-") as scratch:
                local = os.path.join(scratch, name)
                codec.write_file(value, local)
                size, sha = os.path.getsize(local), _sha256_file(local)
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
        )
        with self._lock:
            self._verified[ref.uri] = (sha, stamp)
        return ref, payload

    def _stamp(self, path: str) -> Any:
        info = self.fs.info(path)
        return (info.get("size"), info.get("mtime") or info.get("LastModified") or info.get("ETag"))

    def check_owned(self, ref: DataRef) -> str:
        """The path of a reference if it belongs to this store, else `AccessDeniedError`."""
        if ref.site != self.site:
            raise AccessDeniedError(f"{ref!r} is held by site {ref.site!r}, not by this site")
        protocol, path = canonical(ref.uri)
        if protocol != self.protocol or not path.startswith(self.root.rstrip("/") + "/"):
            raise AccessDeniedError(f"{ref!r} does not point into this site's result store")
        return path

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
            raise ResultIntegrityError(f"result {ref!r} is missing from the store", site=self.site) from None
        with self._lock:
            if self._verified.get(ref.uri) == (ref.sha256, stamp):
                return path
        size = stamp[0]
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(block)
        if size != ref.size or digest.hexdigest() != ref.sha256:
            raise ResultIntegrityError(
                f"result {ref!r} is corrupted: stored bytes do not match its sha256", site=self.site
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
