"""Readers that open a data location lazily, by format. New formats plug in with `register_reader`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dfm_prefect.core.errors import InvalidParametersError
from site_workers.sources import Location

Reader = Callable[[Location], Any]
_READERS: dict[str, Reader] = {}


def register_reader(format: str, reader: Reader) -> None:
    """Make ``format`` readable at sites."""
    _READERS[format] = reader


def open_location(location: Location) -> Any:
    """Open the data at ``location`` with the reader for its format."""
    if location.format is None:
        raise InvalidParametersError(
            f"cannot tell the format of {location.url!r}; declare `format:` on the source "
            f"(one of {sorted(_READERS)})"
        )
    try:
        reader = _READERS[location.format]
    except KeyError:
        raise InvalidParametersError(f"no reader for format {location.format!r}; known: {sorted(_READERS)}") from None
    return reader(location)


def _zarr(location: Location) -> Any:
    import xarray as xr

    mapper = location.filesystem().get_mapper(location.path)
    return xr.open_zarr(mapper, chunks={})


def _netcdf(location: Location) -> Any:
    import xarray as xr

    if location.protocol == "file":
        return xr.open_dataset(location.path, engine="h5netcdf", chunks="auto")
    return xr.open_dataset(location.filesystem().open(location.path, "rb"), engine="h5netcdf", chunks="auto")


def _parquet(location: Location) -> Any:
    import dask.dataframe as dd

    return dd.read_parquet(location.url, storage_options=location.storage_options)


def _csv(location: Location) -> Any:
    import dask.dataframe as dd

    return dd.read_csv(location.url, storage_options=location.storage_options)


register_reader("zarr", _zarr)
register_reader("netcdf", _netcdf)
register_reader("parquet", _parquet)
register_reader("csv", _csv)
