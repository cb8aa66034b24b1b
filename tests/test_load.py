"""Load: thousands of operations in one flow, every result accounted for, memory and queues bounded.

The flow maps 2,000 ``core.echo`` calls over two sites at once, far faster
than they can run: the runner holds at most ``max_workers`` requests in flight,
each site at most ``concurrency + queue``, and the rest waits in the flow's own
submission queue. A sampler records, while it runs, the peak resident memory of
the client process, of each site and of the Prefect API server, the most
requests any site held and the most the client had in flight. It runs on each
transport; over FLARE a site is its FLARE client with its job process, the
FLARE server (with the mesh job's controller) is measured too, and so are the
reply bytes the controller buffers for clients.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from prefect import flow

from adapters.core import echo
from bench.harness import PeakSampler, count_task_runs
from dfm_prefect.client import FederationClient, get_client
from dfm_prefect.core.wire import CancelRequest, Envelope, ErrorReply, RunRequest, RunResult
from dfm_prefect.task_runner import FederationTaskRunner
from dfm_prefect.transports.local.launcher import LocalFederation
from site_workers.config import parse_site_config
from site_workers.worker import SiteWorker
from tests.conftest import TRANSPORTS, site_config
from tests.support_sites import Answers, FlareSites, private_federation, private_flare_federation

OPERATIONS = 2000
MAX_WORKERS = 24
SITE_LIMITS = {"concurrency": 2, "queue": 30}
MiB = 1 << 20
# Generous ceilings on a 2-core CI machine; the measured peaks are reported with each run.
CLIENT_RSS_LIMIT = 1536 * MiB
CLIENT_GROWTH_LIMIT = 512 * MiB
SITE_RSS_LIMIT = 768 * MiB
SERVER_RSS_LIMIT = 1536 * MiB
FLARE_SERVER_RSS_LIMIT = 1536 * MiB
FLARE_SITE_RSS_LIMIT = 1536 * MiB  # a FLARE client (~90 MiB) plus the site's job process


@pytest.fixture(scope="module", params=TRANSPORTS)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation | FlareSites]:
    root = tmp_path_factory.mktemp(f"load-{request.param}")
    configs = {
        name: site_config(name, root / "store" / name, [], operations=["core.echo", "core.sleep"], limits=SITE_LIMITS)
        for name in ("east", "west")
    }
    start = private_federation if request.param == "local" else private_flare_federation
    with start(root, configs) as fed:
        yield fed


def _rss(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss)


def _tree_rss(pid: int) -> float:
    """Resident memory of a process and its children (a FLARE participant and its job processes)."""
    root = psutil.Process(pid)
    return float(sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))


def _transport_probes(pair: LocalFederation | FlareSites, client: FederationClient) -> dict[str, Any]:
    """What to sample besides the client and the Prefect API: each site, and over FLARE the server."""
    if not isinstance(pair, FlareSites):
        return {
            **{f"{site}_rss": (lambda pid=pids[0]: _rss(pid)) for site, pids in pair.pids().items()},
            **{f"{site}_held": (lambda site=site: _held(client, site)) for site in pair.sites},
        }
    fed = pair.fed
    status: dict[str, Any] = {}

    def mesh(key: str) -> float:
        # One dfm.status per sample serves every key below (sites report their load with each heartbeat).
        if key == "buffered" or "reply" not in status:
            status["reply"] = fed.mesh_status()
        reply = status["reply"]
        if key == "buffered":
            return float(reply.buffered_bytes)
        load = reply.sites[key].load
        return float(load.running + load.queued)

    return {
        "controller_buffered_bytes": lambda: mesh("buffered"),
        **{f"{site}_held": (lambda site=site: mesh(site)) for site in pair.sites},
        "flare_server_rss": lambda: _tree_rss(fed.server_pids()[0]),
        **{f"{site}_rss": (lambda site=site: _tree_rss(fed.site_pids(site)[0])) for site in pair.sites},
    }


def _prefect_server_rss() -> float:
    """Resident memory of the `prefect server start` this session runs (with its children)."""
    for child in psutil.Process().children(recursive=True):
        try:
            if "server" in child.cmdline() and any("prefect" in part for part in child.cmdline()):
                family = [child, *child.children(recursive=True)]
                return float(sum(p.memory_info().rss for p in family))
        except psutil.NoSuchProcess:
            continue
    return 0.0


def _held(client: FederationClient, site: str) -> float:
    load = client.stats(site, timeout=10).load
    return float(load.running + load.queued)


@pytest.mark.slow
def test_two_thousand_operations_over_two_sites_all_accounted_for_with_bounded_memory(pair, prefect_api, record_property):
    client = get_client(pair.federation_file)
    before = {site: client.stats(site) for site in pair.sites}
    runner = FederationTaskRunner(pair.federation_file, max_workers=MAX_WORKERS)

    @flow(task_runner=runner)
    def many() -> list[Any]:
        return [future.result() for future in echo.map(value=list(range(OPERATIONS)))]

    flare = isinstance(pair, FlareSites)
    probes = {
        "client_rss": lambda: _rss(os.getpid()),
        "server_rss": _prefect_server_rss,
        "client_inflight": lambda: float(sum(client.inflight().values())),
        **_transport_probes(pair, client),
    }
    client_rss_before = _rss(os.getpid())  # the test process also holds what earlier tests loaded
    started = time.monotonic()
    # Sampling goes on until the API has recorded every run: the server's backlog counts too.
    with PeakSampler(probes, interval=0.25 if flare else 0.1) as sampler:
        state = many(return_state=True)
        elapsed = time.monotonic() - started
        flow_run_id = str(state.state_details.flow_run_id)
        while count_task_runs(prefect_api, flow_run_id, ["COMPLETED"]) < OPERATIONS:
            assert time.monotonic() - started < 240, "the API did not record every task run as Completed"
            time.sleep(0.5)  # task-run states reach the API as events; it offers no notification
        api_lag = time.monotonic() - started - elapsed
    assert count_task_runs(prefect_api, flow_run_id) == OPERATIONS, "task runs that never ended"
    refs = state.result()

    # Every operation came back, with its own value, from one of the two sites.
    assert [ref.fetch(client=client) for ref in refs] == list(range(OPERATIONS))
    by_site = {site: sum(ref.site == site for ref in refs) for site in pair.sites}
    assert sum(by_site.values()) == OPERATIONS and all(by_site.values()), by_site
    after = {site: client.stats(site) for site in pair.sites}
    assert sum(after[s].completed - before[s].completed for s in pair.sites) == OPERATIONS
    assert all(after[s].rejected == before[s].rejected and after[s].failed == before[s].failed for s in pair.sites)

    peaks = sampler.peaks
    report = {
        "operations": OPERATIONS,
        "seconds": round(elapsed, 1),
        "ops_per_second": round(OPERATIONS / elapsed, 1),
        "by_site": by_site,
        "samples": sampler.samples,
        "api_lag_seconds": round(api_lag, 1),
        **{name: (round(value / MiB, 1) if name.endswith(("_rss", "_bytes")) else value) for name, value in peaks.items()},
        "client_rss_growth": round((peaks["client_rss"] - client_rss_before) / MiB, 1),
        "transport": "flare" if flare else "local",
    }
    record_property("load", report)
    print("load report (RSS in MiB):", json.dumps(report))
    assert sampler.samples >= 10 and not sampler.errors, sampler.errors

    # Back-pressure: bounded everywhere, nothing queued without limit.
    bound = SITE_LIMITS["concurrency"] + SITE_LIMITS["queue"]
    assert all(0 < peaks[f"{site}_held"] <= bound for site in pair.sites), peaks
    assert 0 < peaks["client_inflight"] <= MAX_WORKERS, peaks
    assert peaks["client_rss"] < CLIENT_RSS_LIMIT, report
    assert peaks["client_rss"] - client_rss_before < CLIENT_GROWTH_LIMIT, report
    assert all(peaks[f"{site}_rss"] < (FLARE_SITE_RSS_LIMIT if flare else SITE_RSS_LIMIT) for site in pair.sites), report
    assert peaks["server_rss"] < SERVER_RSS_LIMIT, report
    if flare:
        assert peaks["flare_server_rss"] < FLARE_SERVER_RSS_LIMIT, report
        assert peaks["controller_buffered_bytes"] < 64 * MiB, report  # replies wait for their client only briefly


def test_a_site_holds_at_most_concurrency_plus_queue_and_refuses_the_rest(tmp_path):
    config = parse_site_config(
        {"name": "tight", "operations": ["core.sleep"], "result_store": {"url": f"file://{tmp_path}"}, "limits": {"concurrency": 2, "queue": 3}}
    )
    worker = SiteWorker(config)
    try:
        answers = Answers()
        burst = [RunRequest(id=f"s-{n}", op="core.sleep", params={"seconds": 60}) for n in range(10)]
        worker.handle_frame(Envelope(messages=burst).model_dump_json(), answers)
        refused = answers.wait(5)
        assert all(isinstance(m, RunResult) and m.error and m.error.code == "site_overloaded" for m in refused)
        assert "concurrency 2 + queue 3" in refused[0].error.message
        assert worker.load().running + worker.load().queued == 5
        cancels = [CancelRequest(id=f"c-{n}", target=f"s-{n}") for n in range(10)]
        worker.handle_frame(Envelope(messages=cancels).model_dump_json(), answers)
        cancelled = answers.wait(10)[5:]
        assert sorted(m.id for m in cancelled) == [f"s-{n}" for n in range(5)]
        assert all(m.error.code == "cancelled" for m in cancelled if not isinstance(m, ErrorReply))
    finally:
        worker.close()
