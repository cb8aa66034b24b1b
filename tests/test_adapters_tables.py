"""Table operations on Parquet and CSV sources: local files and S3 (moto's server, real HTTP).

The site reads S3 with credentials it takes from its own environment
(``${env:...}`` in its config). Answers are checked against pandas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from adapters.combine import combine_grouped
from adapters.tables import Condition
from dfm_prefect.core.errors import InvalidParametersError
from dfm_prefect.testing.s3 import DEMO_CREDENTIALS
from tests.test_adapters_support import InProcessSite

BUCKET = "dfm-tables"


def visits(seed: int, rows: int = 3000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "ward": rng.choice(["cardio", "neuro", "onco", "peds"], rows),
            "age": rng.integers(0, 95, rows),
            "stay_days": rng.gamma(2.0, 2.5, rows).round(2),
            "admitted": pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 365, rows), unit="D"),
            "readmitted": rng.random(rows) < 0.1,
        }
    )


@pytest.fixture(scope="module")
def tables(tmp_path_factory, s3):
    root = tmp_path_factory.mktemp("tables")
    local, remote = visits(1), visits(2)
    (root / "visits.parquet").mkdir()
    for i, start in enumerate(range(0, len(local), 1000)):
        local.iloc[start : start + 1000].to_parquet(root / "visits.parquet" / f"part-{i}.parquet", index=False)
    local.to_csv(root / "visits.csv", index=False)
    fs = s3.filesystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    with fs.open(f"{BUCKET}/south/visits.parquet", "wb") as handle:
        remote.to_parquet(handle, index=False)
    return root, local, remote


@pytest.fixture(scope="module")
def site(tables, s3, tmp_path_factory):
    root, _, _ = tables
    mp = pytest.MonkeyPatch()
    mp.setenv("DFM_TABLES_S3_KEY", DEMO_CREDENTIALS["AWS_ACCESS_KEY_ID"])
    mp.setenv("DFM_TABLES_S3_SECRET", DEMO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    mp.setenv("DFM_TABLES_S3_ENDPOINT", s3.endpoint_url)
    s3_options = {
        "key": "${env:DFM_TABLES_S3_KEY}",
        "secret": "${env:DFM_TABLES_S3_SECRET}",
        "client_kwargs": {"endpoint_url": "${env:DFM_TABLES_S3_ENDPOINT}"},
    }
    sources = [
        {"name": "parquet", "url": f"file://{root / 'visits.parquet'}", "format": "parquet"},
        {"name": "csv", "url": f"file://{root / 'visits.csv'}"},
        {"name": "s3", "url": f"s3://{BUCKET}/south/visits.parquet", "storage_options": s3_options},
        {"name": "s3_glob", "url": f"s3://{BUCKET}/south/*.parquet", "storage_options": s3_options},
    ]
    with InProcessSite(tmp_path_factory.mktemp("tables-store"), sources) as site:
        yield site
    mp.undo()


def test_catalog_lists_columns_dtypes_and_rows_from_metadata(site, tables):
    _, local, remote = tables
    entries = {entry.name: entry for entry in site.worker.catalog.entries()}
    for name, frame in (("parquet", local), ("csv", local), ("s3", remote)):
        summary = entries[name].summary
        assert summary["type"] == "table", summary
        assert summary["rows"] == len(frame)
        assert set(summary["columns"]) == set(frame.columns)
        assert entries[name].size == summary["storage_bytes"] > 0
    assert entries["parquet"].summary["columns"]["age"] == "int64"
    assert entries["s3"].format == "parquet"


@pytest.mark.parametrize("source", ["parquet", "csv", "s3", "s3_glob"])
def test_filter_keeps_the_rows_where_every_condition_holds(site, tables, source):
    _, local, remote = tables
    frame = remote if source.startswith("s3") else local
    where = [
        {"column": "ward", "op": "in", "value": ["cardio", "onco"]},
        {"column": "age", "op": "between", "value": [40, 65]},
        {"column": "stay_days", "op": ">", "value": 3.5},
    ]
    result = site.call("table.filter", data=source, where=where, columns=["ward", "age", "stay_days"])
    mask = frame.ward.isin(["cardio", "onco"]) & frame.age.between(40, 65) & (frame.stay_days > 3.5)
    expected = frame.loc[mask, ["ward", "age", "stay_days"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(result, expected, check_dtype=False)


def test_filter_on_dates_and_nulls_and_a_row_limit(site, tables):
    _, local, _ = tables
    where = [{"column": "admitted", "op": ">=", "value": "2024-12-01"}, {"column": "ward", "op": "not null"}]
    result = site.call("table.filter", data="parquet", where=where, limit=5)
    assert len(result) == 5
    assert (result["admitted"] >= pd.Timestamp("2024-12-01")).all()


def test_project_with_rename_and_distinct(site, tables):
    _, local, _ = tables
    result = site.call("table.project", data="csv", columns=["ward"], rename={"ward": "unit"}, distinct=True)
    assert sorted(result["unit"]) == sorted(local["ward"].unique())


def test_groupby_aggregate_matches_pandas(site, tables):
    _, _, remote = tables
    aggregations = {
        "n": {"column": "stay_days", "func": "count"},
        "total": {"column": "stay_days", "func": "sum"},
        "squares": {"column": "stay_days", "func": "sumsq"},
        "oldest": {"column": "age", "func": "max"},
        "mean_stay": {"column": "stay_days", "func": "mean"},
    }
    where = [{"column": "readmitted", "op": "==", "value": False}]
    result = site.call("table.groupby_aggregate", data="s3", by=["ward"], aggregations=aggregations, where=where)
    kept = remote[~remote.readmitted]
    grouped = kept.groupby("ward")["stay_days"]
    assert list(result["ward"]) == sorted(kept.ward.unique())
    np.testing.assert_allclose(result["total"], grouped.sum().values)
    np.testing.assert_allclose(result["squares"], (kept.stay_days**2).groupby(kept.ward).sum().values)
    np.testing.assert_allclose(result["mean_stay"], grouped.mean().values)
    np.testing.assert_array_equal(result["oldest"], kept.groupby("ward")["age"].max().values)


def test_group_sums_from_two_sources_pool_exactly(site, tables):
    _, local, remote = tables
    aggregations = {"n": {"column": "age", "func": "count"}, "s": {"column": "age", "func": "sum"}, "ss": {"column": "age", "func": "sumsq"}}
    parts = [site.call("table.groupby_aggregate", data=name, by=["ward"], aggregations=aggregations) for name in ("parquet", "s3")]
    pooled = combine_grouped(parts, by=["ward"], how={"n": "sum", "s": "sum", "ss": "sum"})
    everyone = pd.concat([local, remote])
    by_ward = everyone.groupby("ward")["age"]
    mean = pooled["s"] / pooled["n"]
    var = pooled["ss"] / pooled["n"] - mean**2
    np.testing.assert_allclose(mean, by_ward.mean().values, rtol=1e-12)
    np.testing.assert_allclose(var, by_ward.var(ddof=0).values, rtol=1e-9)
    with pytest.raises(ValueError, match="only sum, min and max"):
        combine_grouped(parts, by=["ward"], how={"n": "mean"})


def test_unknown_columns_and_bad_conditions_are_refused(site):
    with pytest.raises(InvalidParametersError, match=r"no columns \['weight'\]"):
        site.call("table.filter", data="parquet", where=[{"column": "weight", "op": ">", "value": 1}])
    with pytest.raises(InvalidParametersError, match="needs a list"):
        site.call("table.filter", data="parquet", where=[{"column": "age", "op": "in", "value": 3}])
    with pytest.raises(ValidationError):
        Condition(column="age", op="LIKE", value="%")
