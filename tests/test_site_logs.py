"""A site's log lines for a run reach the task run's logs in the Prefect API, only when its policy shares them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from prefect import flow

from dfm_prefect.transports.local.launcher import LocalFederation
from tests.conftest import site_config
from tests.site_ops import flaky
from tests.support_sites import private_federation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_policies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("site-logs")
    configs = {
        name: site_config(name, root / "store" / name, [], operations=["core.echo", "testing.flaky"], export={"share_logs": share})
        for name, share in (("open", True), ("closed", False))
    }
    with private_federation(root, configs) as fed:
        yield fed


def read_logs(task_run_id: uuid.UUID, want: int, timeout: float = 30.0) -> list[str]:
    """The messages the Prefect API holds for a task run, once at least ``want`` arrived (or the timeout passed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as api:
            messages = [log.message for log in api.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))]
        if len(messages) >= want or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)  # logs are written by the API's own workers; it offers no notification


def test_site_log_lines_reach_the_task_runs_logs_only_where_the_policy_shares_them(two_policies: LocalFederation, prefect_api: str):
    from dfm_prefect import FederationTaskRunner

    key = uuid.uuid4().hex[:12]

    @flow(task_runner=FederationTaskRunner(two_policies.federation_file))
    def both() -> dict[str, uuid.UUID]:
        futures = {site: flaky.submit(key=f"{key}-{site}", failures=0, site=site) for site in ("open", "closed")}
        for future in futures.values():
            future.result()
        return {site: future.task_run_id for site, future in futures.items()}

    ids = both()
    shared = read_logs(ids["open"], want=2)
    assert f"[site open] flaky attempt 1 for {key}-open" in shared, shared
    assert any(line.startswith("[site open] testing.flaky ran at site open in ") for line in shared), shared
    kept = read_logs(ids["closed"], want=1, timeout=5)
    assert not [line for line in kept if "[site closed]" in line or "flaky attempt" in line], kept
