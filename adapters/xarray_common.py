"""Parameter types and helpers shared by the xarray operations (no operations here)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import AfterValidator, Field

from dfm_prefect.core.errors import InvalidParametersError
from dfm_prefect.core.operations import OperationContext, OperationParams

Label = Union[float, int, str]
NAME = r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$"
GROUP = r"^[A-Za-z_][A-Za-z0-9_]*(\.(year|month|season|dayofyear|hour))?$"
Stat = Literal["mean", "sum", "min", "max", "std", "var", "count"]
"""Statistics that stream: Dask reduces each chunk, then combines the partial results."""

class Range(OperationParams):
    """An inclusive label range; either end may be open."""

    start: Label | None = None
    stop: Label | None = None


def _distinct(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError("dimensions must not repeat")
    return value


Dims = Annotated[list[str], Field(min_length=1, max_length=16), AfterValidator(_distinct)]
"""One or more distinct dimension names."""


def select_variables(ds: Any, variables: list[str] | None) -> Any:
    """The dataset narrowed to ``variables`` (all if None), or a clear error naming what exists."""
    if variables is None:
        return ds
    missing = sorted(set(variables) - set(ds.data_vars))
    if missing:
        raise InvalidParametersError(f"no variables {missing}; the data has {sorted(ds.data_vars)}")
    return ds[variables]


def numeric(ds: Any) -> Any:
    """Only the numeric data variables (statistics of strings or dates make no sense)."""
    return ds[[name for name, var in ds.data_vars.items() if var.dtype.kind in "biuf"]]


def check_dims(ds: Any, dims: list[str] | dict[str, Any]) -> None:
    missing = sorted(set(dims) - set(ds.dims))
    if missing:
        raise InvalidParametersError(f"no dimensions {missing}; the data has {sorted(ds.dims)}")


def area_weights(ds: Any, lat: str) -> Any:
    """cos(latitude): the relative area of a cell on a regular latitude-longitude grid."""
    if lat not in ds.coords:
        raise InvalidParametersError(
            f"area weights need a latitude coordinate {lat!r}; the data has coordinates {sorted(ds.coords)}"
        )
    return np.cos(np.deg2rad(ds[lat].astype("float64")))


def on_device(ctx: OperationContext, value: Any) -> Any:
    """``value`` with its chunks on the site's compute device: CuPy on GPU sites, unchanged elsewhere."""
    return ctx.to_device(value)


def nan_to_zero(value: Any) -> Any:
    """Replace NaN by 0 on whatever device holds the data.

    ``fillna`` on Dask-backed data hands each chunk a host (NumPy) 0-d array as the
    fill value, which CuPy refuses; this keeps the whole operation in the chunk's
    own array module.
    """
    import xarray as xr

    return xr.apply_ufunc(_nan_to_zero_block, value, dask="allowed", keep_attrs=True)


def _nan_to_zero_block(block: Any) -> Any:
    if hasattr(block, "map_blocks") and hasattr(block, "dask"):
        return block.map_blocks(_nan_to_zero_block, dtype=block.dtype)
    if block.dtype.kind not in "fc":
        return block
    xp = block.__array_namespace__() if hasattr(block, "__array_namespace__") else np
    return xp.where(xp.isnan(block), 0.0, block)


def compute_counted(ctx: OperationContext, result: Any, *counts: Any) -> Any:
    """Compute ``result`` together with the per-group counts of what went into it; report the counts; return it.

    The site's disclosure rules decide on the smallest non-zero count
    (``ctx.count_groups``), so every aggregate counts its contributors from the
    same data, in the same pass.
    """
    computed = ctx.compute(result, *counts)
    ctx.count_groups(*computed[1:])
    return without_point_data(computed[0])


def contributors(x: Any) -> Any:
    """Cells that carry information into a statistic: present and not zero (DataSHIELD's non-zero cell count).

    A cell masked to 0 (``where(lat == 10, temp, 0)``) adds nothing to a sum or a
    mean, so counting it would let a group of one real cell pass as a group of many.
    """
    return x.notnull() & (x != 0)


def without_point_data(result: Any) -> Any:
    """An aggregate without its non-dimension coordinates (data attached to points, e.g. a record id per time step)."""
    return result.reset_coords(drop=True) if hasattr(result, "reset_coords") else result


def cells(ds: Any) -> int:
    """How many grid cells a dataset spans (the product of its dimension sizes)."""
    return int(np.prod([int(size) for size in ds.sizes.values()], dtype="int64"))


def apply_stat(obj: Any, stat: str, dims: list[str]) -> Any:
    """``obj.<stat>(dim=dims)`` for the streaming statistics (NaNs skipped)."""
    if stat == "count":
        return obj.count(dim=dims)
    return getattr(obj, stat)(dim=dims, skipna=True)
