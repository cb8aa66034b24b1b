"""Views across real transports: a flow's intermediates stay recipes, fetches materialize, changes are caught.

One site, ``lab``, over each transport (a local site process, then a FLARE POC
with its mesh job). Its source is a local zarr store the tests may change; its
policy lets datasets leave, so a fetch of a view materializes it at the site and
streams the copy in chunks.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from prefect import flow

from adapters.xarray_ops import derive, subset
from adapters.xarray_stats import moments
from dfm_prefect import DataRef
from dfm_prefect.client import FETCH_CHUNK, FederationClient, get_client
from dfm_prefect.core.errors import AccessDeniedError, SourceChangedError
from dfm_prefect.testing.climate import ClimateSpec, make_region, write_zarr
from tests.conftest import TRANSPORTS, site_config
from tests.support_sites import private_federation, private_flare_federation

pytestmark = pytest.mark.slow

SPEC = ClimateSpec(years=2, resolution=2.0, chunk_days=120)
BOX = {"lat": {"start": 0, "stop": 60}, "time": {"start": "2000-03-01", "stop": "2001-10-31"}}


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("views")
    write_zarr(make_region(SPEC, -90.0, 90.0), str(root / "pristine.zarr"))
    return root


def lab_config(root: Path, store: Path) -> dict[str, Any]:
    shutil.copytree(root / "pristine.zarr", root / f"{store.name}.zarr")
    return site_config(
        "lab",
        store,
        [{"name": "field", "url": f"file://{root / f'{store.name}.zarr'}"}],
        operations=["core.echo", "xarray.subset", "xarray.derive", "xarray.moments"],
        operation_modules=[],
        export={"kinds": ["aggregate", "value", "dataset"], "max_bytes": 1 << 30, "inline_bytes": 64 << 10},
    )


@pytest.fixture(scope="module")
def lab_local(lab_root: Path) -> Iterator[tuple[Any, Path]]:
    config = lab_config(lab_root, lab_root / "store-local")
    with private_federation(lab_root / "local", {"lab": config}) as fed:
        yield fed, lab_root / "store-local.zarr"


@pytest.fixture(scope="module")
def lab_flare(lab_root: Path) -> Iterator[tuple[Any, Path]]:
    config = lab_config(lab_root, lab_root / "store-flare")
    with private_flare_federation(lab_root / "flare", {"lab": config}) as fed:
        yield fed, lab_root / "store-flare.zarr"


@pytest.fixture(params=TRANSPORTS)
def lab(request: pytest.FixtureRequest, lab_root: Path) -> Iterator[tuple[FederationClient, Path, Path, Path]]:
    fed, source = request.getfixturevalue("lab_local" if request.param == "local" else "lab_flare")
    # Each test starts from the pristine data (a test may have changed it).
    shutil.rmtree(source)
    shutil.copytree(lab_root / "pristine.zarr", source)
    store = lab_root / ("store-local" if request.param == "local" else "store-flare")
    yield get_client(fed.federation_file), source, store, fed.federation_file


def store_files(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in store.iterdir() if not p.name.startswith(".")}


def direct(source: Path) -> xr.Dataset:
    ds = xr.open_zarr(source).sel(lat=slice(0, 60), time=slice("2000-03-01", "2001-10-31"))
    return ds.load()


def test_a_flow_of_views_reads_the_source_in_one_graph_and_stores_only_the_answer(lab, prefect_api):
    from prefect.client.orchestration import get_client as prefect_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from dfm_prefect.task_runner import FederationTaskRunner

    client, source, store, federation_file = lab
    before = store_files(store)

    @flow(task_runner=FederationTaskRunner(federation_file))
    def warm_days():
        box = subset.submit(data="dfm://lab/field", ranges=BOX)
        warm = derive.submit(data=box, variables={"celsius": "temperature - 273.15"})
        agg = moments.submit(data=warm, dims=["lat", "lon"], groupby="time.year")
        return box.result(), warm.result(), agg.result()

    state = warm_days(return_state=True)
    box, warm, agg = state.result()
    assert box.is_view and warm.is_view and not agg.is_view
    sums = agg.fetch()
    expected = (direct(source)["temperature"] - 273.15).groupby("time.year").sum(dim=["time", "lat", "lon"])
    np.testing.assert_allclose(sums["celsius__wx"].values, expected.values, rtol=1e-6)
    gained = {name: size for name, size in store_files(store).items() if name not in before}
    assert len(gained) == 1 and ".aggregate-n" in next(iter(gained)), gained
    assert agg.lineage().startswith("dfm://lab/field → xarray.subset(") and " → xarray.derive(" in agg.lineage()

    with prefect_client(sync_client=True) as api:
        flow_run_id = state.state_details.flow_run_id
        artifacts = api.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    (report,) = [a for a in artifacts if a.type == "markdown" and a.task_run_id is None and "Federation report" in a.data]
    assert "## Lineage" in report.data
    assert "| view | dfm://lab/field → xarray.subset(" in report.data
    rows = json.loads(next(a for a in artifacts if a.type == "table" and a.task_run_id is None).data)
    subset_row = next(row for row in rows if row["op"] == "xarray.subset")
    assert subset_row["view"] is True and subset_row["stored_bytes"] == 0


def test_fetching_a_view_materializes_it_at_the_site_and_streams_the_copy(lab):
    client, source, store, _ = lab
    box = client.call("lab", "xarray.subset", {"data": "field", "ranges": BOX})
    assert box.is_view and box.size > FETCH_CHUNK  # more than one chunk on the wire
    before = store_files(store)
    fetched = box.fetch(client)
    xr.testing.assert_equal(fetched, direct(source))
    gained = {name: size for name, size in store_files(store).items() if name not in before}
    assert len(gained) == 1 and ".dataset." in next(iter(gained))
    # Fetched again (a new reference object: nothing cached on the client), the site sends the same copy.
    again = DataRef.model_validate(box.model_dump()).fetch(client)
    xr.testing.assert_equal(again, fetched)
    assert {n for n in store_files(store) if n not in before} == set(gained)


def test_a_changed_source_fails_an_old_view_clearly_and_the_site_keeps_serving(lab):
    client, source, _, _ = lab
    box = client.call("lab", "xarray.subset", {"data": "field", "ranges": BOX})
    chunk = next(p for p in (source / "temperature").iterdir() if not p.name.startswith("."))
    chunk.write_bytes(chunk.read_bytes())
    with pytest.raises(SourceChangedError, match="is a view of 'field', which changed since the view was made"):
        client.call("lab", "xarray.moments", {"data": box.model_dump(mode="json"), "dims": ["lat", "lon"]})
    with pytest.raises(SourceChangedError):
        DataRef.model_validate(box.model_dump()).fetch(client)
    fresh = client.call("lab", "xarray.subset", {"data": "field", "ranges": BOX})
    assert client.call("lab", "xarray.moments", {"data": fresh.model_dump(mode="json"), "dims": ["lat", "lon"]}).kind == "aggregate"


def test_an_altered_view_is_refused_over_the_wire(lab):
    client, _, _, _ = lab
    box = client.call("lab", "xarray.subset", {"data": "field", "ranges": BOX})
    wider = box.recipe.model_copy(update={"params": {"data": "field"}})
    forged = box.model_copy(update={"recipe": wider})
    with pytest.raises(AccessDeniedError, match="not a view this site made, or it was altered"):
        client.call("lab", "xarray.moments", {"data": forged.model_dump(mode="json"), "dims": ["lat", "lon"]})
    with pytest.raises(AccessDeniedError):
        forged.fetch(client)
