"""The disclosure policy as a property: no released aggregate has a group of fewer than the minimum contributors.

Random small tables and grids go to a real `SiteWorker` (in process: the site
core every transport runs) with random aggregate requests; whatever the site
lets a client fetch is checked against counts the test computes itself from
the raw data with pandas and xarray, never against what the site reported.
The property holds both ways: nothing under the minimum leaves, and what
reaches it is released. The rules, the config defaults and the summary filter
are pinned below.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfm_prefect.core.errors import ConfigError, DisclosureRefusedError
from dfm_prefect.core.wire import Envelope, FetchChunk, FetchRequest, RunResult
from site_workers.config import DisclosurePolicy, ExportPolicy, parse_site_config
from site_workers.disclosure import DisclosureRules, smallest_group
from site_workers.summaries import structure_only, summarize
from site_workers.worker import SiteWorker
from tests.support_sites import ask, run_frame

MINIMA = (2, 3, 5)
OPERATIONS = ["xarray.moments", "xarray.reduce", "xarray.groupby_reduce", "xarray.histogram", "table.groupby_aggregate"]
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[int, SiteWorker]]]:
    root = tmp_path_factory.mktemp("disclosure-data")
    workers = {}
    for minimum in MINIMA:
        config = {
            "name": f"k{minimum}",
            "operations": OPERATIONS,
            "operation_modules": ["adapters.xarray_stats", "adapters.xarray_ops", "adapters.tables"],
            "data_roots": [{"url": f"file://{root}"}],
            "result_store": {"url": f"file://{tmp_path_factory.mktemp('store')}"},
            "export": {"kinds": ["aggregate"], "disclosure": {"min_group_size": minimum, "min_subset_size": minimum}},
        }
        workers[minimum] = SiteWorker(parse_site_config(config))
    yield root, workers
    for worker in workers.values():
        worker.close()


def released(worker: SiteWorker, op: str, params: dict[str, Any]) -> bool:
    """Run ``op`` and try to fetch its result as a client would: True if the bytes left the site."""
    (answer,) = ask(worker, run_frame(op, params, request_id=uuid.uuid4().hex), expected=1)
    assert isinstance(answer, RunResult)
    if not answer.ok:
        assert answer.error is not None and answer.error.code in ("disclosure_refused", "invalid_parameters"), answer.error
        return False
    (chunk,) = ask(worker, Envelope(messages=[FetchRequest(id="f", ref=answer.ref)]).model_dump_json())
    if isinstance(chunk, FetchChunk):
        assert answer.ref is not None and answer.ref.contributors is not None
        return True
    assert chunk.error.code == "disclosure_refused", chunk.error  # type: ignore[union-attr]
    return False


def smallest(counts: Any) -> int:
    """The smallest non-zero count, computed here (0 if all groups are empty)."""
    values = np.asarray(counts, dtype="float64").ravel()
    values = values[values > 0]
    return int(values.min()) if values.size else 0


# ----------------------------------------------------------------- tables

tables = st.integers(1, 14).flatmap(
    lambda n: st.fixed_dictionaries(
        {
            "k1": st.lists(st.sampled_from("abcd"), min_size=n, max_size=n),
            "k2": st.lists(st.integers(0, 3), min_size=n, max_size=n),
            "v": st.lists(st.one_of(st.none(), st.floats(-100, 100)), min_size=n, max_size=n),
        }
    )
)
table_requests = st.fixed_dictionaries(
    {
        "by": st.sampled_from([["k1"], ["k2"], ["k1", "k2"]]),
        "func": st.sampled_from(["sum", "count", "mean", "min", "max", "sumsq"]),
        "where": st.one_of(st.none(), st.tuples(st.sampled_from(["==", "!=", "<", ">="]), st.integers(0, 3))),
        "minimum": st.sampled_from(MINIMA),
    }
)


@PROPERTY
@given(table=tables, request=table_requests)
def test_no_released_table_aggregate_has_a_group_under_the_minimum(sites, table, request):
    root, workers = sites
    raw = pd.DataFrame(table).astype({"v": "float64"})
    path = root / f"t-{uuid.uuid4().hex}.parquet"
    raw.to_parquet(path, index=False)
    where = [] if request["where"] is None else [{"column": "k2", "op": request["where"][0], "value": request["where"][1]}]
    params = {"data": f"file://{path}", "by": request["by"], "aggregations": {"out": {"column": "v", "func": request["func"]}}, "where": where}
    minimum = request["minimum"]
    kept = raw.query(f"k2 {request['where'][0]} {request['where'][1]}") if where else raw
    left_out = len(raw) - len(kept)
    selection_ok = not where or (len(kept) >= minimum and (left_out == 0 or left_out >= minimum))
    groups = kept.groupby(request["by"])
    values = smallest(groups["v"].count())
    groups_ok = smallest(groups.size()) >= minimum and (values == 0 or values >= minimum)
    # Both ways: nothing under the minimum leaves, and what reaches it is not held back.
    assert released(workers[minimum], "table.groupby_aggregate", params) == (selection_ok and groups_ok)


# ----------------------------------------------------------------- grids

grids = st.tuples(st.integers(1, 5), st.integers(1, 4)).flatmap(
    lambda shape: st.fixed_dictionaries(
        {
            "values": st.lists(st.one_of(st.none(), st.floats(0, 10)), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]),
            "x": st.lists(st.integers(0, 2), min_size=shape[1], max_size=shape[1]),
            "shape": st.just(shape),
        }
    )
)
grid_requests = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["moments", "reduce", "groupby_reduce", "histogram"]),
        "dims": st.sampled_from([["time"], ["x"], ["time", "x"]]),
        "group": st.sampled_from(["time", "x"]),
        "grouped": st.booleans(),
        "bins": st.integers(1, 6),
        "minimum": st.sampled_from(MINIMA),
    }
)


def grid_request(request: dict[str, Any], data: str) -> tuple[str, dict[str, Any]]:
    op, dims = request["op"], request["dims"]
    if op == "moments":
        return "xarray.moments", {"data": data, "dims": dims, **({"groupby": request["group"]} if request["grouped"] else {})}
    if op == "reduce":
        return "xarray.reduce", {"data": data, "dims": dims, "stat": "max"}
    if op == "groupby_reduce":
        return "xarray.groupby_reduce", {"data": data, "group": request["group"], "stat": "mean"}
    return "xarray.histogram", {"data": data, "bins": {"start": 0.0, "stop": 10.0, "count": request["bins"]}}


def expected_counts(raw: xr.DataArray, request: dict[str, Any]) -> Any:
    """How many cells went into each group of the released answer: present and, except in a histogram, not zero."""
    present = raw.notnull() & (raw != 0)
    op, dims, group = request["op"], request["dims"], request["group"]
    if op == "histogram":
        values = raw.values.ravel()
        inside = values[~np.isnan(values)]
        counts, _ = np.histogram(inside[(inside >= 0) & (inside <= 10)], bins=request["bins"], range=(0.0, 10.0))
        return np.concatenate([counts, [(inside < 0).sum(), (inside > 10).sum(), np.isnan(values).sum()]])
    if op == "groupby_reduce":
        return present.groupby(group).sum(dim=group)
    if op == "moments" and request["grouped"]:
        return present.groupby(group).sum(dim=list(dict.fromkeys([group, *dims])))
    return present.sum(dim=dims)


@PROPERTY
@given(grid=grids, request=grid_requests)
def test_no_released_grid_aggregate_has_a_group_under_the_minimum(sites, grid, request):
    root, workers = sites
    times, width = grid["shape"]
    values = np.array([np.nan if v is None else v for v in grid["values"]], dtype="float64").reshape(times, width)
    time = pd.date_range("2000-01-01", periods=times, freq="D")
    raw = xr.DataArray(values, dims=("time", "x"), coords={"time": time, "x": grid["x"]}, name="v")
    path = root / f"g-{uuid.uuid4().hex}.zarr"
    raw.to_dataset().to_zarr(path, zarr_format=2, consolidated=True)
    op, params = grid_request(request, f"file://{path}")
    expected = smallest(expected_counts(raw, request)) >= request["minimum"]
    assert released(workers[request["minimum"]], op, params) == expected


# ----------------------------------------------------------------- the rules themselves


def test_defaults_are_safe_and_the_config_is_strict():
    policy = ExportPolicy()
    assert (policy.disclosure.min_group_size, policy.disclosure.min_subset_size, policy.error_detail) == (3, 3, "type")
    with pytest.raises(ConfigError, match="disclosure.min_group_size"):
        parse_site_config({"name": "s", "operations": [], "result_store": {"url": "file:///tmp/x"}, "export": {"disclosure": {"min_group_size": 0}}})
    with pytest.raises(ConfigError, match="nfilter"):
        parse_site_config({"name": "s", "operations": [], "result_store": {"url": "file:///tmp/x"}, "export": {"disclosure": {"nfilter": 3}}})


def test_smallest_group_ignores_empty_groups_and_reads_every_container():
    counts = xr.Dataset({"a__n": ("g", [0, 7, 4]), "b__n": ("g", [9, 0, 5])})
    assert smallest_group(counts, pd.Series([12, 0]), [[6]]) == 4
    assert smallest_group(np.zeros(3)) == 0
    rules = DisclosureRules(DisclosurePolicy(min_group_size=3, min_subset_size=3))
    assert rules.group_refusal(3) is None and "fewer than 3" in str(rules.group_refusal(2))
    assert "did not count" in str(rules.group_refusal(None))
    assert DisclosureRules(DisclosurePolicy(min_group_size=1)).group_refusal(None) is None
    rules.check_selection(10, 10)
    rules.check_selection(7, 10)
    for kept, total in ((2, 10), (0, 10), (9, 10), (8, 10)):
        with pytest.raises(DisclosureRefusedError):
            rules.check_selection(kept, total)


def test_a_summary_for_a_result_that_may_not_leave_keeps_names_and_dtypes_only():
    grid = xr.Dataset(
        {"t": (("time", "station"), np.ones((4, 3), dtype="float32"), {"units": "K"})},
        coords={"time": pd.date_range("2000-01-01", periods=4), "station": [1, 2, 3], "height": ("station", [10.0, 250.0, 31.5])},
    )
    full = summarize(grid)
    assert "min" in full["coords"]["time"] and "min" not in full["coords"]["height"]  # data on a coordinate has no range
    assert structure_only(full) == {
        "type": "xarray.Dataset",
        "dims": ["station", "time"],
        "coords": {"time": {"dtype": full["coords"]["time"]["dtype"]}, "station": {"dtype": "int64"}, "height": {"dtype": "float64"}},
        "data_vars": {"t": {"dims": ["time", "station"], "dtype": "float32", "units": "K"}},
    }
    table = summarize(pd.DataFrame({"id": [1, 2], "name": ["a", "b"]}))
    assert structure_only(table) == {"type": "table", "columns": {"id": "int64", "name": table["columns"]["name"]}}
    assert structure_only(summarize({"alice": 1})) == {"type": "dict"}
