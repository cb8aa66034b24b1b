"""Exact federated statistics: merge per-site partial sums into pooled statistics.

Sites return weight totals and weighted sums (``xarray.moments``); adding those
across sites and dividing once gives exactly the statistic of the pooled data,
unlike an average of per-site averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def sum_partials(parts: Sequence[Any]) -> Any:
    """Add partial-sum datasets from several sites, aligning their coordinates (outer join)."""
    import xarray as xr

    if not parts:
        raise ValueError("no partial results to combine")
    aligned = xr.align(*parts, join="outer", fill_value=0)
    total = aligned[0]
    for part in aligned[1:]:
        total = total + part
    return total


def combine_moments(parts: Sequence[Any]) -> Any:
    """Pooled weighted mean, variance, standard deviation and count from `xarray.moments` results."""
    import numpy as np
    import xarray as xr

    total = sum_partials(parts)
    names = sorted({name.rsplit("__", 1)[0] for name in total.data_vars if "__" in name})
    out = {}
    for name in names:
        w, wx, wxx = total[f"{name}__w"], total[f"{name}__wx"], total[f"{name}__wxx"]
        mean = wx / w
        out[f"{name}_mean"] = mean
        out[f"{name}_var"] = np.maximum(wxx / w - mean * mean, 0.0)
        out[f"{name}_std"] = np.sqrt(out[f"{name}_var"])
        out[f"{name}_n"] = total[f"{name}__n"]
    return xr.Dataset(out)
