"""Federated climate statistics: per-site subset and reduction, exact combination on the client.

Each site cuts its own regional temperature field to the requested years and
reduces it to area-weighted partial sums per year; only those sums leave the
sites. The client adds them up into the global yearly mean and standard
deviation, exactly as if the data had been pooled, and draws them: the flow
run's artifacts show the picture (matplotlib, the ``demo`` extra; pass
``picture=False`` to leave it out).

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
from dfm_prefect.pictures import publish_png, yearly_statistics_png


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


@task(name="draw-yearly-statistics")
def draw_yearly(stats: dict[int, dict[str, float]], variable: str) -> None:
    """Attach a picture of the pooled statistics to the flow run, with the numbers as a table under it."""
    rows = [f"| {year} | {s['mean']:.4f} | {s['std']:.4f} | {s['n']:,} |" for year, s in sorted(stats.items())]
    table = "\n".join(["| year | mean | std | values |", "|---|---|---|---|", *rows])
    publish_png(yearly_statistics_png(stats, variable=variable), title=f"Pooled yearly {variable}", key="federated-climate-stats", text=table)


@flow(name="federated-climate-stats", task_runner=FederationTaskRunner(), persist_result=True)
def federated_climate_stats(
    datasets: list[str],
    start: str = "2001-01-01",
    stop: str = "2003-12-31",
    variable: str = "temperature",
    picture: bool = True,
) -> dict[int, dict[str, float]]:
    """Global area-weighted yearly mean and standard deviation over datasets held by different sites.

    With ``picture``, the flow run also gets a markdown artifact that shows them as a PNG.
    """
    parts = []
    for data in datasets:
        box = subset.submit(data=data, variables=[variable], ranges={"time": {"start": start, "stop": stop}})
        parts.append(moments.submit(data=box, dims=["lat", "lon"], groupby="time.year", weights="area"))
    stats = combine_yearly(parts, variable)
    if picture:
        draw_yearly(stats, variable)
    return stats


def main(argv: list[str]) -> Any:
    return federated_climate_stats(datasets=argv or ["dfm://north/temperature", "dfm://south/temperature"])


if __name__ == "__main__":
    print(main(sys.argv[1:]))
