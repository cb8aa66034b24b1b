"""Database sources: structured queries and named queries against a real PostgreSQL server and SQLite.

The site (a real `SiteWorker`, called through its message interface) reads
PostgreSQL with a password it takes from its own environment; every answer is
checked against pandas on the same rows.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from dfm_prefect.core.errors import (
    DisclosureRefusedError,
    InvalidParametersError,
    OperationFailedError,
)
from dfm_prefect.core.wire import RunRequest, RunResult
from dfm_prefect.testing.postgres import LocalPostgres
from tests.test_adapters_support import InProcessSite

PASSWORD_ENV = "DFM_TEST_PG_PASSWORD"


def visits(seed: int, rows: int = 2000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(rows) + seed * 100_000,
            "ward": rng.choice(["cardio", "neuro", "onco", "peds"], rows),
            "age": rng.integers(0, 95, rows),
            "stay_days": rng.gamma(2.0, 2.5, rows).round(2),
            "admitted": pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 365, rows), unit="D"),
            "name": [f"patient-{seed}-{i}" for i in range(rows)],
        }
    )


@pytest.fixture(scope="module")
def postgres():
    with LocalPostgres() as pg:
        yield pg


@pytest.fixture(scope="module")
def data():
    return visits(1)


@pytest.fixture(scope="module")
def databases(postgres, data, tmp_path_factory):
    """The same visits table in PostgreSQL and in a SQLite file."""
    import sqlalchemy as sa

    engine = postgres.engine()
    data.to_sql("visits", engine, index=False)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE secrets (id int, note text)")
        conn.exec_driver_sql("INSERT INTO secrets VALUES (1, 'do not tell')")
    engine.dispose()
    path = tmp_path_factory.mktemp("sqlite") / "clinic.db"
    lite = sa.create_engine(f"sqlite:///{path}")
    data.to_sql("visits", lite, index=False)
    lite.dispose()
    return {"postgresql": postgres.url(password=False), "sqlite": f"sqlite:///{path}"}


def clinic(url: str, **extra: object) -> dict[str, object]:
    db: dict[str, object] = {
        "name": "clinic",
        "url": url,
        "tables": ["visits"],
        "queries": [
            {
                "name": "stays_since",
                "sql": "SELECT ward, count(*) AS n, sum(stay_days) AS stay_sum FROM visits WHERE admitted >= :since GROUP BY ward ORDER BY ward",
                "params": {"since": {"type": "date"}},
                "result": "aggregate",
                "counts": "n",
            },
            {
                "name": "ward_rows",
                "sql": "SELECT id, age FROM visits WHERE ward = :ward ORDER BY id",
                "params": {"ward": {"type": "string", "max_length": 64}},
            },
            {"name": "forget", "sql": "DELETE FROM visits WHERE age > :age", "params": {"age": {"type": "integer"}}},
        ],
    }
    if url.startswith("postgresql"):
        db["password"] = "${env:" + PASSWORD_ENV + "}"
        db["queries"].append({"name": "nap", "sql": "SELECT pg_sleep(:seconds) AS slept", "params": {"seconds": {"type": "number"}}})
    db.update(extra)
    return db


def restricted(url: str) -> dict[str, object]:
    """The same visits table, with only two of its columns offered."""
    db: dict[str, object] = {"name": "restricted", "url": url, "tables": [{"name": "visits", "columns": ["ward", "age"]}]}
    if url.startswith("postgresql"):
        db["password"] = "${env:" + PASSWORD_ENV + "}"
    return db


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def site(request, databases, postgres, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(PASSWORD_ENV, postgres.password)
    url = databases[request.param]
    with InProcessSite(
        tmp_path_factory.mktemp("sql-store"),
        [],
        operations=["sql.select", "sql.aggregate"],
        databases=[clinic(url), restricted(url)],
        export={"kinds": ["aggregate", "value", "table"], "max_bytes": 1 << 30, "inline_bytes": 1 << 30, "error_detail": "message"},
    ) as site:
        yield site
    mp.undo()


AGGS = {
    "n": {"column": "stay_days", "func": "count"},
    "total": {"column": "stay_days", "func": "sum"},
    "squares": {"column": "stay_days", "func": "sumsq"},
    "youngest": {"column": "age", "func": "min"},
    "oldest": {"column": "age", "func": "max"},
    "age_sum": {"column": "age", "func": "sum"},
}


def expected_aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    grouped = frame.groupby("ward")
    return pd.DataFrame(
        {
            "n": grouped["stay_days"].count(),
            "total": grouped["stay_days"].sum(),
            "squares": grouped["stay_days"].apply(lambda s: float((s**2).sum())),
            "youngest": grouped["age"].min(),
            "oldest": grouped["age"].max(),
            "age_sum": grouped["age"].sum(),
        }
    ).reset_index()


def test_aggregate_is_computed_in_the_database_and_equals_pandas(site, data):
    where = [{"column": "age", "op": ">=", "value": 18}, {"column": "admitted", "op": ">=", "value": "2024-03-01"}]
    got = site.call("sql.aggregate", database="clinic", table="visits", by=["ward"], aggregations=AGGS, where=where)
    want = expected_aggregate(data[(data.age >= 18) & (data.admitted >= "2024-03-01")])
    assert list(got.columns) == ["ward", *AGGS]
    pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=1e-9)
    assert got["age_sum"].dtype.kind == "i" and got["n"].dtype.kind == "i"


def test_aggregate_without_groups_is_one_row(site, data):
    got = site.call("sql.aggregate", database="clinic", table="visits", aggregations={"n": {"column": "id", "func": "count"}})
    assert got.to_dict("records") == [{"n": len(data)}]


def test_select_columns_filters_order_and_limit(site, data):
    got = site.call(
        "sql.select",
        database="clinic",
        table="visits",
        columns=["id", "ward", "age"],
        where=[{"column": "ward", "op": "in", "value": ["neuro", "peds"]}, {"column": "age", "op": "between", "value": [30, 40]}],
        order_by=["id"],
        limit=50,
    )
    want = data[data.ward.isin(["neuro", "peds"]) & data.age.between(30, 40)].sort_values("id")[["id", "ward", "age"]].head(50)
    pd.testing.assert_frame_equal(got, want.reset_index(drop=True), check_dtype=False)


def test_named_queries_bind_typed_parameters(site, data):
    got = site.call("query.stays_since", since="2024-06-01")
    recent = data[data.admitted >= "2024-06-01"].groupby("ward")
    assert got["ward"].tolist() == sorted(recent.groups)
    assert got["n"].tolist() == recent.size().tolist()
    np.testing.assert_allclose(got["stay_sum"], recent["stay_days"].sum().to_numpy())
    rows = site.call("query.ward_rows", ward="onco")
    assert rows["id"].tolist() == sorted(data[data.ward == "onco"].id.tolist())
    with pytest.raises(InvalidParametersError, match="since"):
        site.call("query.stays_since", since="not a date")
    with pytest.raises(InvalidParametersError, match="sql: Extra inputs"):
        site.call("query.stays_since", since="2024-06-01", sql="SELECT 1")


def test_unlisted_tables_columns_databases_are_refused_and_the_site_keeps_serving(site):
    aggs = {"n": {"column": "id", "func": "count"}}
    with pytest.raises(InvalidParametersError, match="table: Input should be 'visits'"):
        site.call("sql.select", database="clinic", table="secrets")
    with pytest.raises(InvalidParametersError, match="database: Input should be 'clinic' or 'restricted'"):
        site.call("sql.aggregate", database="elsewhere", table="visits", aggregations=aggs)
    schema = site.worker.describe().operations["sql.select"].params_schema  # the catalog lists what may be asked
    assert schema["properties"]["table"]["const"] == "visits" and schema["properties"]["database"]["enum"] == ["clinic", "restricted"]
    with pytest.raises(InvalidParametersError, match="no column 'salary'"):
        site.call("sql.select", database="clinic", table="visits", columns=["salary"])
    with pytest.raises(InvalidParametersError, match="no column 'name'"):
        site.call("sql.select", database="restricted", table="visits", columns=["name"])
    got = site.call("sql.aggregate", database="restricted", table="visits", by=["ward"], aggregations={"n": {"column": "age", "func": "count"}})
    assert got["n"].sum() == 2000
    with pytest.raises(InvalidParametersError, match="numeric"):
        site.call("sql.aggregate", database="clinic", table="visits", aggregations={"s": {"column": "name", "func": "sum"}})
    with pytest.raises(InvalidParametersError, match="holds int"):
        site.call("sql.select", database="clinic", table="visits", where=[{"column": "age", "op": "==", "value": "7"}])
    assert site.call("sql.aggregate", database="clinic", table="visits", aggregations=aggs)["n"].tolist() == [2000]


INJECTIONS = [
    "visits; DROP TABLE visits; --",
    "visits WHERE 1=1 --",
    "x' OR '1'='1",
    "ward\"; DROP TABLE visits; --",
    "1; DELETE FROM visits",
    "' UNION SELECT note, note FROM secrets --",
]


@pytest.mark.parametrize("attack", INJECTIONS)
def test_sql_injection_in_every_string_parameter_is_inert(site, attack):
    aggs = {"n": {"column": "id", "func": "count"}}
    attempts = [
        ("sql.select", {"database": "clinic", "table": attack}),
        ("sql.select", {"database": attack, "table": "visits"}),
        ("sql.select", {"database": "clinic", "table": "visits", "columns": [attack]}),
        ("sql.select", {"database": "clinic", "table": "visits", "order_by": [attack]}),
        ("sql.select", {"database": "clinic", "table": "visits", "where": [{"column": attack, "op": "==", "value": 1}]}),
        ("sql.select", {"database": "clinic", "table": "visits", "where": [{"column": "ward", "op": "==", "value": attack}]}),
        ("sql.select", {"database": "clinic", "table": "visits", "where": [{"column": "ward", "op": "in", "value": [attack, "neuro"]}]}),
        ("sql.aggregate", {"database": "clinic", "table": "visits", "by": [attack], "aggregations": aggs}),
        ("sql.aggregate", {"database": "clinic", "table": "visits", "aggregations": {attack: {"column": "id", "func": "count"}}}),
        ("sql.aggregate", {"database": "clinic", "table": "visits", "aggregations": {"n": {"column": attack, "func": "count"}}}),
        ("query.ward_rows", {"ward": attack}),
    ]
    for op, params in attempts:
        result = site.run(op, **params)
        if result.ok:  # a value compared as a value: it matched no row, or only real ward names
            value = site.call(op, **params)
            assert "note" not in value.columns and not value.astype(str).isin(["do not tell"]).any().any()
        else:
            assert result.error.code in {"invalid_parameters", "access_denied", "unknown_operation", "disclosure_refused"}, (op, result.error)
    # Nothing was dropped or deleted, and the site still answers.
    assert site.call("sql.aggregate", database="clinic", table="visits", aggregations=aggs)["n"].tolist() == [2000]


def test_connections_are_read_only_even_for_the_administrators_sql(site):
    with pytest.raises(OperationFailedError, match="failed the query"):
        site.call("query.forget", age=10)
    aggs = {"n": {"column": "id", "func": "count"}}
    assert site.call("sql.aggregate", database="clinic", table="visits", aggregations=aggs)["n"].tolist() == [2000]


def test_disclosure_rules_apply_to_database_results(site):
    # One patient's row is a selection of one: refused; so is a group of one.
    with pytest.raises(DisclosureRefusedError):
        site.call("sql.select", database="clinic", table="visits", where=[{"column": "id", "op": "==", "value": 100_007}])
    # Groups of one patient: computed, but kept at the site (no value comes back with the reference).
    single = site.run("sql.aggregate", database="clinic", table="visits", by=["id"], aggregations={"a": {"column": "age", "func": "sum"}})
    assert single.ok and single.payload is None and single.ref.contributors is None
    wards = site.run("sql.aggregate", database="clinic", table="visits", by=["ward"], aggregations={"a": {"column": "age", "func": "sum"}})
    assert wards.payload is not None and wards.ref.contributors >= 400
    with pytest.raises(DisclosureRefusedError):  # all rows but one: differencing would isolate it
        site.call("sql.select", database="clinic", table="visits", where=[{"column": "id", "op": "!=", "value": 100_007}])


def test_credentials_never_appear_in_answers(site, postgres):
    if site.worker.config.databases[0].password is None:
        pytest.skip("SQLite takes no password")
    answers = [
        site.worker.describe().model_dump_json(),
        site.run("sql.select", database="clinic", table="nothing").model_dump_json(),
        site.run("query.forget", age=1).model_dump_json(),
        site.run("query.stays_since", since="2024-01-01").model_dump_json(),
        json.dumps(repr(site.worker.config)),
    ]
    for text in answers:
        assert postgres.password not in text


def test_wrong_password_is_a_clear_error_without_the_password(postgres, databases, tmp_path_factory, monkeypatch, caplog):
    caplog.set_level("DEBUG")
    monkeypatch.setenv(PASSWORD_ENV, "wrong-password-123456")
    with InProcessSite(
        tmp_path_factory.mktemp("sql-bad"), [], operations=["sql.aggregate"], databases=[clinic(databases["postgresql"])],
        export={"kinds": ["aggregate"], "error_detail": "message"},
    ) as site:
        result = site.run("sql.aggregate", database="clinic", table="visits", aggregations={"n": {"column": "id", "func": "count"}})
    assert not result.ok and "OperationalError" in result.error.message, result.error
    assert "wrong-password-123456" not in result.model_dump_json()
    assert "wrong-password-123456" not in caplog.text


def test_large_results_stream_in_batches_and_stop_at_max_rows(databases, postgres, tmp_path_factory, monkeypatch, data):
    monkeypatch.setenv(PASSWORD_ENV, postgres.password)
    with InProcessSite(
        tmp_path_factory.mktemp("sql-batches"), [], operations=["sql.select"],
        databases=[clinic(databases["postgresql"], batch_rows=100, max_rows=1500)],
        export={"kinds": ["table"], "max_bytes": 1 << 30, "inline_bytes": 1 << 30},
    ) as site:
        got = site.call("sql.select", database="clinic", table="visits", columns=["id"], where=[{"column": "age", "op": "<", "value": 60}], order_by=["id"])
        assert got["id"].tolist() == sorted(data[data.age < 60].id)
        with pytest.raises(OperationFailedError, match="more than 1500 rows"):
            site.call("sql.select", database="clinic", table="visits")


def test_a_query_past_its_timeout_is_stopped_at_the_database(databases, postgres, tmp_path_factory, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, postgres.password)
    with InProcessSite(
        tmp_path_factory.mktemp("sql-timeout"), [], operations=["sql.select"],
        databases=[clinic(databases["postgresql"], timeout_s=1)], limits={"concurrency": 1},
        export={"kinds": ["table", "aggregate"], "error_detail": "message"},
    ) as site:
        started = time.monotonic()
        with pytest.raises(OperationFailedError, match="ran past 1 s"):
            site.call("query.nap", seconds=30)
        assert time.monotonic() - started < 10
        # A request timeout stops the statement too: the one slot is free again at once.
        done: list[RunResult] = []
        site.worker.handle_message(RunRequest(id="slow", op="query.nap", params={"seconds": 0.9}, timeout_s=0.3), done.append)
        got = site.call("sql.select", database="clinic", table="visits", columns=["id"], limit=5)
        assert len(got) == 5 and any(isinstance(m, RunResult) and not m.ok for m in done)
