"""Statistics over gridded data: partial sums and histograms that merge exactly across sites.

`moments` and `histogram` return sums and counts, never averages: adding the
results of several sites (`adapters.combine`) gives exactly the statistic of
the pooled data. `weighted_mean`, `groupby_reduce` and `resample` give a site's
own answer directly. Every one streams Dask chunks (on the GPU at GPU sites).

Example:

```python
from adapters.xarray_stats import histogram, moments
from adapters.combine import combine_histograms, combine_moments

parts = [moments.submit(data=f"dfm://{s}/temperature", dims=["time", "lat", "lon"], weights="area") for s in sites]
pooled = combine_moments([p.result().fetch() for p in parts])          # exact pooled mean and variance
hists = [histogram.submit(data=f"dfm://{s}/temperature", bins={"start": 200, "stop": 330, "count": 130}) for s in sites]
counts = combine_histograms([h.result().fetch() for h in hists])
```
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from adapters.xarray_common import (
    GROUP,
    NAME,
    Dims,
    Stat,
    apply_stat,
    area_weights,
    cells,
    check_dims,
    compute_counted,
    contributors,
    nan_to_zero,
    numeric,
    on_device,
    select_variables,
    without_point_data,
)
from dfm_prefect.core.errors import InvalidParametersError
from dfm_prefect.core.operations import DataInput, OperationContext, OperationParams, operation


class MomentsParams(OperationParams):
    data: DataInput
    variables: list[str] | None = Field(default=None, max_length=256)
    dims: Dims
    groupby: str | None = Field(default=None, pattern=GROUP)
    weights: Literal["none", "area"] = "none"
    lat: str = Field(default="lat", pattern=NAME)


@operation("xarray.moments", version="1", result="aggregate")
def moments(params: MomentsParams, ctx: OperationContext) -> Any:
    """Weight totals, weighted sums and sums of squares over ``dims`` (optionally per group).

    The result is exactly mergeable across sites: `adapters.combine.combine_moments`
    turns the results of several sites into the pooled mean, variance and count.
    Area weights depend on latitude alone, so the data is first summed over the
    other dimensions (float64 accumulators, one pass per term) and weighted after.
    """
    return _moments(numeric(select_variables(ctx.open_dataset(params.data), params.variables)), params, ctx)


def _moments(ds: Any, params: MomentsParams, ctx: OperationContext) -> Any:
    import xarray as xr

    check_dims(ds, params.dims)
    weighted = params.weights == "area"
    area = area_weights(ds, params.lat) if weighted else None
    ds = on_device(ctx, ds)
    terms = {}
    for name, var in ds.data_vars.items():
        x = nan_to_zero(var) if var.dtype.kind == "f" else var
        terms[f"{name}__n"] = var.notnull()
        terms[f"{name}__nz"] = contributors(var)
        terms[f"{name}__wx"] = x
        terms[f"{name}__wxx"] = x.astype("float64") ** 2
    frame = xr.Dataset(terms)
    reduced_lat = weighted and params.lat in params.dims
    inner = [d for d in params.dims if not (reduced_lat and d == params.lat)]
    if params.groupby:
        group_dim = params.groupby.split(".")[0]
        if group_dim not in frame.dims:
            raise InvalidParametersError(f"cannot group by {params.groupby!r}: no dimension {group_dim!r}")
        inner = list(dict.fromkeys([group_dim, *inner]))
        partial = frame.groupby(params.groupby).sum(dim=inner, dtype="float64", skipna=False)
    else:
        partial = frame.sum(dim=inner, dtype="float64", skipna=False) if inner else frame.astype("float64")
    weight = on_device(ctx, area) if weighted else None
    out = {}
    for name in ds.data_vars:
        n, sx, sxx, nz = partial[f"{name}__n"], partial[f"{name}__wx"], partial[f"{name}__wxx"], partial[f"{name}__nz"]
        if weight is not None:
            n_w, sx, sxx = n * weight, sx * weight, sxx * weight
        else:
            n_w = n
        if reduced_lat:
            n, n_w, sx, sxx, nz = (term.sum(dim=params.lat) for term in (n, n_w, sx, sxx, nz))
        out[f"{name}__w"], out[f"{name}__wx"], out[f"{name}__wxx"], out[f"{name}__n"] = n_w, sx, sxx, n
        out[f"{name}__nz"] = nz
    (result,) = ctx.compute(xr.Dataset(out))
    for name in ds.data_vars:
        result[f"{name}__n"] = result[f"{name}__n"].round().astype("int64")
    # Contributors are the present, non-zero cells: a zero-masked cell hides nothing.
    ctx.count_groups(*(result[f"{name}__nz"] for name in ds.data_vars))
    result = without_point_data(result.drop_vars([f"{name}__nz" for name in ds.data_vars]))
    result.attrs["dfm_moments"] = ",".join(ds.data_vars)
    return result


class MomentsStreamParams(MomentsParams):
    along: str = Field(default="time", pattern=NAME, description="The dimension whose blocks make the items.")
    step: int | None = Field(default=None, ge=1, description="Indexes of ``along`` per item (default: the data's chunk size along it).")


@operation("xarray.moments_stream", version="1", result="aggregate", stream=True)
def moments_stream(params: MomentsStreamParams, ctx: OperationContext) -> Iterator[Any]:
    """`moments` of each block along a dimension (each time chunk, say), one item per block, sent as each is computed.

    Adding the items (`adapters.combine.combine_moments`) gives the moments of the
    whole; reading them as they come shows a running answer long before the last
    block is read. Each item is a result of its own: its smallest group is counted
    and checked against the site's disclosure rules on its own, and each block is a
    selection of the data held to the same rules as a subset (``min_subset_size``:
    blocks too small, or leaving out too little, are refused before any item is made,
    so no item can be subtracted from the whole to isolate a few cells).
    """
    ds = numeric(select_variables(ctx.open_dataset(params.data), params.variables))
    if params.along not in ds.dims:
        raise InvalidParametersError(f"cannot stream along {params.along!r}: the data's dimensions are {sorted(map(str, ds.dims))}")
    size = int(ds.sizes[params.along])
    try:
        chunks = ds.chunks.get(params.along) if ds.chunks else None
    except ValueError:  # variables chunked differently: no one chunk size to follow
        chunks = None
    step = params.step or (int(chunks[0]) if chunks else size)
    blocks = [ds.isel({params.along: slice(start, start + step)}) for start in range(0, size, step)]
    whole = cells(ds)
    for block in blocks:
        ctx.check_selection(cells(block), whole, unit="cells")
    for block in blocks:
        yield _moments(block, params, ctx)


class WeightedMeanParams(OperationParams):
    data: DataInput
    variables: list[str] | None = Field(default=None, max_length=256)
    dims: Dims
    weights: str = Field(default="area", pattern=NAME, description="'area' (cos latitude) or a data variable of weights.")
    lat: str = Field(default="lat", pattern=NAME)


@operation("xarray.weighted_mean", version="1", result="aggregate")
def weighted_mean(params: WeightedMeanParams, ctx: OperationContext) -> Any:
    """Weighted mean over ``dims``: by cell area (cos latitude) or by a weights variable; NaNs skipped."""
    ds = ctx.open_dataset(params.data)
    if params.weights == "area":
        weight = on_device(ctx, area_weights(ds, params.lat))
    elif params.weights in ds.data_vars:
        weight = on_device(ctx, ds[params.weights].astype("float64").fillna(0.0))
        ds = ds.drop_vars(params.weights)
    else:
        raise InvalidParametersError(f"weights must be 'area' or a data variable; the data has {sorted(ds.data_vars)}")
    ds = numeric(select_variables(ds, params.variables))
    check_dims(ds, params.dims)
    x = on_device(ctx, ds).astype("float64")
    total = nan_to_zero(x * weight).sum(dim=params.dims)
    mass = (x.notnull() * weight).sum(dim=params.dims)
    # A cell with weight 0 adds nothing to the mean, so it does not count as a contributor.
    counted = (contributors(x) & (weight != 0)).sum(dim=params.dims)
    return compute_counted(ctx, total / mass, counted)


class BinRange(OperationParams):
    """``count`` equal bins from ``start`` to ``stop``."""

    start: float
    stop: float
    count: int = Field(ge=1, le=100_000)

    @model_validator(mode="after")
    def _ordered(self) -> BinRange:
        if not (np.isfinite(self.start) and np.isfinite(self.stop) and self.stop > self.start):
            raise ValueError("bins need finite start < stop")
        return self


class HistogramParams(OperationParams):
    data: DataInput
    variables: list[str] | None = Field(default=None, max_length=256)
    bins: list[float] | BinRange = Field(description="Bin edges (increasing) or an equal-width range.")
    weights: Literal["none", "area"] = "none"
    lat: str = Field(default="lat", pattern=NAME)

    @field_validator("bins")
    @classmethod
    def _edges(cls, value: list[float] | BinRange) -> list[float] | BinRange:
        if isinstance(value, list):
            edges = np.asarray(value, dtype="float64")
            if not 2 <= edges.size <= 100_001 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
                raise ValueError("bin edges must be 2 to 100001 finite, strictly increasing numbers")
        return value


def bin_edges(bins: list[float] | BinRange) -> np.ndarray:
    """The edges a histogram uses: every site computes the same ones from the same parameters."""
    if isinstance(bins, BinRange):
        return np.linspace(bins.start, bins.stop, bins.count + 1)
    return np.asarray(bins, dtype="float64")


def _block_histogram(
    block: Any, weights: Any = None, *, edges: np.ndarray, uniform: bool, ndim: int, weighted: bool
) -> np.ndarray:
    """Counts (and weight sums) per bin, then below, above and NaN, for one chunk; on the host."""
    on_gpu = type(block).__module__.startswith("cupy")
    xp = sys.modules["cupy"] if on_gpu else np
    if not on_gpu:
        block, weights = np.asarray(block), (np.asarray(weights) if weighted else None)
        if uniform:
            return _host_histogram(block, weights, edges).reshape((1,) * ndim + (-1,))
    x = block.astype("float64").ravel()
    w = xp.broadcast_to(xp.asarray(weights), block.shape).ravel() if weighted else None
    nan = xp.isnan(x)
    below = x < edges[0]
    above = x > edges[-1]
    inside = ~(nan | below | above)
    # Equal bins take NumPy's (and CuPy's) arithmetic path, which checks against the same edges.
    bins: dict[str, Any] = {"bins": len(edges) - 1, "range": (edges[0], edges[-1])} if uniform else {"bins": xp.asarray(edges)}
    values = x[inside]
    out = [xp.histogram(values, **bins)[0].astype("float64")]
    out.append(xp.stack([below.sum(), above.sum(), nan.sum()]).astype("float64"))
    if weighted:
        out.append(xp.histogram(values, weights=w[inside], **bins)[0])
        out.append(xp.stack([w[below].sum(), w[above].sum(), w[nan].sum()]).astype("float64"))
    result = xp.concatenate(out)
    if on_gpu:
        result = result.get()
    return result.reshape((1,) * ndim + (-1,))


def _host_histogram(block: np.ndarray, weights: np.ndarray | None, edges: np.ndarray) -> np.ndarray:
    """`_block_histogram` for equal bins on the host, in one pass of NumPy's histogram over the block as it is.

    NumPy leaves out NaN and values outside the range, compares against float64
    edges (the range is given as float64 scalars, so a float32 block is compared
    exactly, not against edges rounded to float32) and bins with the same
    corrections as on float64 values: the counts equal those of the float64 copy
    the general path makes, at about half the cost.
    """
    x = block.ravel()
    lo, hi = np.float64(edges[0]), np.float64(edges[-1])
    bins, span = len(edges) - 1, (lo, hi)
    below, above, nan = x < lo, x > hi, np.isnan(x)
    out = [np.histogram(x, bins=bins, range=span)[0].astype("float64"), np.array([np.count_nonzero(m) for m in (below, above, nan)], dtype="float64")]
    if weights is not None:
        w = np.broadcast_to(weights, block.shape).ravel()
        out.append(np.histogram(x, bins=bins, range=span, weights=w)[0].astype("float64"))
        out.append(np.array([w[below].sum(), w[above].sum(), w[nan].sum()], dtype="float64"))
    return np.concatenate(out)


def _histogram(var: Any, weight: Any, edges: np.ndarray, uniform: bool) -> Any:
    """A lazy 1-D array: per-bin counts, below, above, NaN (then the same for weights)."""
    import dask.array as da

    x = var.data if isinstance(var.data, da.Array) else da.from_array(var.data, chunks="auto")
    ndim = x.ndim
    weighted = weight is not None
    width = (len(edges) - 1 + 3) * (2 if weighted else 1)
    if weighted:
        shape = [1] * ndim
        axis = var.dims.index(weight.dims[0])
        shape[axis] = x.shape[axis]
        chunks = tuple((1,) if i != axis else x.chunks[axis] for i in range(ndim))
        w = da.from_array(np.asarray(weight.values, dtype="float64").reshape(shape), chunks=chunks)
    parts = da.map_blocks(
        _block_histogram,
        *([x, w] if weighted else [x]),
        edges=edges,
        uniform=uniform,
        ndim=ndim,
        weighted=weighted,
        new_axis=[ndim],
        chunks=tuple((1,) * len(c) for c in x.chunks) + ((width,),),
        dtype="float64",
        meta=np.empty((0,) * (ndim + 1), dtype="float64"),
    )
    return parts.sum(axis=tuple(range(ndim)))


@operation("xarray.histogram", version="1", result="aggregate")
def histogram(params: HistogramParams, ctx: OperationContext) -> Any:
    """Counts per fixed bin (plus below-range, above-range and NaN counts), optionally area-weighted.

    Counts are exact and add up across sites: `adapters.combine.combine_histograms`.
    Bins are half-open ``[a, b)`` except the last, which includes its upper edge (as in NumPy).
    """
    import xarray as xr

    ds = numeric(select_variables(ctx.open_dataset(params.data), params.variables))
    edges = bin_edges(params.bins)
    weight = area_weights(ds, params.lat) if params.weights == "area" else None
    ds = on_device(ctx, ds)
    names = list(ds.data_vars)
    uniform = isinstance(params.bins, BinRange)
    lazy = [_histogram(ds[name], weight if weight is not None and weight.dims[0] in ds[name].dims else None, edges, uniform) for name in names]
    if weight is not None and any(weight.dims[0] not in ds[name].dims for name in names):
        raise InvalidParametersError(f"area weights need every variable to have dimension {weight.dims[0]!r}")
    computed = ctx.compute(*lazy)
    nbins = len(edges) - 1
    out: dict[str, Any] = {}
    for name, values in zip(names, computed):
        values = np.asarray(values)
        ctx.count_groups(values[: nbins + 3])  # every bin, below, above and NaN is a group
        out[f"{name}__count"] = ("bin", values[:nbins].astype("int64"))
        for i, side in enumerate(("below", "above", "nan")):
            out[f"{name}__{side}"] = ((), np.int64(values[nbins + i]))
        if weight is not None:
            start = nbins + 3
            out[f"{name}__weight"] = ("bin", values[start : start + nbins])
            for i, side in enumerate(("below", "above", "nan")):
                out[f"{name}__weight_{side}"] = ((), values[start + nbins + i])
    coords = {"bin": np.arange(nbins), "bin_start": ("bin", edges[:-1]), "bin_stop": ("bin", edges[1:])}
    return xr.Dataset(out, coords=coords, attrs={"dfm_histogram": ",".join(names)})


class GroupbyReduceParams(OperationParams):
    data: DataInput
    variables: list[str] | None = Field(default=None, max_length=256)
    group: str = Field(pattern=GROUP, description="A coordinate, or time.year / time.month / time.season / ...")
    stat: Stat = "mean"
    dims: list[str] = Field(default_factory=list, max_length=16, description="Other dimensions reduced too.")


@operation("xarray.groupby_reduce", version="1", result="aggregate")
def groupby_reduce(params: GroupbyReduceParams, ctx: OperationContext) -> Any:
    """One statistic per group (e.g. per month of ``time``), over the group's dimension and ``dims``."""
    ds = numeric(select_variables(ctx.open_dataset(params.data), params.variables))
    group_dim = params.group.split(".")[0]
    check_dims(ds, [*params.dims])
    if group_dim not in ds.coords:
        raise InvalidParametersError(f"cannot group by {params.group!r}: no coordinate {group_dim!r}")
    ds = on_device(ctx, ds)
    over = list(dict.fromkeys([*ds[group_dim].dims, *params.dims]))
    grouped = ds.groupby(params.group)
    counted = contributors(ds).groupby(params.group).sum(dim=over)
    return compute_counted(ctx, apply_stat(grouped, params.stat, over), counted)


class ResampleParams(OperationParams):
    data: DataInput
    variables: list[str] | None = Field(default=None, max_length=256)
    freq: str = Field(pattern=r"^[1-9]?[0-9]{0,3}(h|D|W|MS|ME|QS|QE|YS|YE)$", description="e.g. 1D, 7D, MS, QS-like, YS")
    stat: Stat = "mean"
    time: str = Field(default="time", pattern=NAME)
    dims: list[str] = Field(default_factory=list, max_length=16, description="Other dimensions reduced too.")


@operation("xarray.resample", version="1", result="aggregate")
def resample(params: ResampleParams, ctx: OperationContext) -> Any:
    """One statistic per time bin (``freq``: pandas offsets such as 7D, MS, QS, YS), over time and ``dims``."""
    ds = numeric(select_variables(ctx.open_dataset(params.data), params.variables))
    check_dims(ds, [params.time, *params.dims])
    ds = on_device(ctx, ds)
    over = list(dict.fromkeys([params.time, *params.dims]))
    binned = ds.resample({params.time: params.freq})
    counted = contributors(ds).resample({params.time: params.freq}).sum(dim=over)
    return compute_counted(ctx, apply_stat(binned, params.stat, over), counted)
