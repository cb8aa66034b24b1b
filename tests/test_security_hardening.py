"""Silent connections, unread replies, secrets across a cut, user code that outlives its run, private results and enforced timeouts, each written as the attack against real site processes.

Each test mounts the attack, then checks that it failed, that nothing leaked,
that the error says what happened, and that the site still serves an honest
client. Memory bounds are measured on the site process with psutil.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dfm_prefect.client import FederationClient, get_client
from dfm_prefect.core.backpressure import ReplyBuffer
from dfm_prefect.core.errors import OperationFailedError, RequestTimeoutError
from dfm_prefect.core.wire import Envelope, FetchChunk, FetchRequest, ProgressUpdate, RunRequest, unwrap
from dfm_prefect.transports.local.launcher import LocalFederation
from tests.support_sites import RawSiteConnection, private_federation

pytestmark = pytest.mark.slow

TOKEN = "vault-Sk-9f8e7d6c5b4a3210"
TOKEN_VAR = "DFM_TEST_VAULT_TOKEN"
MiB = 1 << 20


def _site(name: str, root: Path, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "operations": ["core.echo", "core.sleep", "testing.leak"],
        "operation_modules": ["tests.site_ops"],
        "data_roots": [{"url": f"file://{root}", "storage_options": {"token": f"${{env:{TOKEN_VAR}}}"}}],
        "result_store": {"url": f"file://{root / name / 'store'}"},
        # error_detail: message, so that error texts are long enough to be cut (type is the default).
        "export": {"kinds": ["value"], "max_bytes": 4 * MiB, "inline_bytes": MiB, "share_logs": True, "error_detail": "message"},
        **extra,
    }


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("hardening")
    configs = {
        "vault": _site("vault", root),
        "gate": _site("gate", root, limits={"handshake_timeout_s": 2, "max_unauthenticated": 256}),
        "burst": {
            **_site("burst", root, limits={"reply_buffer_bytes": 4 * MiB, "reply_stall_s": 3, "concurrency": 2}),
            "operations": ["core.echo", "testing.blob"],
            "operation_modules": ["tests.bulk_ops"],
        },
        "lab": {
            **_site("lab", root),
            "operations": ["core.echo", "code.python"],
            "user_code": {"enabled": True, "timeout_s": 30},
        },
    }
    with private_federation(root / "federation", configs, env={TOKEN_VAR: TOKEN}) as federation:
        yield federation


@pytest.fixture(scope="module")
def client(fed: LocalFederation) -> FederationClient:
    return get_client(fed.federation_file)


def serves(client: FederationClient, site: str) -> bool:
    return client.call(site, "core.echo", {"value": "still here"}, timeout=60).fetch(client=client) == "still here"


# ------------------------------------------------------------- mask, then cut


def _no_piece_of_the_token(text: str) -> bool:
    return not any(TOKEN[:n] in text or TOKEN[-n:] in text for n in range(6, len(TOKEN) + 1))


@pytest.mark.parametrize("cut", [1, 4, len(TOKEN) - 1])
def test_a_credential_straddling_the_cut_of_an_error_progress_or_log_never_leaves(client, cut):
    # The attacker picks the padding so the credential starts `cut` characters before each cut.
    error_pad = 8192 - cut - len("RuntimeError: login failed for token=")
    with pytest.raises(OperationFailedError) as info:
        client.call("vault", "testing.leak", {"variable": TOKEN_VAR, "pad": error_pad}, timeout=60)
    assert len(str(info.value)) >= 8192 and _no_piece_of_the_token(str(info.value))

    progress: list[str] = []
    params = {"variable": TOKEN_VAR, "mode": "progress", "pad": 512 - cut - len("token ")}
    _, future = client.run("vault", "testing.leak", params, on_progress=lambda update: progress.append(update.message))
    reply = future.result(timeout=60)
    assert progress and all(len(text) <= 512 and _no_piece_of_the_token(text) for text in progress)

    _, future = client.run("vault", "testing.leak", {"variable": TOKEN_VAR, "mode": "progress", "pad": 8192 - cut - 16})
    reply = future.result(timeout=60)
    assert reply.logs and all(_no_piece_of_the_token(line.message) for line in reply.logs)
    assert serves(client, "vault")


# ------------------------------------------- silent connections, no descriptors


def test_silent_connections_cannot_exhaust_a_site_and_honest_clients_still_get_in(fed, client):
    assert serves(client, "gate")
    site = psutil.Process(fed.site_pids("gate")[0])
    host, port = fed.spec.sites["gate"].rsplit(":", 1)
    # Fewer descriptors than the gate would hold: accept() runs out (EMFILE) during the attack.
    site.rlimit(psutil.RLIMIT_NOFILE, (site.num_fds() + 40, site.rlimit(psutil.RLIMIT_NOFILE)[1]))
    silent: list[socket.socket] = []
    try:
        for _ in range(2000):
            silent.append(socket.create_connection((host, int(port)), timeout=10))
        assert site.is_running() and serves(client, "gate")
        # The last silent connection is shut down by the site at its handshake deadline (2 s).
        last = silent[-1]
        last.settimeout(15)
        started = time.monotonic()
        while last.recv(4096):  # the challenge, then end-of-file
            pass
        assert time.monotonic() - started < 10
    finally:
        site.rlimit(psutil.RLIMIT_NOFILE, (4096, site.rlimit(psutil.RLIMIT_NOFILE)[1]))
        for sock in silent:
            sock.close()
    assert site.is_running() and serves(client, "gate")


def test_a_site_with_no_descriptor_left_keeps_running_until_one_is_free(fed, client):
    site = psutil.Process(fed.site_pids("gate")[0])
    hard = site.rlimit(psutil.RLIMIT_NOFILE)[1]
    host, port = fed.spec.sites["gate"].rsplit(":", 1)
    site.rlimit(psutil.RLIMIT_NOFILE, (site.num_fds(), hard))  # not one more descriptor
    try:
        waiting = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]  # sit in the backlog
    finally:
        site.rlimit(psutil.RLIMIT_NOFILE, (4096, hard))
    for sock in waiting:
        sock.close()
    assert site.is_running() and serves(client, "gate")


# ------------------------------------------------ a client that never reads


def _settled_rss(site: psutil.Process, client: FederationClient, name: str) -> tuple[int, int]:
    """Peak RSS while the site works through what it accepted, and its bytes_out once they stop growing."""
    peak, last, steady = 0, -1, 0
    for _ in range(120):  # sampling a measurement, bounded: at most 60 s
        peak = max(peak, site.memory_info().rss)
        sent = client.stats(name).bytes_out
        steady = steady + 1 if sent == last else 0
        if steady >= 4:
            return peak, sent
        last = sent
        time.sleep(0.5)
    raise AssertionError(f"site {name} kept sending for 60 s to a client that reads nothing")


def test_a_client_that_stops_reading_cannot_grow_the_site(fed, client):
    blob = {"size": 700 << 10}  # a small request, a 0.9 MiB reply
    ref = client.call("burst", "testing.blob", blob, timeout=60)
    site = psutil.Process(fed.site_pids("burst")[0])
    assert serves(client, "burst")
    before = site.memory_info().rss
    attacker = RawSiteConnection(fed, "burst")
    fetches = Envelope(messages=[FetchRequest(id=f"f{i}", ref=ref) for i in range(200)]).model_dump_json().encode()
    runs = Envelope(messages=[RunRequest(id=f"r{i}", op="testing.blob", params=blob) for i in range(300)])

    def attack() -> None:
        try:
            attacker.send(runs.model_dump_json().encode())
            for _ in range(5):  # with the 300 runs, ~1.2 GiB of replies if nothing held the site back
                attacker.send(fetches)
        except OSError:
            pass  # the site dropped the connection

    sender = threading.Thread(target=attack, daemon=True)
    sender.start()
    peak, sent = _settled_rss(site, client, "burst")
    growth = peak - before
    print(f"burst site: RSS {before / MiB:.0f} MiB before, peak growth {growth / MiB:.1f} MiB, {sent / MiB:.0f} MiB sent")
    assert growth < 96 * MiB, f"the site grew by {growth / MiB:.0f} MiB for a client that reads nothing"
    log = fed.workdir / "logs" / "burst.log"
    assert "giving up on the client" in log.read_text()
    attacker.close()
    sender.join(timeout=30)
    assert serves(client, "burst")


def test_a_reply_buffer_that_cannot_send_stays_bounded_and_gives_up():
    # The FLARE site side: its sends are refused while the server's mailbox is full.
    given_up: list[str] = []
    blocked = threading.Event()
    buffer = ReplyBuffer(lambda batch: blocked.wait(), name="t", on_overflow=given_up.append, max_bytes=2 * MiB)
    chunk = FetchChunk(id="f", offset=0, data="A" * MiB, total=MiB, eof=True)
    for i in range(200):
        buffer.put(chunk.model_copy(update={"id": f"f{i}"}))
        buffer.put(ProgressUpdate(id=f"p{i}", fraction=0.5, message="half"))
    assert buffer.held <= 4 * MiB and buffer.lightened > 0
    blocked.set()
    buffer.close()


# --------------------------------------------------- user code outlives nothing


def _python(client: FederationClient, source: str, fifo: Path, **params: object) -> object:
    return client.call("lab", "code.python", {"source": source, "inputs": str(fifo), **params}, timeout=90)


ESCAPE = """\
import subprocess, sys, time
escapee = "import os, sys, time\\nif os.fork(): os._exit(0)\\nos.setsid()\\nopen(sys.argv[1], 'w').write(str(os.getpid()))\\nprint('ready', flush=True)\\ntime.sleep(600)"
subprocess.Popen([sys.executable, "-c", escapee, inputs], start_new_session=True, stdout=subprocess.PIPE).stdout.readline()
"""


def _escapee(fifo: Path) -> psutil.Process:
    """The pid the escaping grandchild writes into the FIFO (opening it for reading waits for the writer)."""
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(int(fifo.read_text())), daemon=True)
    reader.start()
    reader.join(60)
    assert got, "the user code never started its grandchild"
    return psutil.Process(got[0])


@pytest.mark.parametrize("ending", ["timeout", "exit", "site killed"])
def test_a_setsid_grandchild_of_user_code_dies_with_its_run(fed, client, tmp_path, ending):
    fifo = tmp_path / "escapee"
    os.mkfifo(fifo)
    source = ESCAPE + ("time.sleep(600)\n" if ending != "exit" else "result = 'done'\n")
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(_python(client, source, fifo, timeout_s=3 if ending == "timeout" else 60))
        except Exception as exc:
            outcome.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    escapee = _escapee(fifo)
    if ending == "site killed":
        fed.stop_site("lab", kill=True)
    runner.join(90)
    gone, alive = psutil.wait_procs([escapee], timeout=15)
    assert not alive, f"process {escapee.pid}, started by user code with setsid(), outlived its run"
    if ending == "timeout":
        assert isinstance(outcome[0], OperationFailedError) and "ran past its 3 s limit" in str(outcome[0])
    if ending == "site killed":
        fed.start_site("lab")
    assert serves(client, "lab")


# ------------------------------------------- private results, timeout_s enforced


def test_stored_results_are_private_to_the_site_user(client):
    ref = client.call("vault", "core.echo", {"value": [1, 2, 3]}, timeout=60)
    path = Path(ref.uri.removeprefix("file://"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_request_timeout_is_enforced_at_the_site(client):
    started = time.monotonic()
    _, future = client.run("vault", "core.sleep", {"seconds": 10}, timeout_s=1)
    reply = future.result(timeout=30)
    with pytest.raises(RequestTimeoutError, match=r"ran past its timeout_s of 1 s and was stopped at the site") as info:
        unwrap(reply)
    assert isinstance(info.value, TimeoutError) and time.monotonic() - started < 5
    for _ in range(40):  # the site frees the slot once the operation has stopped
        if client.stats("vault").load.running == 0:
            break
        time.sleep(0.25)
    assert client.stats("vault").load.running == 0 and serves(client, "vault")

