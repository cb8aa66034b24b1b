"""Faults for real: sites killed, frozen and restarted, clients killed, stored results damaged,
and (over FLARE) the federation server killed and restarted.

``alpha`` and ``beta`` (a private federation of this module, on each transport
in turn) both hold a replica of the same source, so a task run can move from a
failed site to the other. After every flow the Prefect API is asked for the
task runs' states: each one must have ended, none may stay Running.

Over FLARE, killing a site kills its FLARE client and its job process at once
(the site's machine died); the mesh notices the missing heartbeats after
``site_timeout`` and the supervisor brings a restarted site into a new mesh job.
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

from adapters.core import echo, sleep
from adapters.xarray_ops import moments
from dfm_prefect.client import FederationClient, get_client
from dfm_prefect.core.errors import ResultIntegrityError
from dfm_prefect.core.refs import DataRef, check_integrity
from dfm_prefect.task_runner import FederationTaskRunner
from dfm_prefect.transports.flare.deploy.job import MeshJobConfig
from dfm_prefect.transports.local.launcher import LocalFederation
from tests.conftest import ROOT, TRANSPORTS, read_task_runs, site_config, wait_for_task_runs
from tests.site_ops import where
from tests.support_sites import FlareSites, private_federation, private_flare_federation, restart_site, serves_again, signal_site

pytestmark = pytest.mark.slow

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
OPERATIONS = ["core.echo", "core.sleep", "testing.where", "testing.read", "xarray.subset", "xarray.write", "xarray.moments"]
CLIENT_TIMEOUT = 4.0
"""The FLARE mesh job's client_timeout here: a client that stops exchanging is gone after this long."""
SITE_TIMEOUT = 6.0
"""The FLARE mesh job's site_timeout here (default 3 s): a frozen site must outlast a 2 s task timeout
plus a flow's start on a busy machine before the heartbeat timeout declares it dead."""
Twins = LocalFederation | FlareSites


@pytest.fixture(scope="module", params=TRANSPORTS)
def twins(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, climate_data: dict[str, str]) -> Iterator[Twins]:
    root = tmp_path_factory.mktemp(f"twins-{request.param}")
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
    if request.param == "local":
        with private_federation(root, configs) as fed:
            yield fed
    else:
        with private_flare_federation(root, configs, job=MeshJobConfig(client_timeout=CLIENT_TIMEOUT, site_timeout=SITE_TIMEOUT)) as fed:
            yield fed


@pytest.fixture
def flare(twins: Twins) -> bool:
    return isinstance(twins, FlareSites)


@pytest.fixture
def twins_client(twins: Twins) -> Iterator[FederationClient]:
    client = get_client(twins.federation_file)
    for name in twins.sites:  # a test that failed half-way may have left a site down
        if name not in twins.pids():
            restart_site(twins, client, name)
    yield client


@pytest.fixture
def twins_runner(twins: Twins, twins_client: FederationClient, prefect_api: str) -> FederationTaskRunner:
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


def four_runs_at_alpha_meet(fault: Callable[[], object], twins_client, twins_runner) -> list[str]:
    """Four 60 s runs at alpha, ``fault`` once all four run: each must end Failed, long before its work would end.

    Returns each run's state message; every task run must have ended in the API.
    """
    killer = in_background(lambda: (
        eventually(lambda: twins_client.stats("alpha").load.running == 4, "4 runs at alpha"),
        fault(),
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
    assert time.monotonic() - started < 45, "the runs must fail when the fault happens, not when their work would end"
    assert [kind for kind, _ in outcomes] == ["FAILED"] * 4
    assert_every_task_run_ended(state.state_details.flow_run_id, 4)
    return [message for _, message in outcomes]


def test_a_killed_site_fails_its_inflight_runs_with_an_error_naming_it(twins, twins_client, twins_runner):
    messages = four_runs_at_alpha_meet(lambda: twins.stop_site("alpha", kill=True), twins_client, twins_runner)
    assert all("SiteUnavailableError" in message and "'alpha'" in message for message in messages), messages


def test_prefect_retries_rerun_the_work_once_the_site_is_back(twins, twins_client, twins_runner, flare):
    def kill_and_restart() -> None:
        eventually(lambda: twins_client.stats("alpha").load.running == 4, "4 runs at alpha")
        twins.stop_site("alpha", kill=True)
        twins.start_site("alpha")  # local: same port, a new process; FLARE: the supervisor starts a new mesh job

    fault = in_background(kill_and_restart)

    @flow(task_runner=twins_runner)
    def survives() -> list[float]:
        # Over FLARE the site is back once a new mesh job runs (about 15 s): more attempts bridge that.
        retried = sleep.with_options(retries=60 if flare else 20, retry_delay_seconds=1)
        return [future.result().fetch() for future in retried.map(seconds=[3.0] * 4, site=unmapped("alpha"))]

    state = survives(return_state=True)
    joined(fault)
    assert state.result() == [3.0] * 4
    runs = assert_every_task_run_ended(state.state_details.flow_run_id, 4)
    assert all(run.state_type.value == "COMPLETED" and run.run_count >= 2 for run in runs)


def test_a_run_submitted_while_its_site_is_down_is_placed_again_at_each_retry(twins, twins_client, twins_runner, flare):
    """Placing is part of every attempt: a run submitted while its site was down runs there once the site is back."""
    twins.stop_site("alpha", kill=True)
    eventually(lambda: "alpha" not in twins_client.refresh(), "the client to see alpha down", timeout=60)
    failed_once = threading.Event()
    back = in_background(lambda: (failed_once.wait(60), twins.start_site("alpha")))

    def first_failure(task: Any, run: Any, state: Any) -> bool:
        failed_once.set()
        return True

    @flow(task_runner=twins_runner)
    def placed_again() -> float:
        # Over FLARE the restarted site serves once a new mesh job runs (about 15 s).
        retried = sleep.with_options(retries=90 if flare else 30, retry_delay_seconds=1, retry_condition_fn=first_failure)
        return retried.submit(seconds=0.5, site="alpha").result().fetch()

    state = placed_again(return_state=True)
    joined(back)
    assert state.result() == 0.5
    runs = assert_every_task_run_ended(state.state_details.flow_run_id, 1)
    assert runs[0].state_type.value == "COMPLETED" and runs[0].run_count >= 2
    assert runs[0].name == "core.sleep@alpha"  # named by the site the flow named, though it could not be placed at first


def test_a_retry_moves_to_another_site_with_the_same_operation_and_data(twins, twins_client, twins_runner):
    alpha_back = threading.Event()

    def kill_and_restart() -> None:
        loads = lambda: [twins_client.stats(site).load.running for site in ("alpha", "beta")]  # noqa: E731
        eventually(lambda: loads()[0] >= 1 and sum(loads()) == 4, "4 runs spread over alpha and beta")
        twins.stop_site("alpha", kill=True)
        restart_site(twins, twins_client, "alpha")
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
    @flow(task_runner=twins_runner)
    def stuck() -> str:
        future = sleep.with_options(timeout_seconds=2).submit(seconds=0.1, site="alpha")
        future.wait()
        return future.state.type.value

    signal_site(twins, "alpha", signal.SIGSTOP)
    try:
        state = stuck(return_state=True)
    finally:
        signal_site(twins, "alpha", signal.SIGCONT)
    assert state.result() == "FAILED"
    runs = assert_every_task_run_ended(state.state_details.flow_run_id, 1)
    assert runs[0].state_name == "TimedOut"
    # Over FLARE a site frozen past site_timeout is declared dead; thawed, it says hello and serves again.
    assert serves_again(twins_client, "alpha", timeout=30) == "back"


def test_a_frozen_site_without_a_task_timeout_fails_its_runs_after_the_heartbeat_timeout(twins, twins_client, twins_runner, flare):
    if not flare:
        pytest.skip("the local transport has no heartbeat: a frozen site is bounded only by task timeouts (RELIABILITY.md)")

    @flow(task_runner=twins_runner)
    def stuck() -> tuple[str, str]:
        future = sleep.submit(seconds=30, site="alpha")
        future.wait()
        return future.state.type.value, future.state.message or ""

    eventually_frozen = in_background(lambda: (
        eventually(lambda: twins_client.stats("alpha").load.running == 1, "the run at alpha"),
        signal_site(twins, "alpha", signal.SIGSTOP),
    ))
    started = time.monotonic()
    try:
        state = stuck(return_state=True)
    finally:
        joined(eventually_frozen)
        signal_site(twins, "alpha", signal.SIGCONT)
    kind, message = state.result()
    assert kind == "FAILED" and "SiteUnavailableError" in message and "'alpha'" in message and "heartbeat" in message
    assert time.monotonic() - started < SITE_TIMEOUT + 15, "the run must fail after the heartbeat timeout, not when its work would end"
    assert_every_task_run_ended(state.state_details.flow_run_id, 1)
    # Once the mesh says alpha is back, the client (idle since it failed the run) is served at
    # its first request: it asks for the sites' states again instead of failing on old news.
    eventually(lambda: mesh_says_ready(twins, "alpha"), "alpha ready again in the mesh job", timeout=30)
    assert twins_client.call("alpha", "core.echo", {"value": "back"}, timeout=30).fetch(client=twins_client) == "back"
    assert twins_client.stats("alpha").load.running == 0  # thawed, it cancelled what its clients had given up


def mesh_says_ready(twins: Any, site: str) -> bool:
    """What the mesh job's controller says of ``site``, through an admin session of its own."""
    from dfm_prefect.transports.flare import admin

    spec = twins.fed.spec
    session = admin.open_session(spec.admin_kit, spec.username)
    try:
        job = admin.mesh_jobs(session, spec.job_name)[0]
        state = admin.status(session, job.id).sites.get(site)
        return state is not None and state.state == "ready"
    finally:
        session.close()


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


def test_a_client_killed_mid_flow_frees_the_site(twins, twins_client, prefect_api, flare):
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
    # Local: the site sees the connection drop. FLARE: the mesh job sees the client stop exchanging
    # while it waited for answers, and declares it gone after client_timeout.
    bound = CLIENT_TIMEOUT + 4 if flare else 5
    freed_after = eventually(lambda: twins_client.stats("beta").load == idle, "beta idle again", bound + 5)
    assert freed_after < bound
    assert twins_client.call("beta", "core.echo", {"value": "free"}).fetch(client=twins_client) == "free"


def test_a_client_that_closes_frees_the_sites_at_once(twins, twins_client):
    from dfm_prefect.spec import load_spec
    from dfm_prefect.transports import transport_class

    spec = load_spec(twins.federation_file)
    leaving = FederationClient(transport_class(spec.transport).from_spec(spec)).open()
    futures = [leaving.run(site, "core.sleep", {"seconds": 300})[1] for site in ("alpha", "beta") for _ in range(6)]
    held = lambda: sum(twins_client.stats(s).load.running + twins_client.stats(s).load.queued for s in ("alpha", "beta"))  # noqa: E731
    eventually(lambda: held() == 12, "12 requests held")
    leaving.close()  # FLARE: a goodbye to the mesh job; local: the connections close
    assert eventually(lambda: held() == 0, "both sites idle", 10) < 3
    assert all(future.exception(timeout=1) is not None for future in futures)


def test_a_live_client_keeps_its_long_and_idle_work(twins, twins_client, flare):
    # Only FLARE judges a client by its exchanges; on the local transport a connection is its liveness.
    patience = CLIENT_TIMEOUT if flare else 0.5
    expired = lambda: twins.fed.mesh_status().counters.get("clients_expired", 0) if flare else 0  # noqa: E731
    before = expired()
    # Longer than client_timeout: the client keeps exchanging while it waits.
    assert twins_client.call("alpha", "core.sleep", {"seconds": 2.5 * patience}, timeout=60).fetch(client=twins_client) == 2.5 * patience
    time.sleep(1.5 * patience)  # idle: no requests, so no exchanges at all, and it must not be declared gone
    assert twins_client.call("beta", "core.echo", {"value": "still here"}).fetch(client=twins_client) == "still here"
    assert expired() == before


def test_a_client_whose_admin_session_the_server_ended_logs_in_again(twins, twins_client, twins_runner, flare):
    """FLARE's server ends an admin session after 30 idle minutes; the next flow must not find the server "unreachable"."""
    if not flare:
        pytest.skip("the local transport has no admin session: each request goes to the site directly")
    session = twins_client.transport._session
    renewals = session.renewals
    assert twins_client.call("alpha", "core.echo", {"value": "before"}).fetch(client=twins_client) == "before"
    # What the server's idle timeout does: it ends the session and sends FLARE's admin client a
    # SESSION_EXPIRED message, after which every command of that session fails.
    from nvflare.fuel.f3.message import Message

    session._session.api.server_execute("_logout")
    session._session.api._handle_session_expired(Message(payload="Your session is closed due to inactivity or cert expiry."))

    @flow(task_runner=twins_runner)
    def after_the_pause() -> list[Any]:
        return [f.result().fetch() for f in echo.map(value=["a", "b"], site=["alpha", "beta"])]

    assert after_the_pause() == ["a", "b"]
    assert session.renewals == renewals + 1


@pytest.mark.flare
def test_a_client_back_after_the_mesh_dropped_its_idle_mailbox_gets_its_answers(tmp_path, climate_data, prefect_api):
    """The mesh job drops an idle client's mailbox (``idle_expiry``, 600 s by default; 3 s here): a notebook
    that pauses longer than that must find the federation working when it comes back."""
    configs = {"gamma": site_config("gamma", tmp_path / "store", [{"name": "temperature", "url": climate_data["north"]}])}
    with private_flare_federation(tmp_path / "fed", configs, job=MeshJobConfig(idle_expiry=3.0)) as fed:
        client = get_client(fed.federation_file)
        assert client.call("gamma", "core.echo", {"value": "before"}).fetch(client=client) == "before"
        expired = fed.fed.mesh_status().counters.get("clients_expired", 0)
        time.sleep(6)
        assert fed.fed.mesh_status().counters.get("clients_expired", 0) > expired  # it was dropped
        assert client.call("gamma", "core.echo", {"value": "after"}, timeout=30).fetch(client=client) == "after"

        @flow(task_runner=FederationTaskRunner(fed.federation_file))
        def after_the_pause() -> Any:
            return echo.submit(value="in a flow", site="gamma").result().fetch()

        assert after_the_pause() == "in a flow"


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
    # A stored copy (xarray.write stores on purpose; a subset would be a view, with no bytes to damage).
    box = twins_client.call("alpha", "xarray.write", {"data": "temperature"})
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


# ------------------------------------------------------- the federation server dies


def test_the_federation_server_killed_mid_flow_fails_inflight_runs_naming_it_then_recovers(twins, twins_client, twins_runner, flare):
    if not flare:
        pytest.skip("the local transport has no federation server: clients talk to each site directly")
    messages = four_runs_at_alpha_meet(twins.fed.kill_server, twins_client, twins_runner)
    assert all("federation server" in message and "cannot be reached" in message for message in messages), messages

    # Its operator starts it again: the FLARE clients reconnect, the supervisor replaces the mesh
    # job that died with it, and flows work again with the same federation file and client.
    twins.fed.start_server()

    @flow(task_runner=FederationTaskRunner(twins.federation_file))
    def afterwards() -> list[str]:
        retried = echo.with_options(retries=30, retry_delay_seconds=2)  # bridges the ~15 s until the new mesh job runs
        return [future.result().fetch() for future in retried.map(value=["a", "b", "c", "d"])]

    assert afterwards() == ["a", "b", "c", "d"]
    assert serves_again(twins_client, "alpha") == "back"
    # FLARE aborts the site job processes of the job that died with the server: one per site is left.
    eventually(lambda: all(len(twins.fed.poc.job_pids(site)) == 1 for site in twins.sites), "old job processes gone", 60)
