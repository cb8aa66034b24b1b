"""A result format for `xarray.write`: a zarr store packed into one zip file.

The site's result store keeps every result as one file with its sha256, so a
zarr result is written chunk by chunk into a scratch directory and then packed,
uncompressed (the chunks already are), into a zip. Importing this module
registers the ``zarr`` codec with `dfm_prefect.core.codecs`; only datasets marked by
:func:`mark_zarr` use it, every other dataset stays netCDF.

Example:

```python
from adapters.zarr_result import mark_zarr
stored = mark_zarr(ds)        # an operation returns this; the site stores .zarr.zip
```
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Any

from dfm_prefect.core.codecs import Codec, loaded_classes, register_codec

FORMAT = "zarr"
_MARK = "dfm_result_format"


def mark_zarr(ds: Any) -> Any:
    """``ds`` marked to be stored as zarr (the mark lives in ``encoding``, never in the data)."""
    ds = ds.copy()
    ds.encoding[_MARK] = FORMAT
    return ds


def _accepts(value: Any) -> bool:
    return isinstance(value, loaded_classes("xarray", "Dataset")) and value.encoding.get(_MARK) == FORMAT


def _write_file(value: Any, path: str) -> None:
    ds = value.copy()
    ds.encoding.pop(_MARK, None)
    for variable in ds.variables.values():
        # The source's chunk layout no longer fits a selection of it; the Dask chunks decide.
        for key in ("chunks", "preferred_chunks"):
            variable.encoding.pop(key, None)
    # zarr needs equal chunks but the last; a selection cuts the first and last ones short.
    widest: dict[Any, int] = {}
    for variable in ds.variables.values():
        for dim, sizes in zip(variable.dims, variable.chunks or ()):
            widest[dim] = max(widest.get(dim, 0), *sizes)
    if widest:
        ds = ds.chunk(widest)
    with tempfile.TemporaryDirectory(prefix="dfm-zarr-") as scratch:
        root = os.path.join(scratch, "store.zarr")
        ds.to_zarr(root, mode="w", zarr_format=2, consolidated=True)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for folder, _, files in os.walk(root):
                for name in sorted(files):
                    full = os.path.join(folder, name)
                    archive.write(full, os.path.relpath(full, root))


def _encode(value: Any) -> bytes:
    with tempfile.TemporaryDirectory(prefix="dfm-zarr-") as scratch:
        path = os.path.join(scratch, "result.zip")
        _write_file(value, path)
        with open(path, "rb") as handle:
            return handle.read()


def _decode(data: bytes) -> Any:
    import xarray as xr
    import zarr

    with tempfile.TemporaryDirectory(prefix="dfm-zarr-") as scratch:
        path = os.path.join(scratch, "result.zip")
        with open(path, "wb") as handle:
            handle.write(data)
        store = zarr.storage.ZipStore(path, mode="r")
        try:
            with xr.open_zarr(store, consolidated=True) as ds:
                return ds.load()
        finally:
            store.close()


register_codec(Codec(FORMAT, _accepts, _encode, _decode, _write_file))
