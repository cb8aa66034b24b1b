"""A pipeline across sites: cut where the data is, compute at a compute site, only the answer to the client.

The site that holds the data cuts the years asked (a view: nothing is copied);
the heavy step runs at a compute site named by the flow (``compute_site``), so
the cut moves there site to site, under both sites' policies (the data site's
``export.sites``, the compute site's ``imports``), as a task run of its own
(``move@north→hub``); the compute site reduces it, and only the small yearly
statistics reach the client.

Run it against a running federation with a data site and a compute site::

    DFM_FEDERATION=.dfm/federation.json python -m flows.cross_site_pipeline dfm://north/temperature hub
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow, task

from adapters.combine import combine_moments
from adapters.xarray_ops import derive, subset
from adapters.xarray_stats import moments
from dfm_prefect import DataRef, FederationTaskRunner


@task(name="yearly-anomaly-statistics")
def yearly(part: DataRef) -> dict[int, dict[str, float]]:
    """The compute site's sums (a small aggregate), as yearly mean and standard deviation."""
    pooled = combine_moments([part.fetch()])
    return {
        int(year): {"mean": float(pooled["anomaly_mean"].sel(year=year)), "std": float(pooled["anomaly_std"].sel(year=year))}
        for year in pooled["year"].values
    }


@flow(name="cross-site-pipeline", task_runner=FederationTaskRunner())
def cross_site_pipeline(
    data: str = "dfm://north/temperature",
    compute_site: str = "hub",
    start: str = "2001-01-01",
    stop: str = "2001-12-31",
    variable: str = "temperature",
    baseline: float = 273.15,
) -> dict[int, dict[str, float]]:
    """Yearly area-weighted statistics of the anomaly from ``baseline``, computed at ``compute_site``."""
    box = subset.submit(data=data, variables=[variable], ranges={"time": {"start": start, "stop": stop}})
    anomaly = derive.submit(data=box, variables={"anomaly": f"{variable} - {baseline}"}, site=compute_site)
    sums = moments.submit(data=anomaly, dims=["lat", "lon"], groupby="time.year", weights="area")
    return yearly(sums)


def main(argv: list[str]) -> Any:
    data, compute_site = (argv + ["dfm://north/temperature", "hub"][len(argv) :])[:2]
    return cross_site_pipeline(data=data, compute_site=compute_site)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
