"""Latency per transport: first result on a warm mesh, client connect, and bringing a federation up.

* first result, warm mesh: the federation is up and the client connected; after
  a pause (so the transport is idle, as between a flow's steps) one ``core.echo``
  goes to a site and its result comes back. Measured with the client directly
  and as one task run inside a running flow (Prefect's task engine included).
* client connect: a new client (a new flow process) opens the transport and
  learns what every site offers.
* federation up: a fresh two-site federation from nothing to every site ready
  (for FLARE: provision kits, start server and clients, submit the mesh job,
  wait for every site's hello), then stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.env import BenchEnv, write_site_configs
from bench.harness import Row, median, with_ratios

PAUSE_S = 0.5
"""Idle time before each measured request: long enough for the transport to go quiet."""


def _client_first_results(federation_file: Path, samples: int) -> list[float]:
    from dfm_prefect.client import get_client

    client = get_client(federation_file)
    times = []
    for i in range(samples + 1):
        time.sleep(PAUSE_S)  # the point is an idle transport: wait, then ask
        start = time.perf_counter()
        assert client.call("north", "core.echo", {"value": i}).fetch(client=client) == i
        if i:  # the first one warms the code path
            times.append(time.perf_counter() - start)
    return times


def _flow_first_results(federation_file: Path, samples: int) -> list[float]:
    from prefect import flow

    from adapters.core import echo
    from dfm_prefect.task_runner import FederationTaskRunner

    @flow(name="bench-first-result", task_runner=FederationTaskRunner(federation_file))
    def steps() -> list[float]:
        times = []
        for i in range(samples + 1):
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            echo.submit(value=i, site="north").result()
            if i:
                times.append(time.perf_counter() - start)
        return times

    return steps()


def _connect(federation_file: Path, samples: int) -> list[float]:
    from dfm_prefect.client import FederationClient
    from dfm_prefect.spec import load_spec
    from dfm_prefect.transports import transport_class

    times = []
    for _ in range(samples):
        spec = load_spec(federation_file)
        start = time.perf_counter()
        client = FederationClient(transport_class(spec.transport).from_spec(spec)).open()  # type: ignore[attr-defined]
        times.append(time.perf_counter() - start)
        client.close()
    return times


def _up(kind: Any, root: Path, samples: int) -> list[float]:
    times = []
    for i in range(samples):
        run = root / f"up-{i}"
        run.mkdir(parents=True)
        configs = write_site_configs(run)
        federation = kind(configs, workdir=run / "federation")
        start = time.perf_counter()
        federation.start()
        times.append(time.perf_counter() - start)
        federation.stop()
    return times


def run(env: BenchEnv, *, rounds: int = 5) -> list[Row]:
    """First-result latency, connect time and federation start-up, local vs FLARE."""
    from dfm_prefect.transports.flare.deploy.launcher import FlareFederation
    from dfm_prefect.transports.local.launcher import LocalFederation

    samples = max(10, rounds * 4)
    rows = []
    for name, federation, kind in (
        ("local", env.local_federation(), LocalFederation),
        ("FLARE", env.flare_federation(), FlareFederation),
    ):
        file = federation.federation_file
        client_times = _client_first_results(file, samples)
        flow_times = _flow_first_results(file, samples)
        rows.append(Row("latency", name, "first result, warm mesh (client call)", median(client_times) * 1e3, "ms", len(client_times),
                        note=f"max {max(client_times) * 1e3:.0f} ms"))
        rows.append(Row("latency", name, "first result, warm mesh (task in a flow)", median(flow_times) * 1e3, "ms", len(flow_times),
                        note=f"max {max(flow_times) * 1e3:.0f} ms"))
        connect = _connect(file, 3)
        rows.append(Row("latency", name, "client connect (open + describe)", median(connect), "s", len(connect)))
        up = _up(kind, env.root / "latency" / name, 3)
        rows.append(Row("latency", name, "federation up, 2 sites", median(up), "s", len(up)))
    return with_ratios(rows, "local")
