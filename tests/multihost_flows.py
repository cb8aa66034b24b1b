"""Flows that ``test_multihost.py`` runs on the ``client`` host (``python -m tests.multihost_flows NAME``).

Each prints one JSON line (``RESULT {...}``) that the test reads; progress lines
before it tell the test when to act (for example when to cut a link).
The federation comes from ``DFM_FEDERATION``, the Prefect API from ``PREFECT_API_URL``.
"""

from __future__ import annotations

import json
import sys
import time

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.context import get_run_context

from adapters.core import sleep
from dfm_prefect import FederationTaskRunner


@flow(name="through-a-cut-link", task_runner=FederationTaskRunner())
def through_a_cut_link(seconds: float) -> dict[str, object]:
    """One long task at north, with retries: the test cuts north's link while it runs, then restores it."""
    flow_run_id = str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    task = sleep.with_options(retries=10, retry_delay_seconds=5)  # a FLARE client reconnects within ~10 s of the link
    future = task.submit(seconds=seconds, site="north")
    print("SUBMITTED", flush=True)
    value = future.result().fetch()
    return {"value": value, "flow_run_id": flow_run_id}


def _failures(flow_run_id: str, timeout: float = 20.0) -> list[str]:
    """The task runs' failure messages that the flow run's logs hold (logs reach the API shortly after)."""
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as api:
            logs = api.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        failures = [log.message for log in logs if "Task run failed with exception" in log.message]
        if failures or time.monotonic() > deadline:
            return failures
        time.sleep(0.5)


def main(argv: list[str]) -> None:
    name = argv[0]
    if name == "cut-link":
        started = time.monotonic()
        out = through_a_cut_link(float(argv[1]))
        out["failures"] = _failures(str(out["flow_run_id"]))
        out["seconds"] = time.monotonic() - started
    else:
        raise SystemExit(f"unknown flow {name!r}")
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
