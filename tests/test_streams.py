"""Streaming operations over real transports: items arrive as the site makes them, in order, with back-pressure.

One site, ``lab``, over each transport (a local site process, then a FLARE POC
with its mesh job). It offers ``testing.ticks`` (items made at a set pace, each
saying when the site made it) and ``xarray.moments_stream`` over a small
climate field. A stream the client does not take from for ``reply_stall_s``
(6 s here) is stopped at the site.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prefect import flow

from adapters.combine import combine_moments
from adapters.xarray_stats import moments_stream
from dfm_prefect.client import FederationClient, get_client
from dfm_prefect.core.errors import ExportRefusedError, FederationError, RequestCancelledError, SiteUnavailableError, StreamStalledError
from dfm_prefect.testing.climate import ClimateSpec, make_region, write_zarr
from tests.conftest import TRANSPORTS, read_task_runs, site_config
from tests.support_sites import private_federation, private_flare_federation, restart_site

pytestmark = pytest.mark.slow

SPEC = ClimateSpec(years=2, resolution=4.0, chunk_days=120)
STALL_S = 6.0


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("streams")
    write_zarr(make_region(SPEC, -90.0, 90.0), str(root / "field.zarr"))
    return root


def lab_config(root: Path, store: Path) -> dict[str, Any]:
    return site_config(
        "lab",
        store,
        [{"name": "field", "url": f"file://{root / 'field.zarr'}"}],
        operations=["core.echo", "testing.ticks", "xarray.moments", "xarray.moments_stream"],
        operation_modules=["tests.site_ops"],
        export={"kinds": ["aggregate", "value"], "max_bytes": 8 << 20, "inline_bytes": 64 << 10},
        limits={"reply_stall_s": STALL_S},
    )


@pytest.fixture(scope="module")
def lab_local(lab_root: Path) -> Iterator[Any]:
    with private_federation(lab_root / "local", {"lab": lab_config(lab_root, lab_root / "store-local")}) as fed:
        yield fed


@pytest.fixture(scope="module")
def lab_flare(lab_root: Path) -> Iterator[Any]:
    with private_flare_federation(lab_root / "flare", {"lab": lab_config(lab_root, lab_root / "store-flare")}) as fed:
        yield fed


@pytest.fixture(params=TRANSPORTS)
def lab(request: pytest.FixtureRequest) -> tuple[Any, FederationClient]:
    fed = request.getfixturevalue("lab_local" if request.param == "local" else "lab_flare")
    return fed, get_client(fed.federation_file)


def read_tally(path: Path) -> int:
    return int(path.read_text() or 0) if path.exists() else 0


def test_items_arrive_while_the_operation_runs_in_order_and_none_lost(lab):
    _, client = lab
    arrived: list[tuple[float, dict[str, Any]]] = []
    with client.stream("lab", "testing.ticks", {"count": 6, "pause_s": 0.5}) as items:
        for item in items:
            arrived.append((time.time(), item.fetch(client)))
        closing = items.result
    assert [value["seq"] for _, value in arrived] == list(range(6))
    assert closing is not None and closing.ok and closing.items == 6
    # The first item was in the client's hands before the site had made the last one.
    first_arrival, last_made = arrived[0][0], arrived[-1][1]["made_at"]
    assert first_arrival < last_made - 1.5, (first_arrival, last_made)
    assert all(later >= earlier for (earlier, _), (later, _) in zip(arrived, arrived[1:]))


def test_a_client_that_stops_taking_items_stops_the_site(lab, tmp_path):
    _, client = lab
    tally = tmp_path / "made"
    items = client.stream("lab", "testing.ticks", {"count": 1000, "size": 1 << 20, "tally": str(tally)}, window=2)
    first = next(items)
    assert first.fetch(client)["seq"] == 0
    # Taking one item allowed one more: the site makes window + 1 items and then waits, whatever the count asked.
    deadline = time.monotonic() + 60
    while read_tally(tally) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert read_tally(tally) == 3
    # Nothing is taken for longer than the site's stall limit: the site stops the stream and says why.
    stopped = items.done.result(timeout=60)
    assert not stopped.ok and stopped.error.code == "stream_stalled", stopped.error
    assert "took no item of the stream for 6 s" in stopped.error.message
    assert read_tally(tally) == 3, "the site made nothing while the client took nothing"
    assert [item.fetch(client)["seq"] for item in _drain(items)] == [1, 2]
    assert client.call("lab", "core.echo", {"value": "still serving"}).fetch(client) == "still serving"


def _drain(items: Any) -> list[Any]:
    taken = []
    with pytest.raises(StreamStalledError):
        for item in items:
            taken.append(item)
    return taken


def test_closing_a_stream_stops_the_operation_at_the_site(lab, tmp_path):
    _, client = lab
    tally = tmp_path / "made"
    with client.stream("lab", "testing.ticks", {"count": 1000, "pause_s": 0.05, "tally": str(tally)}, window=4) as items:
        taken = [next(items) for _ in range(10)]
    assert [item.fetch(client)["seq"] for item in taken] == list(range(10))
    with pytest.raises(RequestCancelledError):
        items.done.result(timeout=60)
    # The site stops at once, well before its stall limit would have stopped a stream left waiting.
    closed = time.monotonic()
    while client.stats("lab").load.running and time.monotonic() - closed < STALL_S - 2:
        time.sleep(0.1)
    assert client.stats("lab").load.running == 0
    made = read_tally(tally)
    assert 10 <= made <= 10 + 4 + 1
    assert client.call("lab", "core.echo", {"value": 1}).fetch(client) == 1


def test_moments_stream_items_add_up_to_the_moments_of_the_whole(lab):
    _, client = lab
    params = {"data": "field", "dims": ["time", "lat", "lon"], "along": "time"}
    with client.stream("lab", "xarray.moments_stream", params) as items:
        parts = [item.fetch(client) for item in items]
    assert len(parts) == int(np.ceil(SPEC.years * 365 / SPEC.chunk_days))  # one item per time chunk
    whole = client.call("lab", "xarray.moments", {"data": "field", "dims": ["time", "lat", "lon"]}).fetch(client)
    pooled, single = combine_moments(parts), combine_moments([whole])
    np.testing.assert_allclose(pooled["temperature_mean"].values, single["temperature_mean"].values, rtol=1e-9)
    assert int(pooled["temperature_n"].values) == int(single["temperature_n"].values)


def test_each_item_obeys_the_export_policy(lab_root: Path, tmp_path: Path):
    config = lab_config(lab_root, tmp_path / "store")
    config["export"] = {"kinds": ["aggregate"]}  # values stay at the site
    with private_federation(tmp_path / "fed", {"lab": config}) as fed:
        client = get_client(fed.federation_file)
        with client.stream("lab", "testing.ticks", {"count": 3}) as items:
            refs = list(items)
        assert [ref.kind for ref in refs] == ["value"] * 3
        assert not any(ref.is_local for ref in refs)
        with pytest.raises(ExportRefusedError):
            refs[0].fetch(client)


def test_in_a_flow_items_are_taken_as_they_arrive(lab_local, prefect_api):
    from dfm_prefect.task_runner import FederationTaskRunner

    @flow(task_runner=FederationTaskRunner(lab_local.federation_file))
    def running_mean() -> tuple[list[float], int]:
        means, parts = [], []
        for part in moments_stream(data="dfm://lab/field", dims=["time", "lat", "lon"], variables=["temperature"]):
            parts.append(part.fetch())
            means.append(float(combine_moments(parts)["temperature_mean"]))
        with pytest.raises(FederationError, match="streams its results: call it in the flow and iterate"):
            moments_stream.submit(data="dfm://lab/field", dims=["time"])
        return means, len(parts)

    state = running_mean(return_state=True)
    means, count = state.result()
    assert count == len(means) > 1
    (run,) = read_task_runs(str(state.state_details.flow_run_id))
    assert run.name.startswith("xarray.moments_stream") and run.state_type.value == "COMPLETED"


def test_a_killed_site_ends_the_stream_with_an_error_naming_it(lab):
    fed, client = lab
    items = client.stream("lab", "testing.ticks", {"count": 1000, "pause_s": 0.2})
    assert next(items).fetch(client)["seq"] == 0
    fed.stop_site("lab", kill=True)
    try:
        with pytest.raises(SiteUnavailableError, match="'lab'"):
            for _ in items:
                pass
    finally:
        restart_site(fed, client, "lab")


def test_blocks_are_held_to_the_subset_rules_so_items_cannot_be_differenced(tmp_path: Path):
    import pandas as pd
    import xarray as xr

    values = np.arange(10, dtype="float64")[:, None, None] + 1.0
    field = xr.Dataset(
        {"temperature": (("time", "lat", "lon"), values)},
        coords={"time": pd.date_range("2000-01-01", periods=10), "lat": [0.0], "lon": [0.0]},
    ).chunk({"time": 5})
    write_zarr(field, str(tmp_path / "tiny.zarr"))
    config = site_config(
        "lab",
        tmp_path / "store",
        [{"name": "tiny", "url": f"file://{tmp_path / 'tiny.zarr'}"}],
        operations=["xarray.moments_stream"],
        operation_modules=[],
        export={"kinds": ["aggregate"], "disclosure": {"min_group_size": 1, "min_subset_size": 3}},
    )
    with private_federation(tmp_path / "fed", {"lab": config}) as fed:
        client = get_client(fed.federation_file)
        params = {"data": "tiny", "dims": ["time", "lat", "lon"]}
        # All but one cell, then the one cell: the second would be the whole minus the first.
        with pytest.raises(FederationError, match="leaves out fewer than 3") as refused:
            with client.stream("lab", "xarray.moments_stream", {**params, "step": 9}) as items:
                got = list(items)
        assert refused.value.code == "disclosure_refused"
        with client.stream("lab", "xarray.moments_stream", {**params, "step": 5}) as items:
            got = [item.fetch(client) for item in items]
        assert [float(part["temperature__wx"]) for part in got] == [15.0, 40.0]


def test_a_stream_asked_for_as_a_run_and_a_run_as_a_stream_say_what_to_use(lab):
    _, client = lab
    with pytest.raises(FederationError, match=r"streams its results: ask for it with client.stream"):
        client.call("lab", "testing.ticks", {"count": 2})
    with pytest.raises(FederationError, match=r"sends one result, not a stream: run it with client.run"):
        with client.stream("lab", "core.echo", {"value": 1}) as items:
            list(items)
