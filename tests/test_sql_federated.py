"""Two hospitals, each with its visits table in its own PostgreSQL database: pooled statistics from site aggregates.

The flow in ``flows/federated_sql_stats.py`` runs ``sql.aggregate`` at each
site (real site processes, each reading its database with a password from its
own environment) and pools the partial sums on the client; the answer must
equal the same statistics computed on the pooled rows, on both transports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pandas as pd
import pytest

from dfm_prefect.testing.postgres import LocalPostgres
from flows.federated_sql_stats import federated_sql_stats
from tests.conftest import ROOT, TRANSPORTS
from tests.support_sites import private_federation, private_flare_federation
from tests.test_adapters_sql import visits

PASSWORD_ENV = "DFM_HOSPITAL_DB_PASSWORD"
HOSPITALS = {"north": 11, "south": 12}


@pytest.fixture(scope="module")
def hospitals():
    """One PostgreSQL server with a database per hospital, each holding that hospital's visits."""
    with LocalPostgres() as pg:
        rows = {}
        for name, seed in HOSPITALS.items():
            pg.create_database(f"{name}_clinic")
            rows[name] = visits(seed, rows=1500 + seed)
            engine = pg.engine(database=f"{name}_clinic")
            rows[name].to_sql("visits", engine, index=False)
            engine.dispose()
        yield pg, rows


def hospital_site(name: str, pg: LocalPostgres, store) -> dict[str, object]:
    return {
        "name": name,
        "operations": ["sql.aggregate"],  # query.stays_since is offered because the database declares it
        "databases": [
            {
                "name": "clinic",
                "url": pg.url(password=False, database=f"{name}_clinic"),
                "password": "${env:" + PASSWORD_ENV + "}",
                "tables": [{"name": "visits", "columns": ["ward", "age", "stay_days", "admitted"]}],
                "queries": [
                    {
                        "name": "stays_since",
                        "description": "Visits and days in hospital per ward since a date.",
                        "sql": "SELECT ward, count(*) AS n, sum(stay_days) AS stay_sum FROM visits WHERE admitted >= :since GROUP BY ward",
                        "params": {"since": {"type": "date"}},
                        "result": "aggregate",
                        "counts": "n",
                    }
                ],
            }
        ],
        "result_store": {"url": f"file://{store}"},
        "export": {"kinds": ["aggregate"], "disclosure": {"min_group_size": 5}},
    }


@pytest.fixture(scope="module", params=TRANSPORTS)
def mesh(request, hospitals, tmp_path_factory):
    pg, _ = hospitals
    root = tmp_path_factory.mktemp(f"hospitals-{request.param}")
    configs = {name: hospital_site(name, pg, root / "store" / name) for name in HOSPITALS}
    start = private_federation if request.param == "local" else private_flare_federation
    with start(root, configs, env={PASSWORD_ENV: pg.password}) as fed:
        yield fed


@pytest.mark.slow
def test_pooled_statistics_equal_the_query_on_pooled_rows(mesh, hospitals, prefect_api):
    from dfm_prefect.task_runner import FederationTaskRunner

    _, rows = hospitals
    where = [{"column": "age", "op": ">=", "value": 18}]
    flow = federated_sql_stats.with_options(task_runner=FederationTaskRunner(mesh.federation_file))
    got = pd.DataFrame(flow(sites=list(HOSPITALS), where=where))
    pooled = pd.concat(rows.values(), ignore_index=True)
    adults = pooled[pooled.age >= 18].groupby("ward")["stay_days"]
    want = pd.DataFrame({"n": adults.count(), "mean": adults.mean(), "std": adults.std(), "min": adults.min(), "max": adults.max()}).reset_index()
    pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=1e-9)
    assert np.all(got["n"] > 100)


@pytest.mark.slow
def test_the_catalog_command_shows_the_database_operations_with_their_schemas(mesh):
    command = [sys.executable, "-m", "dfm_prefect.cli", "catalog", "north", "--json", "--federation", str(mesh.federation_file)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    operations = json.loads(done.stdout)["north"]["operations"]
    schema = operations["sql.aggregate"]["params_schema"]
    assert operations["sql.aggregate"]["result_kind"] == "aggregate"
    assert schema["properties"]["database"]["const"] == "clinic" and schema["properties"]["table"]["const"] == "visits"
    assert {"by", "aggregations", "where"} <= set(schema["properties"])


@pytest.mark.slow
def test_a_named_query_is_a_task_in_a_flow(mesh, hospitals, prefect_api):
    from prefect import flow

    from dfm_prefect import FederationTaskRunner, site_operation

    _, rows = hospitals

    @flow(task_runner=FederationTaskRunner(mesh.federation_file))
    def stays() -> list[Any]:
        stays_since = site_operation("query.stays_since")
        futures = [stays_since.submit(since="2024-01-01", site=site) for site in HOSPITALS]
        return [future.result().fetch() for future in futures]

    parts = stays()
    got = pd.concat(parts).groupby("ward")[["n", "stay_sum"]].sum().sort_index()
    pooled = pd.concat(rows.values(), ignore_index=True)
    recent = pooled[pd.to_datetime(pooled.admitted) >= "2024-01-01"].groupby("ward")
    want = pd.DataFrame({"n": recent.size(), "stay_sum": recent["stay_days"].sum()}).sort_index()
    pd.testing.assert_frame_equal(got, want, check_dtype=False, check_names=False)
