"""FLARE identities for real: who may submit work to the mesh, and who may join it.

Against the session's FLARE POC (``flare_federation``): a client needs an admin
startup kit from the federation's own provisioning, and the server and the
sites accept only certificates signed by its root CA (mTLS). The foreign kits
come from a second, independent provisioning (about 0.3 s). Each attempt must
fail with an error that says why, and nothing may run at the sites.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow

from adapters.core import echo
from dfm_prefect.client import FederationClient, get_client
from dfm_prefect.core.errors import ConfigError
from dfm_prefect.task_runner import FederationTaskRunner
from dfm_prefect.transports.flare.client import FlareSpec, FlareTransport
from dfm_prefect.transports.flare.deploy.poc import Poc
from dfm_prefect.transports.flare.trust import tls_problem

pytestmark = [pytest.mark.slow, pytest.mark.flare]
SITES = ("north", "south")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory, flare_federation) -> Iterator[Poc]:
    """Kits for an admin and a site called ``north`` from another provisioning, aimed at the session's server."""
    poc = Poc(tmp_path_factory.mktemp("foreign-provisioning"), ["north"])
    poc.prepare()
    ours = flare_federation.poc
    admin_json = poc.admin_kit / "startup" / "fed_admin.json"
    config = json.loads(admin_json.read_text())
    config["admin"]["port"] = ours.admin_port
    admin_json.write_text(json.dumps(config))
    client_json = poc.kit("north") / "startup" / "fed_client.json"
    config = json.loads(client_json.read_text())
    for server in config["servers"]:
        server["service"]["target"] = f"127.0.0.1:{ours.fl_port}"
    client_json.write_text(json.dumps(config))
    yield poc
    for name in list(poc.processes):
        poc.stop_participant(name)
    poc.sweep(grace=2.0)


def _requests(client: FederationClient) -> dict[str, int]:
    return {site: client.stats(site).requests for site in SITES}


def _spec(flare_federation, admin_kit: Path) -> FlareSpec:
    return flare_federation.spec.model_copy(update={"admin_kit": str(admin_kit), "connect_timeout": 5.0})


def test_a_client_without_a_valid_admin_kit_cannot_submit(flare_federation, foreign, tmp_path, prefect_api):
    legit = get_client(flare_federation.federation_file)
    before = _requests(legit)

    missing = _spec(flare_federation, tmp_path / "no-kit-here")
    with pytest.raises(ConfigError, match="is not an admin startup kit"):
        FederationClient(FlareTransport(missing)).open()

    started = time.monotonic()
    stranger = _spec(flare_federation, foreign.admin_kit)
    with pytest.raises(ConfigError, match="do not trust each other.*not signed by the kit's root CA") as refused:
        FederationClient(FlareTransport(stranger)).open()
    assert time.monotonic() - started < 5, "a kit from another provisioning is refused at once"
    assert "use a startup kit from this federation's provisioning" in str(refused.value)

    @flow(task_runner=FederationTaskRunner(stranger.model_dump(mode="json")))
    def intrusion() -> str:
        return echo.submit(value="let me in", site="north").result().fetch()

    with pytest.raises(ConfigError, match="do not trust each other"):
        intrusion()
    assert _requests(legit) == before  # no run request reached a site


def _handshake_then_read(port: int, kit: Path, *, with_certificate: bool) -> bytes:
    """What a TLS client trusting ``kit``'s root CA reads after the handshake (b'' when the server hangs up)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(str(kit / "startup" / "rootCA.pem"))
    if with_certificate:
        context.load_cert_chain(str(kit / "startup" / "client.crt"), str(kit / "startup" / "client.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, context.wrap_socket(sock) as tls:
        tls.settimeout(1.0)
        try:
            return tls.recv(1)
        except TimeoutError:
            return b"(kept open)"


def test_the_server_speaks_only_mutual_tls_with_certificates_from_its_provisioning(flare_federation, foreign):
    poc = flare_federation.poc
    for port in (poc.fl_port, poc.admin_port):
        # Our own site kit: the server's certificate checks out and the server keeps the connection.
        assert tls_problem(poc.kit("north"), "127.0.0.1", port) is None
        assert _handshake_then_read(port, poc.kit("north"), with_certificate=True) == b"(kept open)"
        # No client certificate: the server hangs up right after the handshake.
        assert _handshake_then_read(port, poc.kit("north"), with_certificate=False) == b""
        # Another provisioning: its root CA does not sign our server's certificate.
        assert "not signed by the kit's root CA" in (tls_problem(foreign.kit("north"), "127.0.0.1", port) or "")
    startup = poc.kit("north") / "startup"
    assert {"rootCA.pem", "client.crt", "client.key", "fed_client.json"} <= {p.name for p in startup.iterdir()}


def test_a_site_kit_from_another_provisioning_cannot_join_or_impersonate_a_site(flare_federation, foreign):
    real = flare_federation.mesh_status().sites["north"]
    heard_before = flare_federation.connected_sites()
    impostor = foreign.start("north", {})
    log = foreign.log_path("north")
    deadline = time.monotonic() + 30
    while log.read_text(errors="replace").count("re-challenge") < 3:  # FLARE's authenticator retries every 2 s
        assert impostor.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        time.sleep(0.2)  # a log line is the only sign of its attempts
    foreign.stop_participant("north")
    assert "Verified received token" not in log.read_text(errors="replace")  # never authenticated
    assert set(flare_federation.connected_sites()) == set(heard_before) == set(SITES)
    after = flare_federation.mesh_status().sites["north"]
    assert after.state == "ready" and after.incarnation == real.incarnation and after.pid == real.pid
    client = get_client(flare_federation.federation_file)
    assert client.call("north", "core.echo", {"value": "the real north"}).fetch(client=client) == "the real north"
