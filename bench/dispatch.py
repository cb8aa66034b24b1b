"""Dispatch overhead: 200 no-op tasks through `.map`, timed inside one flow run per runner.

Measured inside the flow (not whole flow runs, which cost ~1 s each in Prefect's
heartbeat join), one warm-up round first, then the median of the timed rounds.
`FederationTaskRunner` runs over both transports: local site processes, and the
same sites behind a FLARE POC (one long-lived mesh job, admin app commands).
"""

from __future__ import annotations

import time
from typing import Any

from bench.env import BenchEnv
from bench.harness import Row, median, with_ratios

TASKS = 200


def _map_rounds(runner: Any, task: Any, rounds: int) -> list[float]:
    from prefect import flow

    @flow(name="bench-dispatch", task_runner=runner)
    def rounds_of_map() -> list[float]:
        times = []
        for i in range(rounds + 1):
            start = time.perf_counter()
            futures = task.map(value=list(range(TASKS)))
            futures.wait()
            elapsed = time.perf_counter() - start
            failed = [f for f in futures if not f.state.is_completed()]
            if failed:
                raise RuntimeError(f"{len(failed)} of {TASKS} tasks did not complete: {failed[0].state}")
            if i:  # the first round warms connections, threads and workers
                times.append(elapsed)
        return times

    state = rounds_of_map(return_state=True)
    times: list[float] = state.result()
    # The next runner starts once the Prefect API has recorded this one's task runs: a backlog of
    # task-run events would slow (or, with SQLite on two cores, refuse) the next flow run.
    from prefect.settings import PREFECT_API_URL

    from bench.load import _wait_recorded

    _wait_recorded(str(PREFECT_API_URL.value()), str(state.state_details.flow_run_id), TASKS * (rounds + 1))
    return times


def run(
    env: BenchEnv, *, rounds: int = 5, include_dask: bool = True, include_flare: bool = True, extra: dict[str, Any] | None = None
) -> list[Row]:
    """Per-task overhead of each runner on the same 200 no-op tasks."""
    from prefect import task
    from prefect.task_runners import ThreadPoolTaskRunner

    from adapters.core import echo
    from dfm_prefect.task_runner import FederationTaskRunner

    @task
    def noop(value: int) -> int:
        return value

    federation = env.local_federation()
    variants: dict[str, tuple[Any, Any, int]] = {
        "ThreadPoolTaskRunner": (ThreadPoolTaskRunner(), noop, rounds),
        "FederationTaskRunner (local)": (FederationTaskRunner(federation.federation_file), echo, rounds),
    }
    if include_flare:
        flare = env.flare_federation()
        variants["FederationTaskRunner (FLARE)"] = (FederationTaskRunner(flare.federation_file), echo, rounds)
    for name, runner in (extra or {}).items():
        variants[name] = (runner, echo, rounds)
    if include_dask:
        from prefect_dask import DaskTaskRunner

        variants["DaskTaskRunner (LocalCluster)"] = (DaskTaskRunner(), noop, max(2, rounds // 2))

    rows = []
    for name, (runner, task_obj, n) in variants.items():
        before = _flare_messages(flare) if name == "FederationTaskRunner (FLARE)" else None
        times = _map_rounds(runner, task_obj, n)
        rows.append(Row("dispatch", name, "per-task overhead", median(times) / TASKS * 1e3, "ms", len(times)))
        rows.append(Row("dispatch", name, f"{TASKS} tasks via .map", median(times), "s", len(times)))
        if before is not None:
            sent = _flare_messages(flare) - before
            note = "client exchanges, controller dispatches to sites and sites' reply chunks, per request"
            rows.append(Row("dispatch", name, "FLARE messages per request", sent / (TASKS * (n + 1)), "", n + 1, note=note))
    return with_ratios(rows, "ThreadPoolTaskRunner")


def _flare_messages(federation: Any) -> int:
    """The FLARE messages the mesh job has carried so far (not counting heartbeats and status calls)."""
    counters = federation.mesh_status().counters
    return sum(int(counters.get(key, 0)) for key in ("exchanges", "dispatches", "reply_chunks"))
