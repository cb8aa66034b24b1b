"""Faults for real: sites killed, frozen and restarted, clients killed, stored results damaged.

``alpha`` and ``beta`` (a private federation of this module) both hold a replica
of the same source, so a task run can move from a failed site to the other.
After every flow the Prefect API is asked for the task runs' states: each one
must have ended, none may stay Running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from prefect import flow, unmapped
from prefect.futures import wait

from adapters.core import sleep
from adapters.xarray_ops import moments
from dfm_prefect.client import FederationClient, check_integrity, get_client
from dfm_prefect.errors import ResultIntegrityError
from dfm_prefect.local_federation import LocalFederation
from dfm_prefect.refs import DataRef
from dfm_prefect.task_runner import FederationTaskRunner
from tests.conftest import ROOT, read_task_runs, site_config, wait_for_task_runs
from tests.site_ops import where
from tests.support_sites import private_federation

pytestmark = pytest.mark.slow

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
OPERATIONS = ["core.echo", "core.sleep", "testing.where", "testing.read", "xarray.subset", "xarray.moments"]


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory, climate_data: dict[str, str]) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("twins")
    replica = [{"name": "temperature", "url": climate_data["north"]}]
    configs = {
        name: site_config(
            name,
            root / "store" / name,
            replica,
            operations=OPERATIONS,
            export={"kinds": ["value", "aggregate"], "max_bytes": 1 << 20, "inline_bytes": 0},
            limits={"concurrency": 4},
        )
        for name in ("alpha", "beta")
    }
    with private_federation(root, configs) as fed:
        yield fed


@pytest.fixture
def twins_client(twins: LocalFederation) -> Iterator[FederationClient]:
    for name in twins.sites:  # a test that failed half-way may have left a site down
        if name not in twins.pids():
            twins.start_site(name)
    yield get_client(twins.federation_file)


@pytest.fixture
def twins_runner(twins: LocalFederation, twins_client: FederationClient, prefect_api: str) -> FederationTaskRunner:
    return FederationTaskRunner(twins.federation_file)


def eventually(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> float:
    """Seconds until ``condition`` held. Sites push no load events, so this polls their stats."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def in_background(action: Callable[[], None]) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:  # reported by the test that joins it
            errors.append(exc)

    thread = threading.Thread(target=run, name="dfm-test-fault", daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def joined(thread: threading.Thread) -> None:
    thread.join(60)
    assert not thread.is_alive() and not thread.errors, thread.errors  # type: ignore[attr-defined]


def assert_every_task_run_ended(flow_run_id: Any, count: int) -> list[Any]:
    runs = wait_for_task_runs(str(flow_run_id), count, lambda run: run.state_type.value in TERMINAL)
    assert len(runs) == count
    states = sorted(run.state_type.value for run in read_task_runs(str(flow_run_id)))
    assert all(state in TERMINAL for state in states), f"task runs that never ended: {states}"
    return runs


# ------------------------------------------------------------------ sites die


def test_a_killed_site_fails_its_inflight_runs_with_an_error_naming_it(twins, twins_client, twins_runner):
    killer = in_background(lambda: (
        eventually(lambda: twins_client.stats("alpha").load.running == 4, "4 runs at alpha"),
        twins.stop_site("alpha", kill=True),
    ))

    @flow(task_runner=twins_runner)
    def doomed() -> list[tuple[str, str]]:
        futures = sleep.map(seconds=[60.0] * 4, site=unmapped("alpha"))
        wait(futures)
        return [(future.state.type.value, future.state.message or "") for future in futures]

    started = time.monotonic()
    state = doomed(return_state=True)
    joined(killer)
    outcomes = state.result()
    assert time.monotonic() - started < 45, "the runs must fail when the site dies, not when their work would end"
    assert [kind for kind, _ in outcomes] == ["FAILED"] * 4
    assert all("SiteUnavailableError" in message and "'alpha'" in message for _, message in outcomes), outcomes
    assert_every_task_run_ended(state.state_details.flow_run_id, 4)


def test_prefect_retries_rerun_the_work_once_the_site_is_back(twins, twins_client, twins_runner):
    def kill_and_restart() -> None:
        eventually(lambda: twins_client.stats("alpha").load.running == 4, "4 runs at alpha")
        twins.stop_site("alpha", kill=True)
        twins.start_site("alpha")  # same port, a new process

    fault = in_background(kill_and_restart)

    @flow(task_runner=twins_runner)
    def survives() -> list[float]:
        retried = sleep.with_options(retries=20, retry_delay_seconds=1)
        return [future.result().fetch() for future in retried.map(seconds=[3.0] * 4, site=unmapped("alpha"))]

    state = survives(return_state=True)
    joined(fault)
    assert state.result() == [3.0] * 4
    runs = assert_every_task_run_ended(state.state_details.flow_run_id, 4)
    assert all(run.state_type.value == "COMPLETED" and run.run_count >= 2 for run in runs)


def test_a_retry_moves_to_another_site_with_the_same_operation_and_data(twins, twins_client, twins_runner):
    alpha_back = threading.Event()

    def kill_and_restart() -> None:
        loads = lambda: [twins_client.stats(site).load.running for site in ("alpha", "beta")]  # noqa: E731
        eventually(lambda: loads()[0] >= 1 and sum(loads()) == 4, "4 runs spread over alpha and beta")
        twins.stop_site("alpha", kill=True)
        twins.start_site("alpha")
        alpha_back.set()

    fault = in_background(kill_and_restart)
    # Retry only once alpha serves again: the move to beta must come from placement
    # avoiding the site that failed, not from alpha being unreachable.
    moving = where.with_options(retries=1, retry_delay_seconds=0, retry_condition_fn=lambda *_: alpha_back.wait(60))

    @flow(task_runner=twins_runner)
    def moves() -> list[str]:
        return [future.result().fetch() for future in moving.map(data=["temperature"] * 4, seconds=[4.0] * 4)]

    state = moves(return_state=True)
    joined(fault)
    assert state.result() == ["beta"] * 4
    runs = assert_every_task_run_ended(state.state_details.flow_run_id, 4)
    assert sorted(run.run_count for run in runs)[-1] == 2, "the runs that were at alpha ran twice"


def test_a_frozen_site_is_bounded_by_the_task_timeout(twins, twins_client, twins_runner):
    pid = twins.pids()["alpha"]

    @flow(task_runner=twins_runner)
    def stuck() -> str:
        future = sleep.with_options(timeout_seconds=2).submit(seconds=0.1, site="alpha")
        future.wait()
        return future.state.type.value

    os.kill(pid, signal.SIGSTOP)
    try:
        state = stuck(return_state=True)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert state.result() == "FAILED"
    runs = assert_every_task_run_ended(state.state_details.flow_run_id, 1)
    assert runs[0].state_name == "TimedOut"
    assert twins_client.call("alpha", "core.echo", {"value": "thawed"}).fetch(client=twins_client) == "thawed"


# ----------------------------------------------------------------- clients die

CLIENT_FLOW = """
import sys
from prefect import flow, unmapped
from adapters.core import sleep
from dfm_prefect.task_runner import FederationTaskRunner

@flow(task_runner=FederationTaskRunner(sys.argv[1]))
def hog():
    futures = sleep.map(seconds=[300.0] * 40, site=unmapped("beta"))
    print("submitted", flush=True)
    futures.wait()

hog()
"""


def test_a_client_killed_mid_flow_frees_the_site(twins, twins_client, prefect_api):
    idle = twins_client.stats("beta").load
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT_FLOW, str(twins.federation_file)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "submitted"
        eventually(lambda: twins_client.stats("beta").load == idle.model_copy(update={"running": 4, "queued": 36}), "40 requests held")
    finally:
        client.kill()
        client.wait()
    freed_after = eventually(lambda: twins_client.stats("beta").load == idle, "beta idle again", 10)
    assert freed_after < 5
    assert twins_client.call("beta", "core.echo", {"value": "free"}).fetch(client=twins_client) == "free"


# ------------------------------------------------------------------ durability


def _path(ref: DataRef) -> Path:
    return Path(urlsplit(ref.uri).path)


def _flip_a_byte_keeping_size_and_mtime(path: Path, offset: int) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_damaged_results_are_reported_and_never_returned(twins_client):
    flipped, deleted, truncated = (twins_client.call("alpha", "core.echo", {"value": {"n": n, "pad": "x" * 64}}) for n in range(3))
    _flip_a_byte_keeping_size_and_mtime(_path(flipped), 12)
    _path(deleted).unlink()
    _path(truncated).write_bytes(_path(truncated).read_bytes()[:-5])
    for ref, why in [(flipped, "corrupted"), (deleted, "missing"), (truncated, "corrupted")]:
        with pytest.raises(ResultIntegrityError, match=why):
            ref.fetch(client=twins_client)
        with pytest.raises(ResultIntegrityError, match=why):
            twins_client.call("alpha", "testing.read", {"data": ref.model_dump(mode="json")})


def test_a_damaged_dataset_fails_the_next_operation_in_a_flow(twins_client, twins_runner):
    box = twins_client.call("alpha", "xarray.subset", {"data": "temperature", "points": {"lat": 2.5}})
    path = _path(box)
    _flip_a_byte_keeping_size_and_mtime(path, path.stat().st_size // 2)

    @flow(task_runner=twins_runner)
    def reduce_damaged() -> DataRef:
        return moments.submit(data=box, dims=["time"]).result()

    with pytest.raises(ResultIntegrityError, match="corrupted"):
        reduce_damaged()


def test_the_client_checks_what_it_receives_end_to_end(twins_client):
    ref = twins_client.call("alpha", "core.echo", {"value": [1, 2, 3]})
    good = ref.fetch_bytes(client=twins_client)
    assert check_integrity(ref, good) == good
    with pytest.raises(ResultIntegrityError, match="fetch it again"):
        check_integrity(ref, good.replace(b"1", b"7"))
