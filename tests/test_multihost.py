"""A federation across hosts, for real: one network namespace per host, set up with docs/flare.md's steps.

Hosts: ``hub`` (the FLARE server), ``north`` and ``south`` (sites), ``client``
(the flow and its Prefect API) and ``cloud`` (an S3 endpoint that only south
is linked to). Every host reaches the others by name through its own hosts
file; sites are linked to ``hub`` only. The kits come from ``nvflare provision``
on docs/flare.md's ``project.yml`` (its server name replaced by ``hub``'s),
and each step runs the shell lines of "On several machines" on its host, so
the procedure the docs give is the one tested here.

Needs root (network namespaces): skipped with the reason otherwise. CI runs as root.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dfm_prefect.testing.netns import Internet, unavailable
from dfm_prefect.testing.s3 import DEMO_CREDENTIALS
from dfm_prefect.transports.flare.deploy.poc import workspace_pids
from tests.conftest import ROOT, climate_site_configs
from tests.multihost_setup import bring_up, host_env

pytestmark = [pytest.mark.slow, pytest.mark.flare]

HOSTS = ["hub", "north", "south", "client", "cloud"]
LINKS = [("hub", "north"), ("hub", "south"), ("hub", "client"), ("south", "cloud")]
S3_PORT = 9000


@pytest.fixture(scope="module")
def net() -> Iterator[Internet]:
    why = unavailable()
    if why is not None:
        pytest.skip(f"hosts as network namespaces: {why}")
    with Internet(HOSTS, LINKS) as internet:
        yield internet


@pytest.fixture(scope="module")
def hosts(net: Internet, tmp_path_factory: pytest.TempPathFactory, climate_data: dict[str, str]) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("hosts")
    env = host_env({**DEMO_CREDENTIALS, "DFM_TEST_S3_ENDPOINT": f"http://{net.name('cloud')}:{S3_PORT}"})

    # cloud: an S3 endpoint holding south's data (put there from cloud itself: only south is linked to it).
    # Path-style requests to a host name: moto would otherwise take "cloud" in cloud.dfm.test for a bucket.
    moto_env = {**env, "S3_IGNORE_SUBDOMAIN_BUCKETNAME": "true"}
    net.popen("cloud", [sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(S3_PORT)], env=moto_env, log=open(root / "cloud.log", "ab"))  # noqa: SIM115
    net.wait_port("cloud", "cloud", S3_PORT)
    upload = (
        "import s3fs, sys; fs = s3fs.S3FileSystem(key='{k}', secret='{s}', client_kwargs={{'endpoint_url': 'http://127.0.0.1:{p}'}}); "
        "fs.mkdir('climate'); fs.put(sys.argv[1], 's3://climate/south/temperature.zarr', recursive=True)"
    ).format(k=DEMO_CREDENTIALS["AWS_ACCESS_KEY_ID"], s=DEMO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], p=S3_PORT)
    put = net.run("cloud", [sys.executable, "-c", upload, climate_data["south_local"].removeprefix("file://")], env=env)
    assert put.returncode == 0, put.stderr[-2000:]

    data = {**climate_data, "south": "s3://climate/south/temperature.zarr"}
    configs = {path.stem: path for path in climate_site_configs(root, data)}
    deployed = bring_up(net, root, configs, env)
    print(f"3-host federation up (provision, server, 2 sites, mesh job) in {deployed.up_seconds:.1f}s")
    yield deployed


def run_on_client(net: Internet, hosts: SimpleNamespace, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return net.run("client", [sys.executable, *argv], env=hosts.flow_env, cwd=ROOT, timeout=timeout)


def test_the_flagship_flow_across_hosts_equals_the_single_host_run(net, hosts, federation, prefect_api):
    done = run_on_client(net, hosts, ["-m", "flows.federated_climate_stats", "dfm://north/temperature", "dfm://south/temperature"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert printed, done.stdout[-3000:] + done.stderr[-3000:]
    across = ast.literal_eval(printed[-1])

    from dfm_prefect.task_runner import FederationTaskRunner
    from flows.federated_climate_stats import federated_climate_stats

    single = federated_climate_stats.with_options(task_runner=FederationTaskRunner(federation.federation_file))(
        datasets=["dfm://north/temperature", "dfm://south/temperature"]
    )
    assert across.keys() == single.keys() and across
    for year, stats in single.items():
        assert across[year]["n"] == stats["n"]
        assert across[year]["mean"] == pytest.approx(stats["mean"], rel=1e-12)
        assert across[year]["std"] == pytest.approx(stats["std"], rel=1e-12)


def test_a_site_reaches_the_server_and_nothing_else(net, hosts):
    net.popen("client", [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0"])
    net.popen("south", [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0"])
    net.wait_port("client", "client", 8080)
    net.wait_port("south", "south", 8080)
    admin_port = yaml.safe_load((hosts.root / "project.yml").read_text())["participants"][0]["admin_port"]
    assert net.reachable("north", "hub", admin_port)
    for target in ("south", "client", "cloud"):
        assert "unreachable" in net.probe("north", target, 8080 if target != "cloud" else S3_PORT)
    assert "unreachable" in net.probe("client", "south", 8080)
    assert net.reachable("south", "cloud", S3_PORT)  # south's own storage link


def test_a_site_kit_used_under_another_name_is_refused(net, hosts):
    line = f"dfm-prefect federation join {shlex.quote(str(hosts.prod / 'south'))} {shlex.quote(str(hosts.configs['north']))}"
    done = net.run("north", ["bash", "-c", line], env=hosts.env, timeout=120)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0
    assert "configures site 'north' but the kit" in said and "is FLARE client 'south'" in said, said


def test_a_cut_link_fails_runs_naming_the_site_then_retries_complete_on_the_same_mesh_job(net, hosts):
    job_id = json.loads(hosts.federation_file.read_text())["job_id"]
    flow = net.popen(
        "client", [sys.executable, "-m", "tests.multihost_flows", "cut-link", "12"], env=hosts.flow_env, cwd=ROOT, stdout=subprocess.PIPE
    )
    lines: list[str] = []
    assert flow.stdout is not None
    for raw in flow.stdout:
        lines.append(raw.decode(errors="replace"))
        if raw.startswith(b"SUBMITTED"):
            break
    time.sleep(4)  # the task runs at north
    net.cut("hub", "north")
    cut_at = time.monotonic()
    time.sleep(8)
    net.restore("hub", "north")
    out, _ = flow.communicate(timeout=300)
    lines += out.decode(errors="replace").splitlines()
    said = [line for line in lines if line.startswith("RESULT ")]
    # On failure: each attempt's outcome, then the end of what the flow printed.
    attempts = [line for line in lines if "Task run" in line or "| WARNING" in line]
    assert flow.returncode == 0 and said, "\n".join(attempts)[-6000:] + "\n...\n" + "\n".join(lines)[-2000:]
    result = json.loads(said[0].removeprefix("RESULT "))
    assert result["value"] == 12.0
    assert result["failures"] and all("north" in message for message in result["failures"]), result["failures"]
    print(f"link cut for 8 s; the flow completed {time.monotonic() - cut_at:.1f}s after the cut, failures: {result['failures']}")
    assert json.loads(hosts.federation_file.read_text())["job_id"] == job_id  # no new mesh job: the same one recovered
    status = net.run("client", ["dfm-prefect", "federation", "status", "--federation", str(hosts.federation_file)], env=hosts.env)
    assert status.returncode == 0, status.stderr[-2000:]
    assert status.stdout.count(f"ready: mesh job {job_id[:8]}") == 2, status.stdout


def test_what_the_procedure_leaves_on_disk_is_for_its_owner_only(net, hosts):
    """The CA and participants' keys, each kit folder (logs, job folders) and the server's job store."""
    state = hosts.prod.parent / "state"
    private = [state, *state.rglob("*"), *(hosts.prod / name for name in ("north", "south", net.name("hub"))), hosts.root / "hub-store"]
    exposed = {str(path): oct(path.stat().st_mode & 0o777) for path in private if path.stat().st_mode & 0o077}
    assert not exposed, exposed


def test_stopping_a_site_with_sigterm_stops_its_flare_client_and_job_process(net, hosts):
    """What a service manager does (`systemctl stop`, `kill`): nothing of the site may keep serving. Runs last: north stops."""
    kit = hosts.prod / "north"
    running = workspace_pids(kit)
    cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ") for pid in running}
    joins = [pid for pid, line in cmdlines.items() if b"federation join" in line and not line.startswith(b"bash")]
    assert len(joins) == 1 and len(running) >= 3, running  # join, its FLARE client, the mesh job's process
    os.kill(joins[0], signal.SIGTERM)
    deadline = time.monotonic() + 40
    while workspace_pids(kit) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert workspace_pids(kit) == [], [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in workspace_pids(kit)]
    said = (hosts.root / "north.log").read_text()
    assert "stopping FLARE client north and its job processes" in said, said[-2000:]
