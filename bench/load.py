"""Throughput and memory under load: 2,000 operations mapped over two sites in one flow run.

Each round is one flow run that maps ``core.echo`` over 2,000 values on
`FederationTaskRunner` (local transport, and the same sites behind FLARE), and
the same 2,000 no-op tasks on `ThreadPoolTaskRunner` as the baseline, both with
the same number of task runs in flight. Timed: the whole flow run, and how long
after it the Prefect API had recorded every task run as Completed (task-run
states reach it as events). A background thread samples the resident memory of
the client process, of the Prefect API server, of each site and, over FLARE, of
the FLARE server; each figure is a peak.

Every round checks that it lost nothing: each result has its own value, the
operations were spread over both sites, the sites' counters grew by 2,000
completed with none failed or refused, and the API holds exactly 2,000 task
runs, all Completed. Otherwise it raises :class:`LostResultsError`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psutil

from bench.env import SITES, BenchEnv
from bench.harness import PeakSampler, Row, count_task_runs, median, with_ratios
from dfm_prefect.transports.flare.deploy.launcher import FlareFederation
from dfm_prefect.transports.local.launcher import LocalFederation

OPERATIONS = 2000
WARMUP = 200
"""Operations in the untimed flow run that warms each runner (threads, connections, site imports)."""
MAX_ROUNDS = 1
"""Rounds per runner whatever ``--rounds`` says: with the wait for the API, a round takes about a minute."""
SAMPLE_S = 0.2
API_POLL_S = 0.25
API_TIMEOUT_S = 240.0
MiB = 1 << 20
BASELINE = "ThreadPoolTaskRunner"


class LostResultsError(RuntimeError):
    """A load round in which some operation's result is missing, wrong or not recorded."""


@dataclass
class _Variant:
    name: str
    runner: Any
    task: Any
    federation: LocalFederation | FlareFederation | None = None


@dataclass
class _Round:
    seconds: float
    api_lag: float
    client_growth: float
    peaks: dict[str, float]
    by_site: dict[str, int]


def family(*pids: int) -> dict[int, psutil.Process]:
    """Processes and all their descendants, each once."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        root = psutil.Process(pid)
        found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
    return found


def cpu_of(processes: Iterable[psutil.Process]) -> float:
    """User and system CPU seconds these processes have used so far (one that ended counts nothing)."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _tree_rss(*pids: int) -> float:
    """Resident memory of processes and all their descendants, each counted once."""
    if not pids:
        raise ProcessLookupError("no live process to measure")
    total = 0
    for process in family(*pids).values():
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:  # a child that exited after the listing holds no memory
            continue
    return float(total)


def _prefect_server_pid() -> int:
    """The `prefect server start` this process runs (see `LocalPrefectServer`)."""
    for child in psutil.Process().children():
        try:
            command = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if any(command[i : i + 3] == ["prefect", "server", "start"] for i in range(len(command))):
            return child.pid
    raise LostResultsError("no `prefect server start` child process to measure; is the benchmark's Prefect API running?")


def _site_probes(federation: LocalFederation | FlareFederation | None) -> dict[str, Callable[[], float]]:
    """Each site's resident memory; over FLARE a site is its FLARE client with its job process."""
    if federation is None:
        return {}
    if isinstance(federation, FlareFederation):
        return {
            **{f"site {site}": (lambda site=site: _tree_rss(*federation.site_pids(site))) for site in SITES},
            "FLARE server": lambda: _tree_rss(*federation.server_pids()),
        }
    pids = federation.pids()
    return {f"site {site}": (lambda pid=pids[site][0]: _tree_rss(pid)) for site in SITES}


def _wait_recorded(api: str, flow_run_id: str, operations: int) -> None:
    """Until the API has recorded every task run of the flow run as Completed."""
    deadline = time.perf_counter() + API_TIMEOUT_S
    while count_task_runs(api, flow_run_id, ["COMPLETED"]) < operations:
        if time.perf_counter() > deadline:
            raise LostResultsError(f"the Prefect API did not record {operations} completed task runs within {API_TIMEOUT_S:.0f} s")
        time.sleep(API_POLL_S)  # the API offers no notification to wait on
    recorded = count_task_runs(api, flow_run_id)
    if recorded != operations:
        raise LostResultsError(f"the Prefect API recorded {recorded} task runs for {operations} operations")


def _flow(variant: _Variant) -> Any:
    from prefect import flow

    @flow(name="bench-load", task_runner=variant.runner)
    def many(operations: int) -> list[Any]:
        return [future.result() for future in variant.task.map(value=list(range(operations)))]

    return many


def _round(variant: _Variant, operations: int, *, measure: bool) -> _Round:
    """One flow run of ``operations`` tasks, checked; sampled and timed when ``measure``."""
    from prefect.settings import PREFECT_API_URL

    from dfm_prefect.client import get_client

    api = str(PREFECT_API_URL.value())
    client = get_client(variant.federation.federation_file) if variant.federation else None
    before = {site: client.stats(site) for site in SITES} if client else {}
    probes: dict[str, Callable[[], float]] = {
        "client": lambda: float(psutil.Process(os.getpid()).memory_info().rss),
        "Prefect API server": lambda pid=_prefect_server_pid(): _tree_rss(pid),
        **_site_probes(variant.federation),
    }
    client_before = probes["client"]()
    many = _flow(variant)
    with PeakSampler(probes if measure else {}, interval=SAMPLE_S) as sampler:
        # The sampler runs on until the API has caught up: its backlog is part of the load.
        start = time.perf_counter()
        state = many(operations, return_state=True)
        seconds = time.perf_counter() - start
        if not state.is_completed():
            raise LostResultsError(f"the flow run ended {state.type.value}: {state.message}")
        _wait_recorded(api, str(state.state_details.flow_run_id), operations)
        api_lag = time.perf_counter() - start - seconds

    results = state.result()
    values = [ref.fetch(client=client) for ref in results] if client else list(results)
    if values != list(range(operations)):
        wrong = sum(v != i for i, v in enumerate(values)) + abs(len(values) - operations)
        raise LostResultsError(f"{variant.name}: {wrong} of {operations} results missing or not their own value")
    by_site = {site: sum(getattr(ref, "site", None) == site for ref in results) for site in SITES} if client else {}
    if client:
        after = {site: client.stats(site) for site in SITES}
        completed = sum(after[s].completed - before[s].completed for s in SITES)
        refused = sum(after[s].failed - before[s].failed + after[s].rejected - before[s].rejected for s in SITES)
        if completed != operations or refused or not all(by_site.values()):
            raise LostResultsError(
                f"{variant.name}: sites completed {completed} of {operations}, {refused} failed or refused, results by site {by_site}"
            )
    return _Round(seconds, api_lag, (sampler.peaks.get("client", 0.0) - client_before) / MiB, sampler.peaks, by_site)


def _rows(variant: _Variant, rounds: list[_Round]) -> list[Row]:
    name, n = variant.name, len(rounds)
    seconds = median([r.seconds for r in rounds])
    spread = ", ".join(f"{site} {median([float(r.by_site[site]) for r in rounds]):.0f}" for site in rounds[0].by_site)
    rows = [
        Row("load", name, f"{OPERATIONS:,} tasks, flow wall time", seconds, "s", n, note=spread),
        Row("load", name, "tasks per second", median([OPERATIONS / r.seconds for r in rounds]), "/s", n),
        Row("load", name, "API recorded all Completed, after flow end", median([r.api_lag for r in rounds]), "s", n),
        Row("load", name, "peak RSS, client process", median([r.peaks["client"] for r in rounds]) / MiB, "MiB", n,
            note=f"+{median([r.client_growth for r in rounds]):.0f} MiB during the run"),
        Row("load", name, "peak RSS, Prefect API server", median([r.peaks["Prefect API server"] for r in rounds]) / MiB, "MiB", n),
    ]
    site_note = "FLARE client + job process" if isinstance(variant.federation, FlareFederation) else "site process"
    for probe in rounds[0].peaks:
        if probe.startswith("site ") or probe == "FLARE server":
            note = site_note if probe.startswith("site ") else "with the mesh job's controller"
            rows.append(Row("load", name, f"peak RSS, {probe}", median([r.peaks[probe] for r in rounds]) / MiB, "MiB", n, note=note))
    return rows


def run(env: BenchEnv, *, rounds: int = 5) -> list[Row]:
    """Throughput and peak memory of 2,000 tasks in one flow run, per runner and transport."""
    from prefect import task
    from prefect.task_runners import ThreadPoolTaskRunner

    from adapters.core import echo
    from dfm_prefect.task_runner import DEFAULT_MAX_WORKERS, FederationTaskRunner

    @task
    def noop(value: int) -> int:
        return value

    local, flare = env.local_federation(), env.flare_federation()
    variants = [
        # Prefect's default pool would start a thread per pending task; cap it at the federation runner's in-flight limit.
        _Variant(BASELINE, ThreadPoolTaskRunner(max_workers=DEFAULT_MAX_WORKERS), noop),
        _Variant("FederationTaskRunner (local)", FederationTaskRunner(local.federation_file), echo, local),
        _Variant("FederationTaskRunner (FLARE)", FederationTaskRunner(flare.federation_file), echo, flare),
    ]
    for variant in variants:
        _round(variant, WARMUP, measure=False)
    measured: dict[str, list[_Round]] = {v.name: [] for v in variants}
    for _ in range(max(1, min(rounds, MAX_ROUNDS))):
        for variant in variants:  # alternate, so a busy moment on the machine does not land on one runner
            measured[variant.name].append(_round(variant, OPERATIONS, measure=True))
    return with_ratios([row for variant in variants for row in _rows(variant, measured[variant.name])], BASELINE)
