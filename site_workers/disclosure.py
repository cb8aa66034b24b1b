"""Disclosure rules: minimum group and selection sizes, counted at the site.

The kind of a result is not enough to decide what it discloses: an "aggregate"
over one cell is that cell. Operations count, from the data, how many records
or cells went into each group of an aggregate (``ctx.count_groups``) and how
many records a selection kept (``ctx.check_selection``); :class:`DisclosureRules`
turns those counts into the site's decisions, with the thresholds of
``export.disclosure`` (`site_workers.config.DisclosurePolicy`).

Example:

```python
rules = DisclosureRules(DisclosurePolicy(min_group_size=3))
rules.group_refusal(smallest_group([[5, 0, 1]]))   # 'its smallest non-empty group ... fewer than 3 ...'
rules.check_selection(999, 1000)                   # raises DisclosureRefusedError (1 record left out)
```
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dfm_prefect.core.errors import DisclosureRefusedError
from site_workers.config import DisclosurePolicy


def _arrays(value: Any) -> list[np.ndarray]:
    """The numbers in a computed count container (xarray, pandas, NumPy, lists, numbers)."""
    if hasattr(value, "data_vars"):  # xarray.Dataset
        return [array for var in value.data_vars.values() for array in _arrays(var)]
    if hasattr(value, "to_numpy"):  # xarray.DataArray, pandas Series and DataFrame
        value = value.to_numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"group counts must be numbers, not {array.dtype}")
    return [array.ravel()]


def smallest_group(*counts: Any) -> int:
    """The smallest non-zero count among ``counts`` (0 when every group is empty)."""
    smallest: float | None = None
    for array in (a for value in counts for a in _arrays(value)):
        positive = array[np.nan_to_num(array, nan=0.0) > 0]
        if positive.size:
            low = float(positive.min())
            smallest = low if smallest is None else min(smallest, low)
    # A weighted count below 1 still stands for at least one record.
    return 0 if smallest is None else max(int(np.floor(smallest)), 1)


class DisclosureRules:
    """The site's minimum counts, applied to what operations counted."""

    def __init__(self, policy: DisclosurePolicy) -> None:
        self.policy = policy

    def group_refusal(self, contributors: int | None) -> str | None:
        """Why an aggregate whose smallest group had ``contributors`` may not leave, or None if it may."""
        minimum = self.policy.min_group_size
        if minimum <= 1:
            return None
        if contributors is None:
            return (
                "the operation that produced it did not count the records in its groups, and this site releases "
                f"aggregates only with groups of at least {minimum} (export.disclosure.min_group_size); "
                "use an operation that counts them (xarray.moments, xarray.histogram, table.groupby_aggregate)"
            )
        if contributors < minimum:
            # The exact count is not said: "1 record" is itself a disclosure.
            return (
                f"a group of this aggregate holds fewer than {minimum} records or cells, the minimum this site "
                f"releases (export.disclosure.min_group_size: {minimum}); aggregate over more data "
                "(wider groups, more dimensions, a coarser frequency or fewer bins)"
            )
        return None

    def check_selection(self, kept: int, total: int, unit: str = "rows", site: str | None = None) -> None:
        """Raise `DisclosureRefusedError` if a selection keeping ``kept`` of ``total`` is too small or too close to all."""
        minimum = self.policy.min_subset_size
        if minimum <= 1:
            return
        if kept < minimum:
            raise DisclosureRefusedError(
                f"the selection keeps fewer than {minimum} {unit}, the smallest subset this site allows "
                f"(export.disclosure.min_subset_size: {minimum}); select more",
                site=site,
            )
        left_out = total - kept
        if 0 < left_out < minimum:
            raise DisclosureRefusedError(
                f"the selection leaves out fewer than {minimum} of its input's {unit} (but some), which "
                f"differencing with the whole would isolate (export.disclosure.min_subset_size: {minimum}); "
                "use the whole input, or leave out more",
                site=site,
            )
