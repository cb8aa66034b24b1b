"""Short, data-free descriptions of values: what a `DataRef` or catalog entry shows."""

from __future__ import annotations

from typing import Any

import numpy as np

from dfm_prefect.core.codecs import loaded_classes

_MAX_VARIABLES = 64


def _scalar(value: Any) -> Any:
    if isinstance(value, np.datetime64):
        return str(value.astype("datetime64[s]"))
    if isinstance(value, np.generic):
        return value.item()
    return value


def _coord_summary(name: Any, coord: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"dtype": str(coord.dtype), "size": int(coord.size)}
    # Only the axes of the grid get a range: any other coordinate is data attached to
    # points (or a data variable moved onto a coordinate), and its extremes are records.
    if coord.dims == (name,) and coord.size and coord.dtype.kind in "iufM":
        values = coord.values
        info["min"] = _scalar(values.min())
        info["max"] = _scalar(values.max())
    return info


def _chunking(var: Any) -> dict[str, Any] | None:
    """Chunk size along each dimension (the largest chunk) and how many chunks there are."""
    if not var.chunks:
        return None
    return {
        "shape": {str(dim): int(max(sizes)) for dim, sizes in zip(var.dims, var.chunks)},
        "count": int(np.prod([len(sizes) for sizes in var.chunks])),
    }


def summarize_xarray(value: Any) -> dict[str, Any]:
    """Dims, coordinate ranges, variables, dtypes, chunking and size of an xarray object (no data read).

    Example (one variable of a daily field)::

        {"type": "xarray.Dataset", "dims": {"time": 730, "lat": 18, "lon": 72},
         "coords": {"time": {"dtype": "datetime64[ns]", "size": 730, "min": "2000-01-01T00:00:00", ...}},
         "data_vars": {"temperature": {"dims": ["time", "lat", "lon"], "dtype": "float32",
                                      "chunks": {"shape": {"time": 120, "lat": 18, "lon": 72}, "count": 7},
                                      "storage_chunks": [120, 18, 72], "units": "K", "nbytes": 3784320}},
         "nbytes": 3790000}
    """
    import xarray as xr

    ds = value.to_dataset(name=value.name or "value") if isinstance(value, xr.DataArray) else value
    variables = list(ds.data_vars.items())[:_MAX_VARIABLES]
    data_vars: dict[str, Any] = {}
    for name, var in variables:
        info: dict[str, Any] = {"dims": [str(d) for d in var.dims], "dtype": str(var.dtype), "chunks": _chunking(var)}
        stored = var.encoding.get("chunks") or var.encoding.get("chunksizes")
        if stored:
            info["storage_chunks"] = [int(size) for size in stored]
        if "units" in var.attrs:
            info["units"] = str(var.attrs["units"])[:64]
        info["nbytes"] = int(var.nbytes)
        data_vars[str(name)] = info
    return {
        "type": "xarray.Dataset",
        "dims": {str(name): int(size) for name, size in ds.sizes.items()},
        "coords": {str(name): _coord_summary(name, coord) for name, coord in ds.coords.items() if coord.ndim <= 1},
        "data_vars": data_vars,
        "nbytes": int(ds.nbytes),
    }


def summarize_frame(value: Any) -> dict[str, Any]:
    """Columns, dtypes and row count of a table (pandas); for a Dask dataframe, rows stay unknown here.

    Counting the rows of a Dask dataframe would read it: the catalog fills them in
    from Parquet footers instead (`site_workers.catalog`).
    """
    summary: dict[str, Any] = {
        "type": "table",
        "columns": {str(name): str(dtype) for name, dtype in value.dtypes.items()},
        "rows": None,
    }
    if _is_dask_frame(value):
        summary["partitions"] = int(value.npartitions)
    else:
        summary["rows"] = int(len(value))
        summary["nbytes"] = int(value.memory_usage(index=True, deep=False).sum())
    return summary


def _is_dask_frame(value: Any) -> bool:
    return isinstance(value, loaded_classes("dask.dataframe", "DataFrame"))


def summarize(value: Any) -> dict[str, Any]:
    """A summary suited to the value's type."""
    if isinstance(value, loaded_classes("xarray", "Dataset", "DataArray")):
        return summarize_xarray(value)
    if isinstance(value, loaded_classes("pandas", "DataFrame")) or _is_dask_frame(value):
        return summarize_frame(value)
    if isinstance(value, np.ndarray):
        return {"type": "ndarray", "shape": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {"type": "dict", "keys": [str(k) for k in list(value)[:_MAX_VARIABLES]]}
    if isinstance(value, list):
        return {"type": "list", "length": len(value)}
    return {"type": type(value).__name__}


def structure_only(summary: dict[str, Any]) -> dict[str, Any]:
    """Only the names and dtypes of a summary: what a reference shows where its result may not leave.

    Sizes, row counts, coordinate ranges and chunking are counts and values of the
    data (a filtered table's row count says whether someone is in it), so they go;
    dimension, coordinate, variable and column names, dtypes and units stay, which is
    what a flow needs to ask the next question.
    """
    kept: dict[str, Any] = {"type": summary.get("type")}
    if "dims" in summary:
        kept["dims"] = sorted(summary["dims"])
    if "coords" in summary:
        kept["coords"] = {name: {"dtype": info.get("dtype")} for name, info in summary["coords"].items()}
    if "data_vars" in summary:
        kept["data_vars"] = {
            name: {key: info[key] for key in ("dims", "dtype", "units") if key in info}
            for name, info in summary["data_vars"].items()
        }
    for key in ("columns", "dtype"):
        if key in summary:
            kept[key] = summary[key]
    return kept
