"""Operations on gridded data (xarray over Dask), run lazily next to the data.

Example:

```python
from adapters.xarray_ops import subset, moments
from dfm_prefect.combine import combine_moments

box = subset.submit(data="dfm://north/temperature", ranges={"time": {"start": "2001", "stop": "2002"}})
agg = moments.submit(data=box, dims=["lat", "lon"], groupby="time.year", weights="area")
stats = combine_moments([agg.result().fetch()])   # mean, var, std per year
```
"""

from __future__ import annotations

from typing import Any, Literal, Union

import numpy as np
from pydantic import Field, field_validator

from dfm_prefect.errors import InvalidParametersError
from dfm_prefect.operations import DataInput, OperationParams, operation

Label = Union[float, int, str]
_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$"


class Range(OperationParams):
    """An inclusive label range; either end may be open."""

    start: Label | None = None
    stop: Label | None = None


class SubsetParams(OperationParams):
    data: DataInput
    variables: list[str] | None = Field(default=None, max_length=256)
    ranges: dict[str, Range] = Field(default_factory=dict, max_length=32)
    points: dict[str, Union[Label, list[Label]]] = Field(default_factory=dict, max_length=32)
    nearest: dict[str, Union[float, list[float]]] = Field(default_factory=dict, max_length=32)


def _select_variables(ds: Any, variables: list[str] | None) -> Any:
    if variables is None:
        return ds
    missing = sorted(set(variables) - set(ds.data_vars))
    if missing:
        raise InvalidParametersError(f"no variables {missing}; the data has {sorted(ds.data_vars)}")
    return ds[variables]


def _check_dims(ds: Any, dims: list[str] | dict[str, Any]) -> None:
    missing = sorted(set(dims) - set(ds.dims))
    if missing:
        raise InvalidParametersError(f"no dimensions {missing}; the data has {sorted(ds.dims)}")


@operation("xarray.subset", version="1", result="dataset")
def subset(params: SubsetParams, ctx: Any) -> Any:
    """Select variables and label ranges, points or nearest points; the result stays at the site."""
    ds = _select_variables(ctx.open_dataset(params.data), params.variables)
    for group in (params.ranges, params.points, params.nearest):
        _check_dims(ds, group)
    if params.ranges:
        ds = ds.sel({dim: slice(r.start, r.stop) for dim, r in params.ranges.items()})
    if params.points:
        ds = ds.sel(params.points)
    if params.nearest:
        ds = ds.sel(params.nearest, method="nearest")
    return ds


class MomentsParams(OperationParams):
    data: DataInput
    variables: list[str] | None = Field(default=None, max_length=256)
    dims: list[str] = Field(min_length=1, max_length=16)
    groupby: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.(year|month|season|dayofyear|hour))?$")
    weights: Literal["none", "area"] = "none"
    lat: str = Field(default="lat", pattern=_NAME)

    @field_validator("dims")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("dims must not repeat")
        return value


def _weights(ds: Any, params: MomentsParams) -> Any:
    if params.weights == "none":
        return 1.0
    if params.lat not in ds.coords:
        raise InvalidParametersError(f"area weights need a latitude coordinate {params.lat!r}")
    return np.cos(np.deg2rad(ds[params.lat].astype("float64")))


@operation("xarray.moments", version="1", result="aggregate")
def moments(params: MomentsParams, ctx: Any) -> Any:
    """Weight totals, weighted sums and sums of squares over ``dims`` (optionally per group).

    The result is exactly mergeable across sites: `dfm_prefect.combine.combine_moments`
    turns the results of several sites into the pooled mean, variance and count.
    """
    import xarray as xr

    ds = _select_variables(ctx.open_dataset(params.data), params.variables)
    _check_dims(ds, params.dims)
    weight = _weights(ds, params)
    terms = {}
    for name, var in ds.data_vars.items():
        x = var.astype("float64")
        valid = x.notnull()
        w = (valid * weight).astype("float64")
        terms[f"{name}__w"] = w
        terms[f"{name}__wx"] = (x * weight).fillna(0.0)
        terms[f"{name}__wxx"] = (x * x * weight).fillna(0.0)
        terms[f"{name}__n"] = valid.astype("int64")
    frame = xr.Dataset(terms)
    if params.groupby:
        group_dim = params.groupby.split(".")[0]
        if group_dim not in frame.dims:
            raise InvalidParametersError(f"cannot group by {params.groupby!r}: no dimension {group_dim!r}")
        reduced = frame.groupby(params.groupby).sum(dim=list(dict.fromkeys([group_dim, *params.dims])))
    else:
        reduced = frame.sum(dim=params.dims)
    (result,) = ctx.compute(reduced)
    result.attrs["dfm_moments"] = ",".join(ds.data_vars)
    return result


class ReduceParams(OperationParams):
    data: DataInput
    variables: list[str] | None = Field(default=None, max_length=256)
    dims: list[str] = Field(min_length=1, max_length=16)
    stat: Literal["mean", "sum", "min", "max", "std", "var", "count", "median", "quantile"] = "mean"
    q: float | None = Field(default=None, ge=0, le=1)


@operation("xarray.reduce", version="1", result="aggregate")
def reduce(params: ReduceParams, ctx: Any) -> Any:
    """Reduce over ``dims`` with one statistic (``quantile`` needs ``q``)."""
    ds = _select_variables(ctx.open_dataset(params.data), params.variables)
    _check_dims(ds, params.dims)
    if params.stat == "quantile":
        if params.q is None:
            raise InvalidParametersError("stat 'quantile' needs q (0..1)")
        reduced = ds.chunk({dim: -1 for dim in params.dims}).quantile(params.q, dim=params.dims)
    elif params.stat == "median":
        reduced = ds.chunk({dim: -1 for dim in params.dims}).median(dim=params.dims)
    else:
        reduced = getattr(ds, params.stat)(dim=params.dims)
    (result,) = ctx.compute(reduced)
    return result
