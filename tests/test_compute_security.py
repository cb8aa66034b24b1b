"""As the attack: a local process finds a site's Dask cluster and tries to run code in it.

A site with ``compute: cpu`` (or ``gpu``/``auto``) starts a Dask cluster of
worker processes, and Dask runs the pickled functions it is sent: whoever can
talk to its scheduler, a nanny or a worker runs code as the site, with its
credentials and its federation key. The cluster must speak only mutual TLS with
certificates made for it alone, so that a process that finds its ports (any
local user can read ``/proc/net/tcp``) runs nothing, whether it talks Dask in
clear or over TLS with a certificate of its own, while the site keeps serving.
"""

from __future__ import annotations

import json
import operator
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from distributed import LocalCluster
from distributed.security import Security

from dfm_prefect.client import get_client
from dfm_prefect.core.errors import ConfigError
from dfm_prefect.transports.local.launcher import LocalFederation
from site_workers.compute import cpu_backend
from site_workers.config import ComputeConfig
from site_workers.dask_tls import ClusterCertificates
from tests.conftest import ROOT, site_config
from tests.dask_intruder import ask_identity
from tests.support_sites import private_federation
from tests.test_adapters_support import InProcessSite, small_climate

pytestmark = pytest.mark.timeout(240)


# -- what an attacker on the same machine does -------------------------------------


def listening_ports_anyone_can_see() -> set[int]:
    """Ports in LISTEN state, from /proc/net/tcp and tcp6: readable by every local user."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listening_ports(pid: int) -> set[int]:
    """The ports the process ``pid`` and all its descendants listen on."""
    root = psutil.Process(pid)
    ports: set[int] = set()
    for process in (root, *root.children(recursive=True)):
        try:
            ports |= {c.laddr.port for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return ports


def intrude(ports: set[int], marker: Path) -> dict[str, str]:
    """Run `tests.dask_intruder` against ``ports`` as a separate local process; its outcome per attempt."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.dask_intruder", str(marker), *map(str, sorted(ports))],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return outcomes


# -- the site under attack ---------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("dask-attack")
    small_climate(seed=5, days=60).to_zarr(root / "t.zarr", zarr_format=2, consolidated=True)
    config = site_config(
        "lab",
        root / "store",
        [{"name": "t", "url": f"file://{root / 't.zarr'}"}],
        operations=["core.echo", "xarray.moments"],
        compute={"kind": "cpu", "workers": 1},
    )
    with private_federation(root / "fed", {"lab": config}) as fed:
        yield fed


def honest_requests_are_answered(fed: LocalFederation) -> None:
    client = get_client(fed.federation_file)
    assert client.call("lab", "core.echo", {"value": "still serving"}, timeout=60).fetch(client=client) == "still serving"
    moments = client.call("lab", "xarray.moments", {"data": "t", "dims": ["time", "lat", "lon"]}, timeout=120).fetch(client=client)
    assert int(moments["temperature__n"]) > 0


@pytest.mark.slow
def test_a_local_process_that_finds_the_site_cluster_runs_nothing_in_it(cpu_site: LocalFederation, tmp_path: Path) -> None:
    honest_requests_are_answered(cpu_site)  # the cluster has done work: its workers are up
    (site_pid,) = cpu_site.site_pids("lab")
    transport_port = int(cpu_site.spec.sites["lab"].rsplit(":", 1)[1])
    dask_ports = listening_ports(site_pid) - {transport_port}
    # The scheduler, the nanny and the worker listen, and any local user can see them.
    assert len(dask_ports) >= 3, f"expected the site's Dask cluster to listen, found {dask_ports}"
    assert dask_ports <= listening_ports_anyone_can_see()

    marker = tmp_path / "owned"
    outcomes = intrude(dask_ports, marker)

    got_in = {attempt: outcome for attempt, outcome in outcomes.items() if not outcome.startswith("refused")}
    assert not marker.exists(), f"an outside process ran code in the site's cluster: {got_in}"
    assert not got_in, f"the site's cluster talked to an outside process: {got_in}"
    assert cpu_site.site_pids("lab") == [site_pid]
    honest_requests_are_answered(cpu_site)


# -- the cluster the site starts ---------------------------------------------------


def _http_port(dask_scheduler: Any = None, dask_worker: Any = None) -> int:
    return int((dask_scheduler or dask_worker).http_server.port)


def test_a_site_cluster_speaks_only_mutual_tls_with_private_certificates_removed_on_close() -> None:
    backend = cpu_backend(ComputeConfig(kind="cpu", workers=1, threads_per_worker=1))
    try:
        assert backend.certificates is not None
        directory = backend.certificates.directory
        info = backend.client.scheduler_info()
        addresses = [backend.cluster.scheduler_address, *info["workers"], *(w["nanny"] for w in info["workers"].values())]
        assert len(addresses) == 3 and all(a.startswith("tls://127.0.0.1:") for a in addresses), addresses
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and directory.stat().st_uid == os.getuid()
        files = sorted(directory.iterdir())
        assert [f.name for f in files] == ["ca.pem", "cluster-key.pem", "cluster.pem"]
        assert all(stat.S_IMODE(f.lstat().st_mode) == 0o600 and f.lstat().st_uid == os.getuid() for f in files)
        assert "PRIVATE KEY" not in (directory / "ca.pem").read_text() + (directory / "cluster.pem").read_text()
        # The site's own client works; the same client without the cluster's certificate does not get in.
        assert backend.client.submit(operator.add, 1, 2).result(timeout=30) == 3
        for address in addresses:
            assert ask_identity(address, Security.temporary()).startswith("refused")
            assert ask_identity(address.replace("tls://", "tcp://"), None).startswith("refused")
        assert ask_identity(addresses[0], backend.certificates.security()).startswith("answered")
        # Dask's HTTP servers (no authentication at all) no longer listen; the worker process listens on its TLS port only.
        http_ports = {backend.client.run_on_scheduler(_http_port), *backend.client.run(_http_port).values()}
        assert len(http_ports) == 2 and not http_ports & listening_ports_anyone_can_see()
        for address, pid in backend.client.run(os.getpid).items():
            assert listening_ports(pid) == {int(address.rsplit(":", 1)[1])}
    finally:
        backend.close()
    assert not directory.exists()


def test_every_cluster_gets_its_own_certificates() -> None:
    first, second = ClusterCertificates(), ClusterCertificates()
    try:
        assert first.directory != second.directory
        assert (first.directory / "ca.pem").read_bytes() != (second.directory / "ca.pem").read_bytes()
    finally:
        first.close()
        second.close()
    assert not first.directory.exists() and not second.directory.exists()


# -- an existing scheduler (compute.scheduler_address) ----------------------------


@pytest.mark.parametrize(
    ("compute", "message"),
    [
        ({"kind": "cpu", "scheduler_address": "tcp://10.0.0.5:8786"}, "scheduler_tls"),
        ({"kind": "cpu", "scheduler_address": "tcp://127.0.0.1:8786"}, "allow_unauthenticated_scheduler"),
        ({"kind": "gpu", "scheduler_address": "ucx://10.0.0.5:8786"}, "allow_unauthenticated_scheduler"),
        ({"kind": "cpu", "scheduler_address": "tls://10.0.0.5:8786"}, "scheduler_tls"),
        (
            {"kind": "cpu", "scheduler_address": "tcp://10.0.0.5:8786", "scheduler_tls": {"ca_file": "a", "cert_file": "b", "key_file": "c"}},
            "tls://",
        ),
        ({"kind": "cpu", "scheduler_tls": {"ca_file": "a", "cert_file": "b", "key_file": "c"}}, "only with"),
        ({"kind": "cpu", "allow_unauthenticated_scheduler": True}, "only with"),
    ],
)
def test_an_existing_scheduler_without_tls_is_refused_unless_the_admin_opts_out(tmp_path: Path, compute: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        InProcessSite(str(tmp_path), [], compute=compute)


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    certificates = ClusterCertificates()
    try:
        key = tmp_path / "key.pem"
        key.write_bytes((certificates.directory / "cluster-key.pem").read_bytes())
        key.chmod(0o644)
        tls = {"ca_file": str(certificates.directory / "ca.pem"), "cert_file": str(certificates.directory / "cluster.pem"), "key_file": str(key)}
        with pytest.raises(ConfigError, match="chmod 600"):
            InProcessSite(str(tmp_path / "store"), [], compute={"kind": "cpu", "scheduler_address": "tls://127.0.0.1:1", "scheduler_tls": tls})
    finally:
        certificates.close()


def test_an_existing_tls_scheduler_does_the_work_with_the_admins_certificates(tmp_path: Path) -> None:
    small_climate(seed=7, days=30).to_zarr(tmp_path / "t.zarr", zarr_format=2, consolidated=True)
    certificates = ClusterCertificates()  # stands in for the certificates the admin made for that cluster
    try:
        with LocalCluster(n_workers=1, processes=False, protocol="tls://", host="127.0.0.1", security=certificates.security(), dashboard_address=None) as cluster:
            tls = {name: str(certificates.directory / file) for name, file in (("ca_file", "ca.pem"), ("cert_file", "cluster.pem"), ("key_file", "cluster-key.pem"))}
            compute = {"kind": "cpu", "scheduler_address": cluster.scheduler_address, "scheduler_tls": tls}
            before = cluster.scheduler.transition_counter
            with InProcessSite(str(tmp_path / "store"), [{"name": "t", "url": f"file://{tmp_path / 't.zarr'}"}], compute=compute) as site:
                result = site.call("xarray.reduce", data="t", dims=["time"], stat="max")
            assert result["temperature"].shape == (18, 36)
            assert cluster.scheduler.transition_counter > before
    finally:
        certificates.close()


def test_the_unauthenticated_opt_out_is_loud(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with LocalCluster(n_workers=1, processes=False, protocol="tcp://", host="127.0.0.1", dashboard_address=None) as cluster:
        compute = {"kind": "cpu", "scheduler_address": cluster.scheduler_address, "allow_unauthenticated_scheduler": True}
        with caplog.at_level("WARNING", logger="dfm_prefect.site.compute"), InProcessSite(str(tmp_path), [], compute=compute):
            pass
    assert any("without authentication" in r.message and cluster.scheduler_address in r.message for r in caplog.records)
