"""End-to-end flows over real sites and a real Prefect API, on every transport.

Each test runs twice: over the local transport (site processes on loopback) and
over NVIDIA FLARE (a POC on 127.0.0.1 with the long-lived mesh job). Only the
federation file the runner is given differs.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from prefect import flow, task
from prefect.cache_policies import INPUTS

from adapters.core import echo, sleep
from adapters.xarray_ops import moments, subset
from dfm_prefect.core.errors import (
    ExportRefusedError,
    InvalidParametersError,
    PlacementError,
    UnknownOperationError,
)
from dfm_prefect.core.refs import DataRef
from tests.conftest import wait_for_task_runs
from tests.site_ops import flaky

pytestmark = pytest.mark.slow


@pytest.fixture
def runner(any_federation, prefect_api):
    """A FederationTaskRunner for the session federation of the transport under test."""
    from dfm_prefect.task_runner import FederationTaskRunner

    return FederationTaskRunner(any_federation.federation_file)


@pytest.fixture
def client(any_federation):
    from dfm_prefect.client import get_client

    return get_client(any_federation.federation_file)


def test_operations_run_at_their_site_and_plain_tasks_on_the_client(runner, prefect_api):
    @task
    def where() -> int:
        return os.getpid()

    @flow(task_runner=runner)
    def mixed():
        ref = echo.submit(value={"hello": "north"}, site="north").result()
        direct = echo(value=[1, 2, 3], site="south")
        return ref, direct, where()

    state = mixed(return_state=True)
    ref, direct, pid = state.result()
    assert isinstance(ref, DataRef) and ref.site == "north" and ref.kind == "value"
    assert ref.fetch() == {"hello": "north"}
    assert direct.site == "south" and direct.fetch() == [1, 2, 3]
    assert pid == os.getpid()

    runs = wait_for_task_runs(str(state.state_details.flow_run_id), 3, lambda r: r.state_name == "Completed")
    names = sorted(run.name for run in runs)
    assert "core.echo@north" in names and "core.echo@south" in names
    remote = [run for run in runs if run.name.startswith("core.echo@")]
    for run in remote:
        site = run.name.split("@")[1]
        assert f"site:{site}" in run.tags and "op:core.echo" in run.tags


def test_dataref_chains_on_one_site_without_the_data_leaving(runner, client, prefect_api):
    before = client.stats("north").bytes_out

    @flow(task_runner=runner)
    def chain():
        box = subset.submit(data="dfm://north/temperature", ranges={"time": {"start": "2001-01-01", "stop": "2001-12-31"}})
        agg = moments.submit(data=box, dims=["lat", "lon"], groupby="time.year")
        return box.result(), agg.result()

    box, agg = chain()
    after = client.stats("north").bytes_out
    assert box.site == agg.site == "north"
    assert box.kind == "dataset" and not box.is_local
    assert box.summary["dims"] == ["lat", "lon", "time"]  # a dataset may not leave: names, no sizes
    assert agg.is_local  # the small aggregate came back with its result
    # Only the aggregate's bytes left the site; the subset (much larger) stayed.
    assert after - before == agg.size
    assert box.size > 10 * agg.size
    values = agg.fetch()
    (source,) = client.sites["north"].sources  # the catalog publishes the source's own sizes
    assert int(values["temperature__n"].sum()) == 365 * source.summary["dims"]["lat"] * source.summary["dims"]["lon"]


def test_export_policy_refuses_a_dataset_and_says_why(runner, client, prefect_api):
    @flow(task_runner=runner)
    def cut():
        return subset.submit(data="dfm://south/temperature", points={"lat": -2.5}).result()

    ref = cut()
    before = client.stats("south").bytes_out
    with pytest.raises(ExportRefusedError) as info:
        ref.fetch(client=client)
    assert "'dataset' may not leave" in str(info.value) and "south" in str(info.value)
    assert client.stats("south").bytes_out == before


def test_unknown_operation_is_refused_and_the_site_keeps_serving(client):
    with pytest.raises(UnknownOperationError, match="not offered here"):
        client.call("north", "nope.missing", {})
    with pytest.raises(UnknownOperationError, match="version '99'"):
        client.call("north", "core.echo", {"value": 1}, version="99")
    assert client.call("north", "core.echo", {"value": 7}).fetch() == 7


def test_placement_errors_reach_the_flow_author(runner, prefect_api):
    @flow(task_runner=runner)
    def misplaced():
        return echo.submit(value=1, site="nowhere").result()

    with pytest.raises(PlacementError, match="'nowhere' is not in the federation"):
        misplaced()


def test_invalid_parameters_fail_before_any_work(runner, client, prefect_api):
    before = client.stats("north")

    @flow(task_runner=runner)
    def bad():
        return moments.submit(data="dfm://north/temperature", dims=[]).result()

    with pytest.raises(InvalidParametersError, match="dims"):
        bad()
    after = client.stats("north")
    assert after.rejected == before.rejected + 1 and after.completed == before.completed


def test_prefect_retries_rerun_a_failing_operation(runner, prefect_api):
    key = uuid.uuid4().hex

    @flow(task_runner=runner)
    def retrying():
        return flaky.with_options(retries=2, retry_delay_seconds=0).submit(key=key, failures=2, site="north").result()

    state = retrying(return_state=True)
    ref = state.result()
    assert ref.fetch() == 3
    (run,) = wait_for_task_runs(str(state.state_details.flow_run_id), 1, lambda r: r.state_name == "Completed")
    assert run.run_count == 3


def test_timeouts_end_the_task_run_and_cancel_the_remote_work(runner, client, prefect_api):
    @flow(task_runner=runner)
    def slow():
        return sleep.with_options(timeout_seconds=1).submit(seconds=60, site="south").wait()

    state = slow(return_state=True)
    runs = wait_for_task_runs(str(state.state_details.flow_run_id), 1, lambda r: r.state_name == "TimedOut")
    assert runs, "the task run should end TimedOut"
    message = runs[0].state.message
    assert "sleep at site 'south' did not finish within its timeout of 1 s" in message and "None" not in message, message
    # The site was told to cancel: nothing keeps running there.
    assert client.stats("south").load.running == 0


def test_prefect_caching_skips_the_site(runner, client, prefect_api):
    cached_echo = echo.with_options(cache_policy=INPUTS)
    value = uuid.uuid4().hex

    @flow(task_runner=runner)
    def twice():
        return cached_echo.submit(value=value, site="north").result()

    first = twice()
    requests = client.stats("north").requests
    second = twice()
    assert second == first
    assert client.stats("north").requests == requests


def test_map_of_two_hundred_operations_all_accounted_for(runner, prefect_api):
    @flow(task_runner=runner)
    def many():
        futures = echo.map(value=list(range(200)))
        return [future.result() for future in futures]

    state = many(return_state=True)
    refs = state.result()
    assert [ref.fetch() for ref in refs] == list(range(200))
    assert {ref.site for ref in refs} <= {"north", "south"}
    runs = wait_for_task_runs(str(state.state_details.flow_run_id), 200, lambda r: r.state_name == "Completed")
    assert len(runs) == 200
    assert all(any(tag.startswith("site:") for tag in run.tags) for run in runs)


def test_dataset_urls_are_placed_on_the_site_that_owns_them(runner, climate_data, prefect_api):
    @flow(task_runner=runner)
    def by_url():
        south = subset.submit(data=climate_data["south"], points={"lat": -2.5})
        north = subset.submit(data=climate_data["north"], points={"lat": 2.5})
        return south.result(), north.result()

    south, north = by_url()
    assert south.site == "south" and north.site == "north"
    assert south.summary["dims"] == north.summary["dims"] == ["lon", "time"]


def test_flow_runs_get_a_report_and_long_operations_show_progress(runner, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterTaskRunId

    @flow(task_runner=runner)
    def reported():
        waited = sleep.submit(seconds=2.5, site="north")
        small = echo.submit(value="x", site="south")
        return waited.result().fetch(), small.result().fetch()

    state = reported(return_state=True)
    assert state.result() == (2.5, "x")
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as api:
        artifacts = api.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        by_type = {artifact.type: artifact for artifact in artifacts if artifact.task_run_id is None}
        assert set(by_type) >= {"table", "markdown"}
        rows = json.loads(by_type["table"].data)
        assert {(row["op"], row["site"]) for row in rows} == {("core.sleep", "north"), ("core.echo", "south")}
        assert "| north | 1 |" in by_type["markdown"].data
        task_run_ids = [artifact.task_run_id for artifact in artifacts if artifact.type == "progress"]
        assert task_run_ids, "the 2.5 s operation should have reported progress"
        (progress,) = api.read_artifacts(
            artifact_filter=ArtifactFilter(task_run_id=ArtifactFilterTaskRunId(any_=task_run_ids), type={"any_": ["progress"]})
        )
        assert progress.data == 100.0
