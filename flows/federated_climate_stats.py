"""Federated climate statistics: per-site subset and reduction, exact combination on the client.

Each site cuts its own regional temperature field to the requested years and
reduces it to area-weighted partial sums per year; only those sums leave the
sites. The client adds them up into the global yearly mean and standard
deviation, exactly as if the data had been pooled.

Run it against a running federation::

    DFM_FEDERATION=.demo/federation.json python -m flows.federated_climate_stats \\
        dfm://north/temperature dfm://south/temperature
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow, task

from adapters.combine import combine_moments
from adapters.xarray_ops import moments, subset
from dfm_prefect import DataRef, FederationTaskRunner


@task(name="combine-yearly-statistics")
def combine_yearly(parts: list[DataRef], variable: str) -> dict[int, dict[str, float]]:
    """Fetch each site's partial sums (small aggregates) and pool them exactly."""
    pooled = combine_moments([part.fetch() for part in parts])
    return {
        int(year): {
            "mean": float(pooled[f"{variable}_mean"].sel(year=year)),
            "std": float(pooled[f"{variable}_std"].sel(year=year)),
            "n": int(pooled[f"{variable}_n"].sel(year=year)),
        }
        for year in pooled["year"].values
    }


@flow(name="federated-climate-stats", task_runner=FederationTaskRunner(), persist_result=True)
def federated_climate_stats(
    datasets: list[str],
    start: str = "2001-01-01",
    stop: str = "2003-12-31",
    variable: str = "temperature",
) -> dict[int, dict[str, float]]:
    """Global area-weighted yearly mean and standard deviation over datasets held by different sites."""
    parts = []
    for data in datasets:
        box = subset.submit(data=data, variables=[variable], ranges={"time": {"start": start, "stop": stop}})
        parts.append(moments.submit(data=box, dims=["lat", "lon"], groupby="time.year", weights="area"))
    return combine_yearly(parts, variable)


def main(argv: list[str]) -> Any:
    return federated_climate_stats(datasets=argv or ["dfm://north/temperature", "dfm://south/temperature"])


if __name__ == "__main__":
    print(main(sys.argv[1:]))
