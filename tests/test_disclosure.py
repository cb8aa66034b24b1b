"""Attacks on the disclosure policy through real site processes.

The ``clinic`` site guards a small grid (30 days x 2 x 72 cells) and a table of
30 patients under the default disclosure rules (``min_group_size`` and
``min_subset_size`` 3) and the default ``error_detail``; only ``aggregate`` and
``value`` results may leave it. The ``sealed`` site lets nothing leave
(``kinds: []``). Each test sends what an attacker would, through the public
client, and checks that no raw cell, exact count or coordinate value comes
back, that the refusal names the rule, and that the site keeps serving.
Two representative attacks also run over FLARE.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest

from dfm_prefect.client import FederationClient, get_client
from dfm_prefect.core.errors import DisclosureRefusedError, ExportRefusedError, InvalidParametersError, OperationFailedError
from dfm_prefect.core.refs import DataRef
from tests.conftest import SMALL, TRANSPORTS, site_config
from tests.support_sites import private_federation, private_flare_federation

pytestmark = pytest.mark.slow

OPERATIONS = [
    "core.echo",
    "testing.leak",
    "xarray.subset",
    "xarray.derive",
    "xarray.open",
    "xarray.moments",
    "xarray.reduce",
    "xarray.groupby_reduce",
    "xarray.resample",
    "table.filter",
    "table.groupby_aggregate",
]
NAMES = [f"patient-{i:02d}-Zq" for i in range(30)]
WARDS = ["cardio", "neuro", "onco"]


@pytest.fixture(scope="module")
def clinic_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    from dfm_prefect.testing.climate import make_region, write_zarr

    root = tmp_path_factory.mktemp("clinic")
    grid = make_region(SMALL, 0.0, 10.0).isel(time=slice(0, 30))
    write_zarr(grid, str(root / "grid.zarr"))
    # A record id per time step: data attached to points, which no aggregate may carry out.
    write_zarr(grid.assign_coords(pid=("time", np.arange(1000, 1030))), str(root / "tagged.zarr"))
    patients = pd.DataFrame(
        {
            "id": np.arange(30),
            "name": NAMES,
            "ward": [WARDS[i % 3] for i in range(30)],
            "age": np.random.default_rng(3).integers(20, 90, 30).astype("float64"),
        }
    )
    patients.to_parquet(root / "patients.parquet", index=False)
    sources = [
        {"name": "grid", "url": f"file://{root / 'grid.zarr'}"},
        {"name": "patients", "url": f"file://{root / 'patients.parquet'}"},
        {"name": "tagged", "url": f"file://{root / 'tagged.zarr'}"},
    ]
    common = {"operations": OPERATIONS, "limits": {"concurrency": 2}}
    # No disclosure or error_detail keys: the defaults are what is attacked.
    return {
        "clinic": site_config("clinic", root / "store-clinic", sources, export={"kinds": ["aggregate", "value"]}, **common),
        "sealed": site_config("sealed", root / "store-sealed", sources, export={"kinds": []}, **common),
    }


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory, clinic_configs: dict[str, dict[str, Any]]) -> Iterator[FederationClient]:
    with private_federation(tmp_path_factory.mktemp("clinic-local"), clinic_configs) as fed:
        yield get_client(fed.federation_file)


@pytest.fixture(scope="module")
def clinic_flare(tmp_path_factory: pytest.TempPathFactory, clinic_configs: dict[str, dict[str, Any]]) -> Iterator[FederationClient]:
    root = tmp_path_factory.mktemp("clinic-flare")
    config = {**clinic_configs["clinic"], "result_store": {"url": f"file://{root / 'store'}"}}
    with private_flare_federation(root, {"clinic": config}) as fed:
        yield get_client(fed.federation_file)


@pytest.fixture(params=TRANSPORTS)
def any_clinic(request: pytest.FixtureRequest) -> FederationClient:
    return request.getfixturevalue("clinic" if request.param == "local" else "clinic_flare")


def still_serving(client: FederationClient, site: str = "clinic") -> None:
    echo = client.call(site, "core.echo", {"value": "ok"})
    assert echo.kind == "value" and (site == "sealed" or echo.fetch(client=client) == "ok")


def assert_held(client: FederationClient, ref: DataRef) -> None:
    """An aggregate of single records: no value, no count, no sizes; fetching it names the rule."""
    assert ref.kind == "aggregate" and not ref.is_local and ref.contributors is None
    assert "nbytes" not in ref.summary and "rows" not in ref.summary
    assert all(set(info) <= {"dtype"} for info in ref.summary.get("coords", {}).values())
    with pytest.raises(DisclosureRefusedError, match=r"fewer than 3 .*export\.disclosure\.min_group_size: 3") as refused:
        ref.fetch(client=client)
    assert "fewer than 3" in str(refused.value) and " 1 " not in str(refused.value)  # the rule, never the count
    forged = ref.model_copy(update={"contributors": 1000})  # the site decides on what it recorded
    with pytest.raises(DisclosureRefusedError):
        client.fetch_bytes(forged)
    still_serving(client)


# ----------------------------------------------------------- raw data as "aggregate"

GRID_ATTACKS = {
    "moments-grouped-by-time": ("xarray.moments", {"data": "grid", "dims": ["time"], "groupby": "time"}),
    "groupby-at-own-frequency": ("xarray.groupby_reduce", {"data": "grid", "group": "time", "stat": "mean"}),
    "resample-at-own-frequency": ("xarray.resample", {"data": "grid", "freq": "1D", "stat": "max"}),
}
TABLE_ATTACK = (
    "table.groupby_aggregate",
    {"data": "patients", "by": ["id"], "aggregations": {"age": {"column": "age", "func": "max"}}},
)


@pytest.mark.parametrize("attack", sorted(GRID_ATTACKS))
def test_an_aggregate_of_single_cells_does_not_leave(clinic, attack):
    op, params = GRID_ATTACKS[attack]
    assert_held(clinic, clinic.call("clinic", op, params))


@pytest.mark.parametrize(
    "op, params",
    [
        ("xarray.moments", {"dims": ["lat", "lon"]}),
        ("xarray.reduce", {"dims": ["lat", "lon"], "stat": "sum"}),
        ("xarray.reduce", {"dims": ["lat", "lon"], "stat": "max"}),
        ("xarray.groupby_reduce", {"group": "time", "dims": ["lat", "lon"], "stat": "mean"}),
    ],
    ids=["moments", "sum", "max", "groupby"],
)
def test_cells_masked_to_zero_do_not_count_as_contributors(clinic, op, params):
    # Every cell but one per time step set to 0: the sum over the grid is that one raw cell.
    mask = "where(lat == 2.5, where(lon == 2.5, temperature, 0), 0)"
    masked = clinic.call("clinic", "xarray.derive", {"data": "grid", "variables": {"y": mask}})
    assert_held(clinic, clinic.call("clinic", op, {"data": masked.model_dump(), "variables": ["y"], **params}))


def test_an_aggregate_carries_no_data_attached_to_points(clinic):
    per_day = clinic.call("clinic", "xarray.reduce", {"data": "tagged", "dims": ["lat", "lon"], "stat": "mean"})
    value = per_day.fetch(client=clinic)  # 144 cells a day: allowed to leave
    assert "pid" not in value.coords and set(value.coords) <= {"time"}
    moments = clinic.call("clinic", "xarray.moments", {"data": "tagged", "dims": ["lat", "lon"]}).fetch(client=clinic)
    assert "pid" not in moments.coords


def test_a_reduction_over_a_size_one_dimension_does_not_leave(clinic):
    one_row = clinic.call("clinic", "xarray.subset", {"data": "grid", "points": {"lat": [2.5]}})
    assert_held(clinic, clinic.call("clinic", "xarray.reduce", {"data": one_row.model_dump(), "dims": ["lat"], "stat": "sum"}))


def test_one_cell_selected_many_times_does_not_count_as_many(clinic):
    for how in ({"points": {"lat": [2.5, 2.5, 2.5]}}, {"nearest": {"lat": [2.4, 2.5, 2.6]}}):
        with pytest.raises(InvalidParametersError, match="more than once"):
            clinic.call("clinic", "xarray.subset", {"data": "grid", **how})
    still_serving(clinic)


def test_single_records_are_held_and_wide_groups_released(any_clinic):
    client = any_clinic
    assert_held(client, client.call("clinic", *TABLE_ATTACK))
    op, params = GRID_ATTACKS["moments-grouped-by-time"]
    assert_held(client, client.call("clinic", op, params))

    by_ward = client.call("clinic", "table.groupby_aggregate", {**TABLE_ATTACK[1], "by": ["ward"]})
    assert by_ward.contributors == 10 and by_ward.fetch(client=client)["ward"].tolist() == WARDS
    yearly = client.call("clinic", "xarray.moments", {"data": "grid", "dims": ["time", "lat", "lon"], "groupby": "time.year"})
    counts = [int(var.min()) for name, var in yearly.fetch(client=client).data_vars.items() if name.endswith("__n")]
    assert yearly.contributors == min(counts) >= 3


# ----------------------------------------------------------- differencing and tiny subsets


def test_differencing_two_overlapping_queries_cannot_isolate_a_record(clinic):
    everyone = {**TABLE_ATTACK[1], "by": ["ward"], "aggregations": {"age": {"column": "age", "func": "sum"}}}
    assert clinic.call("clinic", "table.groupby_aggregate", everyone).contributors == 10
    all_but_one = {**everyone, "where": [{"column": "id", "op": "!=", "value": 7}]}
    with pytest.raises(DisclosureRefusedError, match="leaves out fewer than 3") as refused:
        clinic.call("clinic", "table.groupby_aggregate", all_but_one)
    assert "min_subset_size: 3" in str(refused.value)
    with pytest.raises(DisclosureRefusedError, match="keeps fewer than 3"):
        clinic.call("clinic", "table.filter", {"data": "patients", "where": [{"column": "id", "op": "==", "value": 7}]})
    # Membership cannot be told apart: an empty selection is refused like a single record.
    with pytest.raises(DisclosureRefusedError, match="keeps fewer than 3"):
        clinic.call("clinic", "table.filter", {"data": "patients", "where": [{"column": "id", "op": "==", "value": 999}]})
    still_serving(clinic)


# ----------------------------------------------------------- summaries


def test_summaries_show_names_and_dtypes_only_where_the_result_may_not_leave(clinic):
    rows = clinic.call("clinic", "table.filter", {"data": "patients", "where": [{"column": "age", "op": ">=", "value": 50}]})
    assert rows.summary == {"type": "table", "columns": {"id": "int64", "name": "string", "ward": "string", "age": "float64"}}
    box = clinic.call("clinic", "xarray.subset", {"data": "grid", "ranges": {"time": {"start": "2000-01-05"}}})
    assert box.summary["dims"] == ["lat", "lon", "time"]
    assert box.summary["coords"]["time"] == {"dtype": "datetime64[ns]"}  # no range, no size
    assert box.summary["data_vars"]["temperature"] == {"dims": ["time", "lat", "lon"], "dtype": "float32", "units": "K"}

    sealed = clinic.call("sealed", "xarray.moments", {"data": "grid", "dims": ["time", "lat", "lon"], "groupby": "time.year"})
    assert not sealed.is_local and sealed.contributors is None and "coords" in sealed.summary
    assert all(set(info) == {"dtype"} for info in sealed.summary["coords"].values())  # kinds: [] shows no years
    with pytest.raises(ExportRefusedError, match="allowed kinds: none"):
        sealed.fetch(client=clinic)
    still_serving(clinic, "sealed")


def test_data_cannot_be_moved_onto_a_coordinate_or_described_as_a_value(clinic):
    with pytest.raises(InvalidParametersError, match="'lat' is a coordinate"):
        clinic.call("clinic", "xarray.derive", {"data": "grid", "variables": {"lat": "temperature"}})
    derived = clinic.call("clinic", "xarray.derive", {"data": "grid", "variables": {"t2": "temperature * 2"}})
    with pytest.raises(InvalidParametersError, match="describes data sources only"):
        clinic.call("clinic", "xarray.open", {"data": derived.model_dump()})
    described = clinic.call("clinic", "xarray.open", {"data": "grid"}).fetch(client=clinic)
    assert described["coords"]["lat"]["min"] == 2.5  # a source's axes are the catalog's to publish
    still_serving(clinic)


# ----------------------------------------------------------- error detail


def test_errors_never_quote_cells_by_default(any_clinic):
    client = any_clinic
    for patient in (3, 4, 5):  # walking the name column, one patient per request
        where = [{"column": "ward", "op": "==", "value": WARDS[patient % 3]}]
        params = {"data": "patients", "by": ["ward"], "aggregations": {"s": {"column": "name", "func": "sumsq"}}, "where": where}
        with pytest.raises(InvalidParametersError) as refused:
            client.call("clinic", "table.groupby_aggregate", params)
        assert "patient-" not in str(refused.value) and "needs a numeric column" in str(refused.value)
    with pytest.raises((InvalidParametersError, OperationFailedError)) as refused:
        client.call("clinic", "table.filter", {"data": "patients", "where": [{"column": "name", "op": "<", "value": 5}]})
    assert "patient-" not in str(refused.value)
    with pytest.raises(OperationFailedError, match=r"failed with RuntimeError.*incident [0-9a-f]{12}") as failed:
        client.call("clinic", "testing.leak", {"variable": "DFM_TEST_LEAK"})
    assert "patient_weight" not in str(failed.value) and "81.4" not in str(failed.value)
    still_serving(client)
