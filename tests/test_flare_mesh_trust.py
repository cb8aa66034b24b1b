"""No party speaks for another, on a real FLARE POC: a malicious site and a second admin attack the mesh.

One POC for the module: sites ``alpha`` and ``beta``. Alpha's administrator
installed ``tests.evil_site_ops`` (a malicious module, imported in alpha's job
process), which forges hellos, heartbeats, replies and dispatches through
alpha's own FLARE engine. The other attacker is a second person with an admin
kit of the same provisioning: ``researcher@nvidia.com`` (role ``lead``), and
the operator ``admin@nvidia.com`` (``project_admin``) where it matters. Each
attack must fail, the honest sites and clients keep working, and what was
refused is counted and visible in ``dfm.status`` and the federation status.
The reply buffers are small here (2 MiB per site) so that a flood is cheap.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dfm_prefect.client import FederationClient, get_client
from dfm_prefect.core.wire import ErrorInfo, ErrorReply, ReplyEnvelope
from dfm_prefect.transports.flare import admin
from dfm_prefect.transports.flare.deploy.job import MeshJobConfig, write_job
from dfm_prefect.transports.flare.deploy.poc import ADMIN_USER, RESEARCHER
from dfm_prefect.transports.flare.protocol import ExchangeRequest
from tests.conftest import ROOT, site_config
from tests.support_sites import FlareSites, private_flare_federation

pytestmark = [pytest.mark.slow, pytest.mark.flare]

SPOKE_FOR_ANOTHER = "spoke for another site"
REFUSED = "return code BAD_REQUEST_DATA"
JOB = MeshJobConfig(max_buffer_bytes=8 << 20, max_site_buffer_bytes=2 << 20, max_client_buffer_bytes=4 << 20)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlareSites]:
    root = tmp_path_factory.mktemp("flare-trust")
    configs = {
        "alpha": site_config(
            "alpha", root / "store" / "alpha", [],
            operations=["core.echo", "core.sleep", "evil.forge", "evil.peers"],
            operation_modules=["tests.site_ops", "tests.evil_site_ops"],
        ),
        "beta": site_config("beta", root / "store" / "beta", [], operations=["core.echo", "core.sleep"]),
    }  # fmt: skip
    with private_flare_federation(root, configs, job=JOB) as fed:
        yield fed


def _forge(client: FederationClient, topic: str, message: dict[str, Any], **options: Any) -> dict[str, int]:
    """Have alpha's malicious module send forged ``topic`` messages; how they were answered."""
    return client.call("alpha", "evil.forge", {"topic": topic, "message": message, **options}, timeout=120).fetch(client=client)


def _my_peer_id(client: FederationClient) -> str:
    """The id under which alpha sees this client (what any site learns about its clients)."""
    (peer,) = client.call("alpha", "evil.peers", {}).fetch(client=client)
    return peer


def _beta(mesh: FlareSites):
    return mesh.fed.mesh_status().sites["beta"]


def test_a_site_cannot_answer_a_request_sent_to_another_site(mesh):
    client = get_client(mesh.federation_file)
    peer = _my_peer_id(client)
    beta = _beta(mesh)
    started = time.monotonic()
    request_id, answer = client.run("beta", "core.sleep", {"seconds": 3})
    forged = ReplyEnvelope(messages=[ErrorReply(id=request_id, error=ErrorInfo(code="internal", message="alpha says beta failed"))])
    chunk = {"incarnation": beta.incarnation, "peer": peer, "frame": "f", "index": 0, "count": 1, "data": forged.model_dump_json()}
    # As beta, even with beta's name in FLARE's peer context: the controller knows the message came from alpha.
    answers = _forge(client, "reply", {**chunk, "site": "beta"}, claim_identity="beta")
    assert answers == {f'{{"accepted":false,"reason":"{SPOKE_FOR_ANOTHER}","retry":false}}': 1}
    # As itself, for beta's request: the controller lets alpha reach this client, the client does not take it.
    alpha = mesh.fed.mesh_status().sites["alpha"]
    assert _forge(client, "reply", {**chunk, "site": "alpha", "incarnation": alpha.incarnation}) == {'{"accepted":true}': 1}
    assert answer.result(timeout=30).ok  # beta's own answer, after its 3 s
    assert time.monotonic() - started >= 3
    assert mesh.fed.mesh_status().sites["alpha"].rejected[SPOKE_FOR_ANOTHER] >= 1
    assert client.transport.counters["dropped_replies"]["alpha"] >= 1
    shown = client.transport.site_states()
    assert SPOKE_FOR_ANOTHER in shown["alpha"] and "about a request sent to another site" in shown["alpha"]
    assert "refused" not in shown["beta"]


def test_a_site_cannot_say_hello_or_heartbeat_as_another_invent_sites_or_dispatch(mesh):
    client = get_client(mesh.federation_file)
    peer = _my_peer_id(client)
    before = _beta(mesh)
    _, in_flight = client.run("beta", "core.sleep", {"seconds": 2})
    dead_beta = {"site": "beta", "incarnation": "forged", "pid": 1, "error": "forged: beta could not start"}
    assert _forge(client, "hello", dead_beta, repeat=5, claim_identity="beta") == {REFUSED: 5}
    beat = {"site": "beta", "incarnation": before.incarnation}
    assert _forge(client, "heartbeat", beat, repeat=5) == {REFUSED: 5}
    assert _forge(client, "hello", {**dead_beta, "error": None}, repeat=300, made_up=True) == {REFUSED: 300}
    # Straight to beta, as if from the controller: cancel this client's work there and run a frame of alpha's choice.
    dispatch = {"frames": [{"peer": peer, "data": "{}"}], "closed_peers": [peer]}
    assert _forge(client, "dispatch", dispatch, target="beta") == {REFUSED: 1}

    assert in_flight.result(timeout=30).ok  # beta's work was neither failed nor cancelled
    status = mesh.fed.mesh_status()
    after = status.sites["beta"]
    assert set(status.sites) == {"alpha", "beta"}  # 300 made-up names created nothing
    assert (after.state, after.incarnation, after.pid) == ("ready", before.incarnation, before.pid)
    assert after.rejected == {}
    assert status.sites["alpha"].rejected[SPOKE_FOR_ANOTHER] >= 310
    assert client.call("beta", "core.echo", {"value": "still beta"}).fetch(client=client) == "still beta"


def test_one_site_cannot_silence_the_others_with_replies(mesh):
    client = get_client(mesh.federation_file)
    peer = _my_peer_id(client)
    alpha = mesh.fed.mesh_status().sites["alpha"]
    junk = {"site": "alpha", "incarnation": alpha.incarnation, "frame": "junk", "index": 0, "count": 1, "data": ""}
    # To made-up clients: refused at once, nothing buffered.
    answers = _forge(client, "reply", junk, repeat=40, fill=512 << 10, made_up=True)
    assert answers == {'{"accepted":false,"reason":"reply to a client that sent it nothing","retry":false}': 40}
    assert mesh.fed.mesh_status().buffered_bytes < 512 << 10  # none of the 20 MiB (honest replies may be in flight)
    # To a real client, far beyond alpha's 2 MiB share: alpha holds at most its share, beta is not held up.
    _, flood = client.run("alpha", "evil.forge", {"topic": "reply", "message": {**junk, "peer": peer}, "repeat": 60, "fill": 512 << 10})
    # Before the quotas, beta went unanswered for more than 45 s; a bound, not a timing.
    assert client.call("beta", "core.echo", {"value": "heard"}, timeout=30).fetch(client=client) == "heard"
    flooded = flood.result(timeout=120)
    assert flooded.ok
    status = mesh.fed.mesh_status()
    assert status.sites["beta"].rejected == {} and status.sites["beta"].state == "ready"
    assert status.buffered_bytes <= JOB.max_site_buffer_bytes + (512 << 10)
    assert status.sites["alpha"].rejected["reply to a client that sent it nothing"] >= 40


def test_another_admin_cannot_read_or_end_a_clients_work_even_knowing_its_id(mesh):
    victim = get_client(mesh.federation_file)
    victim_peer = _my_peer_id(victim)  # what a site (here: colluding with the thief) knows about the victim
    _, answer = victim.run("beta", "core.sleep", {"seconds": 3})
    spec = mesh.fed.spec_for(RESEARCHER)
    thief = admin.open_session(spec.admin_kit, spec.username)
    try:
        job = admin.find_mesh_job(thief, spec.job_name)
        stolen = admin.exchange(thief, job.id, ExchangeRequest(mailbox=victim_peer, wait=1.0))
        admin.exchange(thief, job.id, ExchangeRequest(mailbox=victim_peer, closing=True))  # "goodbye" as the victim
    finally:
        admin.close_session(thief)
    assert stolen.pieces == []
    reply = answer.result(timeout=30)
    assert reply.ok and reply.error is None  # neither read nor cancelled


def _refused(call: Any, *args: Any) -> bool:
    """Whether FLARE refused an admin command as not authorized (it raises or answers, depending on the command)."""
    try:
        seen = str(call(*args))
    except Exception as exc:  # every refusal counts: FLARE raises several types for them
        seen = f"{type(exc).__name__}: {exc}"
    refused = "not authorized" in seen.lower() or "NOT_AUTHORIZED" in seen
    if not refused:
        print(f"not refused: {getattr(call, '__name__', call)}{args}: {seen[:500]}")
    return refused


@pytest.mark.parametrize("user", [RESEARCHER, ADMIN_USER])
def test_admin_kits_have_no_shell_and_only_the_operator_submits_jobs(mesh, user, tmp_path):
    kit = mesh.fed.poc.kit(user)
    session = admin.open_session(kit, user)
    try:
        leaks = {
            "ls": lambda target: session.ls_target(target, path="."),
            "cat": lambda target: session.cat_target(target, file="local/authorization.json"),
            "grep": lambda target: session.grep_target(target, pattern="site", file="log.txt"),
            "tail": lambda target: session.tail_target_log(target),
            "head": lambda target: session.head_target_log(target),
            "pwd": lambda target: session.get_working_directory(target),
        }
        allowed = [f"{name} {target}" for target in ("server", "alpha") for name, command in leaks.items() if not _refused(command, target)]
        job = admin.find_mesh_job(session, "dfm-mesh")
        allowed += [name for name, command, arg in (
            ("get_job_log", lambda target: session.get_job_logs(job.id, target), "all"),
            ("download_job", lambda folder: session.download_job_result(job.id, folder), str(tmp_path)),
        ) if not _refused(command, arg)]  # fmt: skip
        if user == RESEARCHER and not _refused(admin.submit_mesh_job, session, write_job(tmp_path / "second", MeshJobConfig())):
            allowed.append("submit_job")  # a second mesh job, submitted by a flow author
        assert allowed == []
        assert [j.id for j in admin.mesh_jobs(session, "dfm-mesh")] == [job.id]
    finally:
        admin.close_session(session)
    client = get_client(mesh.federation_file)
    assert client.call("alpha", "core.echo", {"value": user}).fetch(client=client) == user


def test_the_federation_status_shows_each_sites_refusals(mesh):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "1000"}  # one line per site
    command = [sys.executable, "-m", "dfm_prefect.cli", "federation", "status", "--federation", str(mesh.federation_file)]
    shown = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr[-2000:]
    rows = {site: next(line for line in shown.stdout.splitlines() if f" {site} " in line) for site in ("alpha", "beta")}
    assert f"{SPOKE_FOR_ANOTHER}: " in rows["alpha"] and "reply to a client that sent it nothing" in rows["alpha"]
    assert "refused" not in rows["beta"]
