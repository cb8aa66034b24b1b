"""Running code sent by clients: refused unless a site opts in, and then only in a limited child process."""

from __future__ import annotations

import re
from collections.abc import Iterator

import psutil
import pytest
from prefect import flow

from dfm_prefect.client import FederationClient, get_client
from dfm_prefect.core.errors import ConfigError, OperationFailedError
from dfm_prefect.transports.local.launcher import LocalFederation
from site_workers.config import parse_site_config
from site_workers.user_code import run_python
from tests.conftest import ROOT
from tests.support_sites import private_federation

pytestmark = pytest.mark.slow

TOKEN = "lab-Tk-0a1b2c3d4e5f"
TOKEN_VAR = "DFM_TEST_LAB_TOKEN"
FORBIDDEN = re.compile(r"pickle\.loads|cloudpickle\.loads|\beval\(|\bexec\(")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("lab")
    config = {
        "name": "lab",
        "operations": ["core.echo", "code.python"],
        "data_roots": [{"url": f"file://{root}", "storage_options": {"token": f"${{env:{TOKEN_VAR}}}"}}],
        "result_store": {"url": f"file://{root / 'store'}"},
        "export": {"kinds": ["value"], "max_bytes": 1 << 20, "inline_bytes": 64 << 10},
        "user_code": {"enabled": True, "timeout_s": 20, "cpu_s": 10, "memory_bytes": 512 << 20, "max_output_bytes": 65536},
    }
    with private_federation(root / "federation", {"lab": config}, env={TOKEN_VAR: TOKEN}) as fed:
        yield fed


@pytest.fixture(scope="module")
def lab_client(lab: LocalFederation) -> FederationClient:
    return get_client(lab.federation_file)


def python(client: FederationClient, source: str, **params: object) -> object:
    return client.call("lab", "code.python", {"source": source, **params}, timeout=60).fetch(client=client)


def test_a_site_that_lists_user_code_without_opting_in_does_not_start():
    with pytest.raises(ConfigError, match="runs code sent by clients; opt in with user_code"):
        parse_site_config({"name": "s", "operations": ["code.python"], "result_store": {"url": "file:///tmp/dfm-uc"}})


def test_an_opted_in_site_runs_the_code_in_another_process_without_its_credentials(lab, lab_client):
    assert python(lab_client, "result = sum(inputs)", inputs=[1, 2, 3]) == 6
    source = "import os\nresult = {'pid': os.getpid(), 'env': sorted(os.environ), 'token': os.environ.get(inputs)}"
    seen = python(lab_client, source, inputs=TOKEN_VAR)
    assert seen["pid"] != lab.site_pids("lab")[0]
    assert seen["token"] is None and not any(name.startswith(("DFM_", "AWS_")) for name in seen["env"])


@pytest.mark.parametrize(
    "source, params, why",
    [
        ("while True:\n    pass", {"timeout_s": 1}, "ran past its 1 s limit"),
        ("import time\nwhile True:\n    time.sleep(1)", {"timeout_s": 1}, "ran past its 1 s limit"),
        ("block = bytearray(1 << 30)", {}, "MemoryError"),
        ("print('x' * 100000)", {}, "printed more than 65536 bytes"),
        ("raise SystemExit(3)", {}, "exit status 3"),
        ("result = object()", {}, "not JSON serializable"),
    ],
)
def test_user_code_is_held_to_its_limits_and_the_site_keeps_serving(lab_client, source, params, why):
    with pytest.raises(OperationFailedError, match=why):
        python(lab_client, source, **params)
    assert lab_client.call("lab", "core.echo", {"value": 1}).fetch(client=lab_client) == 1


def test_processes_started_by_user_code_end_with_it(lab_client):
    source = "import os, time\npid = os.fork()\nif pid == 0:\n    time.sleep(600)\nresult = pid"
    pid = python(lab_client, source)
    try:
        psutil.Process(pid).wait(timeout=10)  # raises TimeoutExpired if it still sleeps
    except psutil.NoSuchProcess:
        pass  # killed with its process group and already reaped
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_what_user_code_prints_or_raises_is_redacted(lab_client):
    source = f"import sys\nprint('token', {TOKEN!r})\nraise RuntimeError({TOKEN!r})"
    with pytest.raises(OperationFailedError) as info:
        python(lab_client, source)
    assert TOKEN not in str(info.value) and "[redacted]" in str(info.value)


def test_user_code_runs_from_a_flow(lab, prefect_api):
    from dfm_prefect.task_runner import FederationTaskRunner

    @flow(task_runner=FederationTaskRunner(lab.federation_file))
    def squares() -> list[int]:
        refs = [run_python.submit(source="result = inputs * inputs", inputs=n) for n in range(3)]
        return [ref.result().fetch() for ref in refs]

    assert squares() == [0, 1, 4]


def test_site_code_never_unpickles_or_evaluates():
    """The repository hook, as a test: no pickle.loads, eval( or exec( in the site runtime or the adapters."""
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("site_workers", "adapters")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert offenders == []
