"""Short, data-free descriptions of values: what a `DataRef` or catalog entry shows."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

_MAX_VARIABLES = 64


def _scalar(value: Any) -> Any:
    if isinstance(value, np.datetime64):
        return str(value.astype("datetime64[s]"))
    if isinstance(value, np.generic):
        return value.item()
    return value


def _coord_summary(coord: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"dtype": str(coord.dtype), "size": int(coord.size)}
    if coord.ndim == 1 and coord.size and coord.dtype.kind in "iufM":
        values = coord.values
        info["min"] = _scalar(values.min())
        info["max"] = _scalar(values.max())
    return info


def summarize_xarray(value: Any) -> dict[str, Any]:
    """Dims, coordinate ranges, variables and dtypes of an xarray object (no data)."""
    import xarray as xr

    ds = value.to_dataset(name=value.name or "value") if isinstance(value, xr.DataArray) else value
    variables = list(ds.data_vars.items())[:_MAX_VARIABLES]
    return {
        "type": "xarray.Dataset",
        "dims": {str(name): int(size) for name, size in ds.sizes.items()},
        "coords": {str(name): _coord_summary(coord) for name, coord in ds.coords.items() if coord.ndim <= 1},
        "data_vars": {
            str(name): {
                "dims": [str(d) for d in var.dims],
                "dtype": str(var.dtype),
                "chunks": [list(c) if len(c) <= 8 else [c[0], "...", len(c)] for c in var.chunks] if var.chunks else None,
            }
            for name, var in variables
        },
        "nbytes": int(ds.nbytes),
    }


def summarize_frame(value: Any) -> dict[str, Any]:
    """Columns, dtypes and row count of a table."""
    return {
        "type": "table",
        "columns": {str(name): str(dtype) for name, dtype in value.dtypes.items()},
        "rows": int(len(value)),
    }


def summarize(value: Any) -> dict[str, Any]:
    """A summary suited to the value's type."""
    xr = sys.modules.get("xarray")
    if xr is not None and isinstance(value, (xr.Dataset, xr.DataArray)):
        return summarize_xarray(value)
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(value, pd.DataFrame):
        return summarize_frame(value)
    if isinstance(value, np.ndarray):
        return {"type": "ndarray", "shape": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {"type": "dict", "keys": [str(k) for k in list(value)[:_MAX_VARIABLES]]}
    if isinstance(value, list):
        return {"type": "list", "length": len(value)}
    return {"type": type(value).__name__}
