"""What a reader opens stays inside the place the site resolved: globs, symlinks and references inside files.

`site_workers.sources` decides whether a *name* lies under a declared source or
data root. That is not enough on its own, because readers open more than the
name: Dask expands a glob itself, a zarr store is many files (any of which may
be a symlink), a Parquet dataset is a directory, and an HDF5/netCDF file may tell
the HDF5 library to read other files (external datasets, external links, virtual
datasets). This module closes each of those ways out at the point of reading:

- `expand` expands a glob at the site and confines every match (symlinks
  resolved) to the location's boundary; readers get the resolved list, never a
  pattern.
- `ConfinedFileSystem` is the local filesystem every local read goes through:
  each open resolves the path again and refuses one that leaves the boundary
  (a chunk file or directory symlinked out of a zarr store or Parquet dataset),
  and it opens read-only.
- `refuse_external_storage` refuses an HDF5/netCDF file that holds anything but
  hard and soft links and datasets stored in the file itself.
"""

from __future__ import annotations

import os
from glob import has_magic
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dfm_prefect.core.errors import AccessDeniedError, InvalidParametersError


def within(path: str, root: str) -> bool:
    """True if ``path`` is ``root`` or lies under it (both normalised, same protocol)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def glob_base(path: str) -> str:
    """The part of ``path`` before its first segment holding a glob character (``path`` itself if none)."""
    parts = path.split("/")
    for index, part in enumerate(parts):
        if has_magic(part):
            return "/".join(parts[:index]) or "/"
    return path


class ConfinedFileSystem(LocalFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """A read-only local filesystem that opens nothing whose real path lies outside ``root``.

    Listing is not restricted (names and sizes are the site's metadata); opening
    is, so no byte outside ``root`` is read however a reader reaches it. It
    pickles with its ``root`` (Dask worker processes get the same confinement).

    Example:

    ```python
    fs = ConfinedFileSystem(root="/srv/data/t.zarr")
    xr.open_zarr(fs.get_mapper("/srv/data/t.zarr"))   # a chunk symlinked out raises AccessDeniedError
    ```
    """

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = os.path.realpath(root)

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, **kwargs: Any) -> Any:
        if mode not in ("r", "rb"):
            raise AccessDeniedError(f"data sources are opened read-only at this site (asked for mode {mode!r})")
        real = os.path.realpath(self._strip_protocol(path))
        if not within(real, self.root):
            raise AccessDeniedError(
                f"{path!r} is a symbolic link (or lies under one) that leads out of {self.root!r}; the site reads "
                "nothing outside its data sources and roots. Ask the site administrator to replace the link with the data."
            )
        # Open the path that was checked, not the link, so the check and the read see the same file.
        return super()._open(real, mode, block_size=block_size, **kwargs)


def expand(fs: fsspec.AbstractFileSystem, path: str, root: str, *, local: bool, url: str) -> list[str]:
    """The paths a reader opens for ``path``: ``path`` itself, or every match of its glob, each confined to ``root``.

    A local match is returned resolved (symlinks followed), so the reader opens
    exactly what was checked and never expands a pattern itself.
    """
    if not has_magic(path):
        return [path]
    matches = sorted(str(match) for match in fs.glob(path))
    if not matches:
        raise InvalidParametersError(f"{url!r} matches nothing at this site; check the pattern against the site's catalog")
    # Compare in the filesystem's own spelling (memory:// adds a leading slash, for one).
    boundary = root if local else fs._strip_protocol(root)
    confined = []
    for match in matches:
        real = os.path.realpath(match) if local else fs._strip_protocol(match)
        if not within(real, boundary):
            how = "a symbolic link that leads" if local else "which lies"
            raise AccessDeniedError(
                f"{url!r} matches {match!r}, {how} out of the site's data sources and roots; the site reads nothing "
                "outside them. Use a pattern that matches only files inside, or ask the site administrator to "
                "replace the link with the data."
            )
        if has_magic(real):
            raise InvalidParametersError(
                f"{url!r} matches {match!r}, whose name holds a glob character ('*', '?' or '['); name that file exactly"
            )
        confined.append(real)
    return confined


def refuse_external_storage(source: str | IO[bytes], url: str) -> None:
    """Raise `AccessDeniedError` if the HDF5/netCDF file at ``source`` makes HDF5 read anything but itself.

    External datasets (``external=`` file lists), virtual datasets and external
    (or other user-defined) links are read by the HDF5 library from paths written
    in the file, past every check on the file's own path; the site refuses such
    files whole. Hard and soft links stay inside the file and are allowed.
    """
    import h5py

    found: list[str] = []
    with h5py.File(source, "r") as file:

        def visit(name: str, link: Any) -> None:
            if isinstance(link, h5py.SoftLink):
                return
            if not isinstance(link, h5py.HardLink):
                found.append(f"{name!r} is a link to another file")
                return
            target = file.get(name)
            if isinstance(target, h5py.Dataset):
                plist = target.id.get_create_plist()
                if plist.get_layout() == h5py.h5d.VIRTUAL:
                    found.append(f"{name!r} is a virtual dataset")
                elif plist.get_external_count():
                    found.append(f"{name!r} keeps its data in external files")

        file.visititems_links(visit)
    if found:
        raise AccessDeniedError(
            f"{url!r} refers to storage outside itself ({'; '.join(found[:5])}); the site reads only data stored in "
            "the file. Ask the site administrator to publish a self-contained copy (for example with h5repack or "
            "xarray's to_netcdf)."
        )
