"""Federated statistics over hospital databases: each site aggregates in its own database, the client pools exactly.

Every site runs ``sql.aggregate`` on its own table (count, sum, sum of squares,
min and max per group, computed by the database); only those per-group
partials leave the sites, and only for groups the sites' disclosure rules
release. The client adds them up into the pooled mean, standard deviation,
minimum and maximum per group: exactly what the same query gives on the pooled
rows.

Run it against a running federation whose sites declare a ``clinic`` database::

    DFM_FEDERATION=.dfm/federation.json python -m flows.federated_sql_stats north south
"""

from __future__ import annotations

import math
import sys
from typing import Any

from prefect import flow, task

from adapters.combine import combine_grouped
from adapters.sql import aggregate
from dfm_prefect import DataRef, FederationTaskRunner


@task(name="pool-group-statistics")
def pool_groups(parts: list[DataRef], by: list[str]) -> list[dict[str, Any]]:
    """Fetch each site's per-group partial sums and derive the pooled statistics from their totals."""
    pooled = combine_grouped([part.fetch() for part in parts], by=by, how={"n": "sum", "total": "sum", "squares": "sum", "low": "min", "high": "max"})
    rows = []
    for record in pooled.to_dict("records"):
        n = int(record["n"])
        mean = record["total"] / n
        variance = max(record["squares"] / n - mean * mean, 0.0) * n / (n - 1) if n > 1 else 0.0
        rows.append({**{key: record[key] for key in by}, "n": n, "mean": mean, "std": math.sqrt(variance), "min": record["low"], "max": record["high"]})
    return rows


@flow(name="federated-sql-stats", task_runner=FederationTaskRunner(), persist_result=True)
def federated_sql_stats(
    sites: list[str],
    column: str = "stay_days",
    by: list[str] | None = None,
    database: str = "clinic",
    table: str = "visits",
    where: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Pooled count, mean, sample standard deviation, min and max of ``column`` per group, over every site's table."""
    by = by or ["ward"]
    aggregations = {
        "n": {"column": column, "func": "count"},
        "total": {"column": column, "func": "sum"},
        "squares": {"column": column, "func": "sumsq"},
        "low": {"column": column, "func": "min"},
        "high": {"column": column, "func": "max"},
    }
    parts = [
        aggregate.submit(database=database, table=table, by=by, aggregations=aggregations, where=where or [], site=site) for site in sites
    ]
    return pool_groups(parts, by)


def main(argv: list[str]) -> Any:
    return federated_sql_stats(sites=argv or ["north", "south"])


if __name__ == "__main__":
    print(main(sys.argv[1:]))
