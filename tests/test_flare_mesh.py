"""The FLARE deployment itself, for real on 127.0.0.1: `federation up/status/down`, readiness,
chunked large results, a site job process dying and rejoining, and the sites' code policy.

One FLARE POC for the module, started and stopped through the CLI as a user
would (the shared `flare_federation` fixture stays untouched by the faults here).
"""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prefect import flow

from adapters.core import sleep
from dfm_prefect.client import close_clients, get_client
from dfm_prefect.core.errors import SiteUnavailableError
from dfm_prefect.task_runner import FederationTaskRunner
from dfm_prefect.transports.flare import admin
from dfm_prefect.transports.flare.deploy.job import MeshJobConfig, write_job
from dfm_prefect.transports.flare.deploy.kits import kit_policy_problems
from dfm_prefect.transports.flare.deploy.poc import ADMIN_USER, job_pids, workspace_pids
from tests.conftest import ROOT, site_config, wait_for_task_runs

pytestmark = [pytest.mark.slow, pytest.mark.flare]

SITES = ("north", "south")
BLOB = 12 << 20


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, "-m", "dfm_prefect.cli", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """`dfm-prefect federation up --transport flare` on two sites whose policy lets big values leave."""
    root = tmp_path_factory.mktemp("flare-cli")
    configs = []
    for name in SITES:
        config = site_config(
            name,
            root / "store" / name,
            [],
            operations=["core.echo", "core.sleep", "testing.flaky", "testing.blob"],
            operation_modules=["tests.site_ops", "tests.bulk_ops"],
            export={"kinds": ["value"], "max_bytes": 64 << 20, "inline_bytes": 64 << 10},
        )
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        configs.append(str(path))
    workdir = root / "fed"
    started = cli("federation", "up", *configs, "--workdir", str(workdir))
    assert started.returncode == 0, started.stderr[-3000:]
    # Progress: each stage once, with no FLARE chatter in between.
    for stage in ("✓ provisioned mTLS startup kits", "✓ FLARE server is up", "✓ FLARE clients connected", "✓ every site is ready"):
        assert started.stdout.count(stage) == 1, started.stdout
    assert "Connecting to FLARE" not in started.stdout + started.stderr
    state = SimpleNamespace(
        workdir=workdir,
        file=workdir / "federation.json",
        prod=workdir / "flare" / "dfm" / "prod_00",
        configs=dict(zip(SITES, configs)),
        joined=[],
    )
    try:
        yield state
    finally:
        close_clients()
        if (workdir / "processes.json").exists():
            cli("federation", "down", "--workdir", str(workdir))
        for process in state.joined:
            process.wait(30)


def test_up_waits_until_every_site_is_ready_and_status_shows_it(mesh):
    spec = json.loads(mesh.file.read_text())
    assert spec["transport"] == "flare" and spec["sites"] == list(SITES) and spec["job_id"]
    shown = cli("federation", "status", "--federation", str(mesh.file), timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for site in SITES:
        row = next(line for line in shown.stdout.splitlines() if f" {site} " in line)
        assert "ready" in row and "core.echo" in row
    assert "testing.blob" in shown.stdout and "capacity" in shown.stdout
    assert shown.stdout.count(f"ready: mesh job {spec['job_id'][:8]}") == 2


def test_mesh_command_finds_the_running_job_and_writes_a_federation_file_for_flows(mesh, tmp_path):
    out = tmp_path / "federation.json"
    found = cli(
        "federation", "mesh", "--admin-kit", str(mesh.prod / ADMIN_USER), "--username", ADMIN_USER,
        "--sites", ",".join(SITES), "--out", str(out), "--no-supervise",
    )  # fmt: skip
    assert found.returncode == 0, found.stderr[-2000:]
    assert "already running" in found.stdout  # no second mesh job
    spec = json.loads(out.read_text())
    assert spec["job_id"] == json.loads(mesh.file.read_text())["job_id"] and spec["sites"] == list(SITES)
    client = get_client(out)
    assert [client.call(site, "core.echo", {"value": site}).fetch(client=client) for site in SITES] == list(SITES)


def test_a_large_result_crosses_in_bounded_chunks_and_is_counted(mesh):
    client = get_client(mesh.file)
    before_site = client.stats("north").bytes_out
    before_in = client.bytes_in["north"]
    before_pieces = client.transport.counters["pieces"]
    ref = client.call("north", "testing.blob", {"size": BLOB})
    assert not ref.is_local and ref.size >= BLOB  # too big to come back with the result
    assert ref.fetch(client=client) == "x" * BLOB
    counters = client.transport.counters
    assert counters["largest_piece"] <= 1 << 20  # no message bigger than one chunk
    assert counters["pieces"] - before_pieces >= BLOB * 4 // 3 // (1 << 20)  # base64 over 1 MiB pieces
    assert client.bytes_in["north"] - before_in >= BLOB
    assert client.stats("north").bytes_out - before_site >= BLOB


def test_a_site_whose_job_process_dies_fails_its_tasks_by_name_then_rejoins(mesh, prefect_api):
    client = get_client(mesh.file)
    job_before = json.loads(mesh.file.read_text())["job_id"]
    _, doomed = client.run("north", "core.sleep", {"seconds": 60})
    key = uuid.uuid4().hex

    @flow(task_runner=FederationTaskRunner(mesh.file))
    def survives():
        # Killed mid-run, then retried once the supervisor has replaced the mesh job.
        return sleep.with_options(retries=6, retry_delay_seconds=3).submit(seconds=2, site="north").result()

    deadline = time.monotonic() + 30
    while client.stats("north").load.running < 1 and time.monotonic() < deadline:
        time.sleep(0.1)  # the site reports its load; nothing to wait on until the sleep started
    killed = job_pids(mesh.prod / "north")
    assert killed, "north has no job process"

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        flow_state = pool.submit(contextvars.copy_context().run, survives, return_state=True)  # keeps the test's API
        while client.stats("north").load.running < 2 and time.monotonic() < deadline + 30:
            time.sleep(0.1)  # until the flow's task runs at north too
        for pid in killed:
            os.kill(pid, 9)
        with pytest.raises(SiteUnavailableError) as lost:
            doomed.result(timeout=60)
        assert "north" in str(lost.value)
        state = flow_state.result(timeout=180)

    assert state.is_completed(), state
    assert state.result().fetch() == 2
    (run,) = wait_for_task_runs(str(state.state_details.flow_run_id), 1, lambda r: r.state_name == "Completed")
    assert run.run_count >= 2
    assert json.loads(mesh.file.read_text())["job_id"] != job_before  # the supervisor replaced the mesh job
    assert client.call("south", "core.echo", {"value": key}).fetch(client=client) == key
    assert set(job_pids(mesh.prod / "north")).isdisjoint(killed)


def _client_parent(prod: Path, site: str) -> int:
    kit = str(prod / site).encode()
    for pid in workspace_pids(prod):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"client_train" in cmdline and kit in cmdline:
            return pid
    raise AssertionError(f"no FLARE client process for {site}")


def test_a_restarted_site_joins_a_new_mesh_job_while_the_old_one_drains(mesh):
    client = get_client(mesh.file)
    job_before = json.loads(mesh.file.read_text())["job_id"]
    _, draining = client.run("south", "core.sleep", {"seconds": 8})  # in flight on the old job during the switch
    os.kill(_client_parent(mesh.prod, "north"), 9)
    deadline = time.monotonic() + 30
    with pytest.raises(SiteUnavailableError, match="north"):
        while time.monotonic() < deadline:
            client.call("north", "core.echo", {"value": 0}, timeout=30)
            time.sleep(0.5)  # until the mesh notices the missing heartbeats
    # The site's administrator starts it again from its kit and YAML, as on a real site.
    join = subprocess.Popen(
        [sys.executable, "-m", "dfm_prefect.cli", "federation", "join", str(mesh.prod / "north"), str(mesh.configs["north"])],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mesh.joined.append(join)
    deadline = time.monotonic() + 90
    while True:
        try:
            client.refresh()
            assert client.call("north", "core.echo", {"value": 7}, timeout=60).fetch(client=client) == 7
            break
        except SiteUnavailableError:
            assert time.monotonic() < deadline, "north did not rejoin"
            time.sleep(0.5)  # the supervisor is starting a new mesh job
    assert json.loads(mesh.file.read_text())["job_id"] != job_before
    assert draining.result(timeout=60).ok  # the old job finished what it had before it was aborted


def _submit_until_started(mesh, folder: Path, timeout: float) -> tuple[str, str | None, dict]:
    """Submit the job in ``folder`` as the admin; its id, its status once past starting (or at ``timeout``) and its meta."""
    session = admin.open_session(mesh.prod / ADMIN_USER, ADMIN_USER)
    try:
        job_id = admin.submit_mesh_job(session, folder)
        deadline = time.monotonic() + timeout
        while (status := admin.job_status(session, job_id)) in admin.STARTING and time.monotonic() < deadline:
            time.sleep(0.5)  # the admin API has no job event
        return job_id, status, session.get_job_meta(job_id)
    finally:
        admin.close_session(session)


def test_sites_refuse_jobs_that_bring_code(mesh, tmp_path):
    for participant in ("server", *SITES):
        assert kit_policy_problems(mesh.prod / participant) == []
    folder = write_job(tmp_path / "byoc", MeshJobConfig(name="byoc-probe"))
    (folder / "app" / "custom").mkdir()
    (folder / "app" / "custom" / "payload.py").write_text("print('arbitrary code')\n")
    job_id, status, meta = _submit_until_started(mesh, folder, 60)
    detail = meta.get("job_deploy_detail")
    assert status == "FINISHED:FAILED_TO_RUN"
    assert "BYOC not permitted" in str(detail)


def test_sites_refuse_components_outside_their_class_allow_list(mesh, tmp_path):
    folder = write_job(tmp_path / "foreign", MeshJobConfig(name="allow-list-probe"))
    client_config = folder / "app" / "config" / "config_fed_client.json"
    config = json.loads(client_config.read_text())
    config["executors"][0]["executor"] = {"path": "collections.OrderedDict", "args": {}}  # installed, not allowed
    client_config.write_text(json.dumps(config))
    job_id, status, _ = _submit_until_started(mesh, folder, 90)
    assert status is not None and status.startswith("FINISHED") and status != "FINISHED:COMPLETED"
    site_log = (mesh.prod / "north" / job_id / "log.txt").read_text()
    assert "collections.OrderedDict" in site_log and "allow" in site_log


def test_down_stops_every_process_it_started(mesh):
    close_clients()
    workspace = mesh.workdir / "flare"
    assert workspace_pids(workspace)
    stopped = cli("federation", "down", "--workdir", str(mesh.workdir), timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert workspace_pids(workspace) == []
    leftover = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(workspace) not in leftover
    assert not (mesh.workdir / "processes.json").exists()
