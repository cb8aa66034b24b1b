"""Exact federated statistics: merge per-site partial sums into pooled statistics.

Sites return weight totals and weighted sums (``xarray.moments``), bin counts
(``xarray.histogram``) or per-group sums and counts (``table.groupby_aggregate``);
adding those across sites and dividing once gives exactly the statistic of the
pooled data, unlike an average of per-site averages.

Example:

```python
from adapters.combine import combine_histograms, combine_moments

stats = combine_moments([north.fetch(), south.fetch()])      # temperature_mean, _var, _std, _n
hist = combine_histograms([h_north.fetch(), h_south.fetch()])  # temperature__count per bin, ...
```
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


def combine_histograms(parts: Sequence[Any]) -> Any:
    """Pooled `xarray.histogram` results: counts (and weights) per bin added across sites.

    Every part must use the same bin edges; a part with other edges raises
    ``ValueError`` rather than silently mixing bins.
    """
    import numpy as np

    if not parts:
        raise ValueError("no partial results to combine")
    first = parts[0]
    for part in parts[1:]:
        if part.sizes.get("bin") != first.sizes.get("bin") or not (
            np.array_equal(part["bin_start"].values, first["bin_start"].values)
            and np.array_equal(part["bin_stop"].values, first["bin_stop"].values)
        ):
            raise ValueError("histograms with different bin edges cannot be combined; ask every site for the same bins")
    total = first.copy()
    for part in parts[1:]:
        total = total + part.reset_coords(drop=True)
    return total.assign_coords(bin_start=first["bin_start"], bin_stop=first["bin_stop"])


def combine_grouped(parts: Sequence[Any], *, by: Sequence[str], how: dict[str, str]) -> Any:
    """Pooled `table.groupby_aggregate` results: each column merged with ``how[column]``.

    ``how`` maps output columns to ``"sum"`` (sums, counts, sums of squares), ``"min"``
    or ``"max"``; those merge exactly. Per-site means and standard deviations do not:
    ask the sites for ``sum``, ``count`` and ``sumsq`` and derive them from the pooled
    sums instead.
    """
    import pandas as pd

    unknown = sorted(set(how.values()) - {"sum", "min", "max"})
    if unknown:
        raise ValueError(f"only sum, min and max merge exactly across sites, not {unknown}")
    if not parts:
        raise ValueError("no partial results to combine")
    pooled = pd.concat(list(parts), ignore_index=True).groupby(list(by), sort=True).agg(how)
    return pooled.reset_index()
