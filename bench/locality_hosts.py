"""Locality across hosts: the locality benchmark's question over shaped links between network namespaces.

Hosts (``dfm_prefect.testing.netns``): ``hub`` runs the FLARE server and routes
between the others; ``north`` and ``south`` are sites, each holding its
hemisphere on its own disk and serving it over HTTP (a plain file server, as a
data portal would); ``client`` runs the flow, a Prefect API and the baseline.
The federation is brought up with docs/flare.md's provisioned procedure
(``tests/multihost_setup.py``). Each site's link to ``hub`` is shaped to the
rate under test in both directions (``tc`` token bucket); the client's link is
not, so the baseline is limited by the sites' links alone, as a client with a
fat pipe would be.

* federated: one flow run on the client host sends `xarray.moments` and
  `xarray.histogram` to each site over FLARE and merges the partial sums
  (``bench.locality.federated_round``, timed inside the flow run);
* download: the client host reads both zarr stores over HTTP from the sites
  (through ``hub``, over the same shaped links) and computes the same with Dask.

Every round checks that both answers agree. Needs root (skipped, saying why, otherwise).

    python -m bench --only locality-hosts                      # 0.5 GB at 1 Gbit/s and 100 Mbit/s
    DFM_BENCH_HOSTS_GB=0.05 DFM_BENCH_HOSTS_RATES=100mbit python -m bench --only locality-hosts --rounds 1 --no-write
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.harness import Row, median, with_ratios
from bench.locality import SITES, _check, prepare

BASELINE = "download over HTTP + compute on the client"
HTTP_PORT = 8080


def _site_configs(root: Path, paths: dict[str, Path]) -> dict[str, Path]:
    # The field is synthetic: these sites release every histogram bin, the sparse tails included.
    export = {"kinds": ["aggregate", "value"], "max_bytes": 1 << 20, "inline_bytes": 256 << 10, "disclosure": {"min_group_size": 1}}
    configs = {}
    for site in SITES:
        config = {
            "name": site,
            "operations": ["xarray.moments", "xarray.histogram"],
            "sources": [{"name": "temperature", "url": f"file://{paths[site]}"}],
            "export": export,
            "result_store": {"url": f"file://{root / 'store' / site}"},
            "limits": {"concurrency": 2},
        }
        configs[site] = root / f"{site}.yaml"
        configs[site].write_text(yaml.safe_dump(config))
    return configs


def _on_client(net: Any, deployed: Any, argv: list[str]) -> dict[str, Any]:
    done = net.run("client", [sys.executable, "-m", "bench.locality_hosts_client", *argv], env=deployed.flow_env, timeout=3600)
    printed = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not printed:
        raise RuntimeError(f"locality-hosts {argv[0]} round failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(printed[-1].removeprefix("RESULT "))
    out["answer"] = {key: np.asarray(value) for key, value in out["answer"].items()}
    return out


def run(env: Any, *, rounds: int = 2, size_gb: float | None = None) -> list[Row]:
    from dfm_prefect.testing.netns import Internet, unavailable
    from tests.multihost_setup import bring_up, host_env

    why = unavailable()
    if why is not None:
        print(f"locality-hosts: not run: {why}", flush=True)
        return []
    size = size_gb if size_gb is not None else float(os.environ.get("DFM_BENCH_HOSTS_GB", "0.5"))
    rates = os.environ.get("DFM_BENCH_HOSTS_RATES", "1gbit,100mbit").split(",")
    rounds = max(1, min(rounds, 3))
    root = Path(env.root)
    paths, raw = prepare(root, size)
    stored = sum(sum(f.stat().st_size for f in paths[site].rglob("*") if f.is_file()) for site in SITES)
    rows: list[Row] = []
    for rate in rates:
        work = root / "locality-hosts" / rate
        work.mkdir(parents=True, exist_ok=True)
        hosts = ["hub", *SITES, "client"]
        links = [("hub", site) for site in SITES] + [("hub", "client")]
        with Internet(hosts, links, router="hub") as net:
            for site in SITES:
                net.shape("hub", site, rate)
                portal = [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", "0.0.0.0", "--directory", str(paths[site].parent)]
                net.popen(site, portal)
                net.wait_port("client", site, HTTP_PORT)
            t0 = time.perf_counter()
            deployed = bring_up(net, work, _site_configs(work, paths), host_env())
            print(f"locality-hosts {rate}: federation across 4 hosts up in {time.perf_counter() - t0:.0f}s", flush=True)
            urls = [f"http://{net.name(site)}:{HTTP_PORT}/{paths[site].name}" for site in SITES]
            fed_times, fed_bytes, down_times = [], [], []
            for i in range(rounds):
                federated = _on_client(net, deployed, ["federated", str(deployed.analyst_file)])
                downloaded = _on_client(net, deployed, ["download", *urls])
                _check(federated["answer"], downloaded["answer"])
                fed_times.append(federated["seconds"])
                fed_bytes.append(federated["moved"])
                down_times.append(downloaded["seconds"])
                print(
                    f"locality-hosts {rate}: round {i + 1}: federated {fed_times[-1]:.1f}s, {fed_bytes[-1]} B; "
                    f"download {down_times[-1]:.1f}s, {stored} B", flush=True,
                )  # fmt: skip
        note = f"{rate} per site link; {raw / 1e9:.2f} GB raw, {stored / 1e9:.2f} GB stored; answers agree"
        bench = f"locality-hosts @{rate}"
        rows += with_ratios(
            [
                Row(bench, "federated (FLARE, 2 site hosts)", "wall time", median(fed_times), "s", rounds, note=note),
                Row(bench, BASELINE, "wall time", median(down_times), "s", rounds, note=note),
                Row(bench, "federated (FLARE, 2 site hosts)", "bytes moved", median(fed_bytes) / 1e6, "MB", rounds),
                Row(bench, BASELINE, "bytes moved", stored / 1e6, "MB", rounds),
            ],
            BASELINE,
        )
    return rows
