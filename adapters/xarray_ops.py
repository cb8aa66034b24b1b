"""Operations on gridded data (xarray over Dask), run lazily next to the data.

This module has the operations that open, select, reduce, derive and write; the
exactly mergeable statistics (`moments`, `histogram`, ...) are in
:mod:`adapters.xarray_stats` and re-exported here.

Example:

```python
from adapters.xarray_ops import derive, reduce, subset

box = subset.submit(data="dfm://north/temperature", ranges={"time": {"start": "2001", "stop": "2002"}})
hot = derive.submit(data=box, variables={"celsius": "temperature - 273.15"})
peak = reduce.submit(data=hot, dims=["time"], stat="max")        # runs where `hot` is
```
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field

from adapters.expressions import parse
from adapters.xarray_common import NAME, Dims, Label, Range, apply_stat, cells, check_dims, compute_counted, contributors, on_device, select_variables
from adapters.xarray_stats import groupby_reduce, histogram, moments, resample, weighted_mean
from adapters.zarr_result import mark_zarr
from dfm_prefect.core.errors import InvalidParametersError
from dfm_prefect.core.operations import DataInput, OperationContext, OperationParams, operation
from dfm_prefect.core.refs import DataRef

__all__ = [
    "derive",
    "groupby_reduce",
    "histogram",
    "moments",
    "open_source",
    "reduce",
    "resample",
    "subset",
    "weighted_mean",
    "write",
]

# A quantile over one chunk along the reduced dimensions holds that much in memory;
# above this, ask for a smaller selection instead of exhausting the workers.
_MAX_CONTIGUOUS_BYTES = 512 << 20


class OpenParams(OperationParams):
    data: DataInput = Field(description="A data source (name or URL); a result is described by its reference's summary.")
    variables: list[str] | None = Field(default=None, max_length=256)


@operation("xarray.open", version="1", result="value")
def open_source(params: OpenParams, ctx: OperationContext) -> dict[str, Any]:
    """Open a source lazily and describe it (dims, coordinate ranges, variables, chunks, attributes); no data is read.

    Only sources: a result is described by its `DataRef`'s summary, which the
    site's export policy filters (a derived result may carry data in its coordinates).
    """
    if isinstance(params.data, DataRef):
        raise InvalidParametersError(
            "xarray.open describes data sources only; a result is described by its reference's summary, "
            "which shows what this site's export policy lets leave"
        )
    ds = select_variables(ctx.open_dataset(params.data), params.variables)
    described = ctx.describe(ds)
    described["attrs"] = {str(k): _plain(v) for k, v in list(ds.attrs.items())[:64]}
    for name, info in described["data_vars"].items():
        info["attrs"] = {str(k): _plain(v) for k, v in list(ds[name].attrs.items())[:32]}
    return described


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)[:1000]


class SubsetParams(OperationParams):
    data: DataInput
    variables: list[str] | None = Field(default=None, max_length=256)
    ranges: dict[str, Range] = Field(default_factory=dict, max_length=32)
    points: dict[str, Union[Label, list[Label]]] = Field(default_factory=dict, max_length=32)
    nearest: dict[str, Union[float, list[float]]] = Field(default_factory=dict, max_length=32)


@operation("xarray.subset", version="1", result="dataset")
def subset(params: SubsetParams, ctx: OperationContext) -> Any:
    """Select variables and label ranges, points or nearest points; the result stays at the site."""
    ds = select_variables(ctx.open_dataset(params.data), params.variables)
    for group in (params.ranges, params.points, params.nearest):
        check_dims(ds, group)
    whole = cells(ds)
    if params.ranges:
        ds = ds.sel({dim: slice(r.start, r.stop) for dim, r in params.ranges.items()})
    if params.points:
        ds = ds.sel(params.points)
    if params.nearest:
        ds = ds.sel(params.nearest, method="nearest")
    repeated = sorted(str(dim) for dim in {*params.points, *params.nearest} if dim in ds.indexes and not ds.indexes[dim].is_unique)
    if repeated:
        # A cell selected twice would count twice towards every group it is aggregated into.
        raise InvalidParametersError(f"the selection picks the same point of {repeated} more than once; select each point once")
    ctx.check_selection(cells(ds), whole, unit="cells")
    return ds


class ReduceParams(OperationParams):
    data: DataInput
    variables: list[str] | None = Field(default=None, max_length=256)
    dims: Dims
    stat: Literal["mean", "sum", "min", "max", "std", "var", "count", "median", "quantile"] = "mean"
    q: float | None = Field(default=None, ge=0, le=1)


@operation("xarray.reduce", version="1", result="aggregate")
def reduce(params: ReduceParams, ctx: OperationContext) -> Any:
    """Reduce over ``dims`` with one statistic (``quantile`` needs ``q``).

    mean, sum, min, max, std, var and count stream chunk by chunk (on the GPU at GPU
    sites). median and quantile need each series along ``dims`` in one chunk: the
    data is rechunked to whole ``dims`` and small pieces of the other dimensions,
    so they stream over those; they run on host arrays.
    """
    ds = select_variables(ctx.open_dataset(params.data), params.variables)
    check_dims(ds, params.dims)
    if params.stat in ("median", "quantile"):
        if params.stat == "quantile" and params.q is None:
            raise InvalidParametersError("stat 'quantile' needs q (0..1)")
        counts = contributors(ds).sum(dim=params.dims)
        ds = _contiguous(ds, params.dims)
        if params.stat == "median":
            reduced = ds.median(dim=params.dims)
        else:
            reduced = ds.quantile(params.q, dim=params.dims)
    else:
        device = on_device(ctx, ds)
        reduced, counts = apply_stat(device, params.stat, params.dims), contributors(device).sum(dim=params.dims)
    return compute_counted(ctx, reduced, counts)


def _contiguous(ds: Any, dims: list[str]) -> Any:
    """Rechunk so that ``dims`` are whole and the other dimensions are cut small enough."""
    kept = [d for d in ds.dims if d not in dims]
    per_series = max((var.dtype.itemsize for var in ds.data_vars.values()), default=8)
    for dim in dims:
        per_series *= ds.sizes[dim]
    if not kept and per_series > _MAX_CONTIGUOUS_BYTES:
        raise InvalidParametersError(
            f"a median or quantile over every dimension needs all {per_series / 1e6:.0f} MB in one chunk; "
            "keep a dimension, subset first, or use xarray.histogram for approximate quantiles"
        )
    chunks: dict[str, Any] = {dim: -1 for dim in dims}
    budget = max(1, (64 << 20) // max(per_series, 1))
    for dim in kept:
        chunks[dim] = max(1, min(ds.sizes[dim], budget))
        budget = max(1, budget // max(ds.sizes[dim], 1))
    return ds.chunk(chunks)


class DeriveParams(OperationParams):
    data: DataInput
    variables: dict[str, str] = Field(min_length=1, max_length=32, description="New variable name -> expression.")
    keep: bool = Field(default=False, description="Keep the input variables next to the derived ones.")


@operation("xarray.derive", version="1", result="dataset")
def derive(params: DeriveParams, ctx: OperationContext) -> Any:
    """New variables from allow-listed expressions (``+ - * / **``, comparisons, `FUNCTIONS`); lazily.

    Expressions name data variables and coordinates of the input, e.g.
    ``{"celsius": "temperature - 273.15", "wind": "sqrt(u**2 + v**2)"}``. They are
    parsed by `adapters.expressions`, never evaluated as Python.
    """
    import re

    ds = ctx.open_dataset(params.data)
    trees = {}
    for name, text in params.variables.items():
        if not re.match(NAME, name):
            raise InvalidParametersError(f"{name!r} is not a valid variable name")
        if name in ds.coords or name in ds.dims:
            # Data moved onto a coordinate would be described (ranges) and grouped by as if it were an axis.
            raise InvalidParametersError(f"{name!r} is a coordinate or dimension of the data; derive a variable with another name")
        trees[name] = parse(text)
    env = {str(k): v for k, v in ds.coords.items()} | {str(k): v for k, v in ds.data_vars.items()}
    derived = {}
    for name, tree in trees.items():
        missing = sorted(tree.names() - set(env))
        if missing:
            raise InvalidParametersError(f"expression for {name!r} names {missing}; the data has {sorted(env)}")
        value = tree.evaluate(env)
        if not hasattr(value, "dims"):
            raise InvalidParametersError(f"expression for {name!r} is a constant; it must read at least one variable")
        derived[name] = value.rename(name)
    base = ds if params.keep else ds.drop_vars(list(ds.data_vars))
    return base.assign(derived)


class WriteParams(OperationParams):
    data: DataInput
    variables: list[str] | None = Field(default=None, max_length=256)
    format: Literal["netcdf", "zarr"] = "netcdf"
    chunks: dict[str, int] | None = Field(default=None, max_length=32, description="Chunk sizes of the stored copy.")


@operation("xarray.write", version="1", result="dataset", view=False)
def write(params: WriteParams, ctx: OperationContext) -> Any:
    """Write (a part of) the data to the site's result store as netCDF or zarr; streams chunk by chunk.

    Later operations on this site read the stored copy through its `DataRef`.
    zarr results are one zip file (`adapters.zarr_result`).
    """
    ds = select_variables(ctx.open_dataset(params.data), params.variables)
    if params.chunks:
        check_dims(ds, params.chunks)
        ds = ds.chunk(params.chunks)
    return mark_zarr(ds) if params.format == "zarr" else ds
