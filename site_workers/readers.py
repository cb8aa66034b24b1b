"""Readers that open a data location lazily, by format. New formats plug in with `register_reader`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dfm_prefect.core.errors import AccessDeniedError, InvalidParametersError
from site_workers.confine import refuse_external_storage
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


def dataset_paths(location: Location) -> str | list[str]:
    """What to hand a multi-file reader (Parquet, CSV): the one confined path, or the confined matches of a glob."""
    paths = location.files()
    return paths[0] if len(paths) == 1 else paths


def _one_path(location: Location) -> str:
    paths = location.files()
    if len(paths) != 1:
        raise InvalidParametersError(
            f"{location.url!r} matches {len(paths)} paths; a {location.format} dataset is one file or store, so name one"
        )
    return paths[0]


def _zarr(location: Location) -> Any:
    import xarray as xr

    # Every chunk is opened through the location's (confined) filesystem, so a chunk
    # file or directory symlinked out of the store is refused when it is read.
    mapper = location.filesystem().get_mapper(_one_path(location))
    return xr.open_zarr(mapper, chunks={})


def _netcdf(location: Location) -> Any:
    import xarray as xr

    path = _one_path(location)
    if location.protocol == "file":
        refuse_external_storage(path, location.url)
        return xr.open_dataset(path, engine="h5netcdf", chunks="auto")
    handle = location.filesystem().open(path, "rb")
    try:
        refuse_external_storage(handle, location.url)
    except AccessDeniedError:
        handle.close()
        raise
    handle.seek(0)
    return xr.open_dataset(handle, engine="h5netcdf", chunks="auto")


def _parquet(location: Location) -> Any:
    import dask.dataframe as dd

    return dd.read_parquet(dataset_paths(location), filesystem=location.filesystem())


def _csv(location: Location) -> Any:
    import dask.dataframe as dd

    # Dask opens these paths as given: each is a resolved, confined file, never a pattern.
    paths = location.files()
    return dd.read_csv([f"{location.protocol}://{path}" for path in paths], storage_options=location.storage_options)


register_reader("zarr", _zarr)
register_reader("netcdf", _netcdf)
register_reader("parquet", _parquet)
register_reader("csv", _csv)
