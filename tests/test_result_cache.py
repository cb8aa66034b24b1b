"""The site's result cache over real transports: hits for repeated requests, misses for anything changed.

One site, ``lab``, over each transport (a local site process, then a FLARE POC
with its mesh job), caching ``xarray.moments`` only. Its source is a local zarr
store the tests may change.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prefect import flow

from adapters.xarray_stats import moments
from dfm_prefect.client import FederationClient, get_client
from dfm_prefect.core.errors import ConfigError
from dfm_prefect.core.wire import RunResult
from dfm_prefect.testing.climate import ClimateSpec, make_region, write_zarr
from site_workers.config import SiteConfig
from site_workers.worker import SiteWorker
from tests.conftest import TRANSPORTS, read_task_runs, site_config
from tests.support_sites import private_federation, private_flare_federation

pytestmark = pytest.mark.slow

SPEC = ClimateSpec(years=2, resolution=4.0, chunk_days=120)
BOX = {"lat": {"start": 0, "stop": 60}}


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    write_zarr(make_region(SPEC, -90.0, 90.0), str(root / "pristine.zarr"))
    return root


def lab_config(root: Path, store: Path) -> dict[str, Any]:
    shutil.copytree(root / "pristine.zarr", root / f"{store.name}.zarr")
    return site_config(
        "lab",
        store,
        [{"name": "field", "url": f"file://{root / f'{store.name}.zarr'}"}],
        operations=["xarray.subset", "xarray.moments", "xarray.histogram"],
        operation_modules=[],
        export={"kinds": ["aggregate"], "max_bytes": 1 << 20, "inline_bytes": 64 << 10},
        cache={"operations": ["xarray.moments"]},
    )


@pytest.fixture(scope="module")
def lab_local(lab_root: Path) -> Iterator[tuple[Any, Path]]:
    with private_federation(lab_root / "local", {"lab": lab_config(lab_root, lab_root / "store-local")}) as fed:
        yield fed, lab_root / "store-local.zarr"


@pytest.fixture(scope="module")
def lab_flare(lab_root: Path) -> Iterator[tuple[Any, Path]]:
    with private_flare_federation(lab_root / "flare", {"lab": lab_config(lab_root, lab_root / "store-flare")}) as fed:
        yield fed, lab_root / "store-flare.zarr"


@pytest.fixture(params=TRANSPORTS)
def lab(request: pytest.FixtureRequest, lab_root: Path) -> Iterator[tuple[FederationClient, Path, Path, Path]]:
    fed, source = request.getfixturevalue("lab_local" if request.param == "local" else "lab_flare")
    shutil.rmtree(source)
    shutil.copytree(lab_root / "pristine.zarr", source)
    store = lab_root / ("store-local" if request.param == "local" else "store-flare")
    yield get_client(fed.federation_file), source, store, fed.federation_file


def stored(store: Path) -> set[str]:
    return {p.name for p in store.iterdir() if not p.name.startswith(".")}


def run(client: FederationClient, op: str, params: dict[str, Any]) -> RunResult:
    _, future = client.run("lab", op, params)
    reply = future.result(timeout=300)
    assert isinstance(reply, RunResult)
    assert reply.ok, reply.error
    return reply


def test_a_repeated_request_is_answered_from_the_cache_and_a_changed_input_misses(lab):
    client, source, store, _ = lab
    params = {"data": "field", "dims": ["lat", "lon"], "groupby": "time.year"}
    first = run(client, "xarray.moments", params)
    assert not first.cached and first.ref is not None
    before = stored(store)

    again = run(client, "xarray.moments", params)
    assert again.cached and again.ref == first.ref
    assert stored(store) == before, "a hit stores nothing new"

    other = run(client, "xarray.moments", {**params, "dims": ["lat"]})
    assert not other.cached and other.ref != first.ref

    # The same bytes written again: the source's fingerprint changes, so the old answer is not trusted.
    chunk = next(p for p in (source / "temperature").iterdir() if not p.name.startswith("."))
    chunk.write_bytes(chunk.read_bytes())
    changed = run(client, "xarray.moments", params)
    assert not changed.cached and changed.ref != first.ref
    assert run(client, "xarray.moments", params).cached

    # An operation the policy does not name is never cached.
    histogram = {"data": "field", "variables": ["temperature"], "bins": {"start": 200.0, "stop": 320.0, "count": 8}}
    assert not run(client, "xarray.histogram", histogram).cached
    assert not run(client, "xarray.histogram", histogram).cached


def test_a_view_input_hits_only_while_its_source_is_unchanged(lab):
    client, source, _, _ = lab
    box = run(client, "xarray.subset", {"data": "field", "ranges": BOX}).ref
    assert box is not None and box.is_view
    params = {"data": box.model_dump(mode="json"), "dims": ["lat", "lon"]}
    first = run(client, "xarray.moments", params)
    assert not first.cached
    assert run(client, "xarray.moments", params).cached
    chunk = next(p for p in (source / "temperature").iterdir() if not p.name.startswith("."))
    chunk.write_bytes(chunk.read_bytes())
    # The view's source changed: no hit; the operation itself then says the view is stale.
    _, future = client.run("lab", "xarray.moments", params)
    reply = future.result(timeout=300)
    assert isinstance(reply, RunResult) and not reply.ok and not reply.cached
    assert reply.error is not None and reply.error.code == "source_changed"


def test_a_result_the_store_lost_is_computed_again(lab):
    client, _, store, _ = lab
    params = {"data": "field", "dims": ["time", "lon"]}
    first = run(client, "xarray.moments", params)
    assert first.ref is not None
    (store / Path(first.ref.uri).name).unlink()
    again = run(client, "xarray.moments", params)
    assert not again.cached and again.ref != first.ref
    assert Path(again.ref.uri).name in stored(store)
    assert run(client, "xarray.moments", params).cached
    assert int(again.ref.fetch(client)["temperature__n"].sum()) > 0


def test_a_hit_shows_in_the_task_run_logs_and_the_flow_report(lab, prefect_api):
    from prefect.client.orchestration import get_client as prefect_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterTaskRunId

    from dfm_prefect.task_runner import FederationTaskRunner

    client, _, _, federation_file = lab

    @flow(task_runner=FederationTaskRunner(federation_file))
    def yearly():
        return moments.submit(data="dfm://lab/field", dims=["lat", "lon"], groupby="time.year", variables=["temperature"]).result()

    first = yearly(return_state=True)
    second = yearly(return_state=True)
    a, b = first.result(), second.result()
    assert a == b
    np.testing.assert_allclose(a.fetch(client)["temperature__n"].values, b.fetch(client)["temperature__n"].values)
    flow_run_id = second.state_details.flow_run_id
    (task_run,) = read_task_runs(str(flow_run_id))
    with prefect_client(sync_client=True) as api:
        # Prefect sends run logs to its API in batches, after the flow run may have ended.
        deadline, messages = time.monotonic() + 30, []
        while not any("site lab answered from its result cache" in m for m in messages) and time.monotonic() < deadline:
            time.sleep(0.5)
            messages = [line.message for line in api.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run.id])))]
        artifacts = api.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert any("site lab answered from its result cache" in m for m in messages), messages
    rows = json.loads(next(a for a in artifacts if a.type == "table" and a.task_run_id is None).data)
    assert [row["cached"] for row in rows] == [True] and rows[0]["stored_bytes"] == 0
    (report,) = [a for a in artifacts if a.type == "markdown" and a.task_run_id is None and "Federation report" in a.data]
    assert "1 answered from a site result cache" in report.data


def test_a_cache_for_an_operation_the_site_does_not_offer_is_refused(tmp_path):
    config = site_config("lab", tmp_path / "store", [], operations=["core.echo"], cache={"operations": ["xarray.moments"]})
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"cache.operations names operations the site does not offer: \['xarray.moments'\]"):
        SiteWorker(SiteConfig.model_validate(config))


@pytest.mark.parametrize("op", ["core.echo", "xarray.moments_stream"])
def test_an_operation_whose_inputs_have_no_fingerprint_cannot_be_cached(tmp_path, op):
    config = site_config("lab", tmp_path / "store", [], operations=["core.echo", "xarray.moments_stream"], cache={"operations": [op]})
    with pytest.raises(ConfigError, match="cache.operations names"):
        SiteWorker(SiteConfig.model_validate(config))
