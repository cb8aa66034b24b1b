"""Streaming and the site cache: the first item of a streaming aggregate against the whole result; a cache hit against a recomputation.

One local site, ``lab``, whose Dask work runs on a `distributed.LocalCluster` of
one worker held to 1 GiB by its nanny, over a daily 1-degree temperature field
larger than that (24 years, 2.3 GB of float32 in 92-day chunks). In one run:

* **stream**: ``xarray.moments_stream`` along time (one item per chunk): the time
  from the request to the first item in the client's hands, and to the last;
* **whole**: ``xarray.moments`` over the same data (the baseline: one answer at
  the end); the items added up equal it (checked);
* **cache**: ``xarray.moments`` with the site's cache on, after the source's
  modification stamp was set (a miss: recomputed), then the same request again
  (a hit: the stored result, checked intact).

The site's peak resident memory (site process and its Dask worker processes,
sampled every 0.2 s) is recorded with the stream.

    python -m bench --only streams
    DFM_BENCH_STREAM_YEARS=4 python -m bench --only streams --rounds 1 --no-write
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

from bench.harness import PeakSampler, Row, median, with_ratios

WHOLE = "xarray.moments (whole result)"
RECOMPUTE = "xarray.moments, cache miss (recomputed)"


def _tree_rss(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(env: Any, *, rounds: int = 3) -> list[Row]:
    """Time to first and last item against the whole result; cache hit against recomputation; the site's peak memory."""
    from adapters.combine import combine_moments
    from dfm_prefect.client import close_clients, get_client
    from dfm_prefect.core.wire import RunResult
    from dfm_prefect.testing.climate import ClimateSpec, make_region, write_zarr
    from dfm_prefect.transports.local.launcher import LocalFederation

    rounds = max(1, rounds)
    spec = ClimateSpec(years=int(os.environ.get("DFM_BENCH_STREAM_YEARS", "24")))
    root = Path(env.root) / "streams"
    source = root / "field.zarr"
    t0 = time.perf_counter()
    write_zarr(make_region(spec, -90.0, 90.0), str(source))
    print(f"streams: {spec.raw_bytes / 1e9:.2f} GB field written in {time.perf_counter() - t0:.0f}s", flush=True)
    config = {
        "name": "lab",
        "operations": ["xarray.moments", "xarray.moments_stream"],
        "sources": [{"name": "field", "url": f"file://{source}"}],
        "result_store": {"url": f"file://{root / 'store'}"},
        "export": {"kinds": ["aggregate"], "max_bytes": 1 << 20, "inline_bytes": 256 << 10},
        "compute": {"kind": "cpu", "workers": 1, "threads_per_worker": 2, "memory_limit": "1GiB"},
        "cache": {"operations": ["xarray.moments"]},
    }
    path = root / "lab.yaml"
    path.write_text(yaml.safe_dump(config))
    params = {"data": "field", "dims": ["time", "lat", "lon"]}
    first: list[float] = []
    last: list[float] = []
    whole: list[float] = []
    miss: list[float] = []
    hit: list[float] = []
    peaks: list[float] = []
    items = 0
    with LocalFederation([path], workdir=root / "federation") as fed:
        client = get_client(fed.federation_file)
        (pid,) = fed.site_pids("lab")
        client.call("lab", "xarray.moments", {**params, "dims": ["lat"], "variables": ["temperature"]})  # warm: cluster, imports
        chunk = next(p for p in (source / "temperature").iterdir() if not p.name.startswith("."))
        for _ in range(rounds):
            with PeakSampler({"site": lambda: _tree_rss(pid)}) as sampler:
                t0 = time.perf_counter()
                parts = []
                with client.stream("lab", "xarray.moments_stream", params) as stream:
                    for item in stream:
                        parts.append(item.fetch(client))
                        if len(parts) == 1:
                            first.append(time.perf_counter() - t0)
                last.append(time.perf_counter() - t0)
            peaks.append(sampler.peaks["site"])
            items = len(parts)
            os.utime(chunk)  # the whole result below must be computed, not served from the cache
            t0 = time.perf_counter()
            answer = client.call("lab", "xarray.moments", params).fetch(client)
            whole.append(time.perf_counter() - t0)
            pooled, single = combine_moments(parts), combine_moments([answer])
            if not np.allclose(pooled["temperature_mean"].values, single["temperature_mean"].values, rtol=1e-9):
                raise RuntimeError("streams bench: the items do not add up to the whole result")
            os.utime(chunk)
            for times, cached in ((miss, False), (hit, True)):
                t0 = time.perf_counter()
                _, future = client.run("lab", "xarray.moments", params)
                reply = future.result(timeout=600)
                times.append(time.perf_counter() - t0)
                if not isinstance(reply, RunResult) or not reply.ok or reply.cached is not cached:
                    raise RuntimeError(f"streams bench: expected cached={cached}, got {reply}")
        client.close()
    close_clients()
    note = f"{spec.raw_bytes / 1e9:.2f} GB field, {items} items; site Dask worker held to 1 GiB"
    print(
        f"streams: first item {median(first):.2f}s, last {median(last):.2f}s, whole {median(whole):.2f}s; "
        f"cache miss {median(miss):.2f}s, hit {median(hit) * 1000:.1f} ms; site peak {median(peaks) / 2**20:.0f} MiB",
        flush=True,
    )
    rows = [
        Row("streams", WHOLE, "wall", median(whole), "s", rounds, note=note),
        Row("streams", "xarray.moments_stream, first item", "wall", median(first), "s", rounds, note=note),
        Row("streams", "xarray.moments_stream, last item", "wall", median(last), "s", rounds, note=note),
    ]
    memory = Row("streams", "site peak memory while streaming", "peak RSS", median(peaks) / 2**20, "MiB", rounds, note="site process + Dask worker")
    cache = [
        Row("streams:cache", RECOMPUTE, "wall", median(miss), "s", rounds, note=note),
        Row("streams:cache", "xarray.moments, cache hit", "wall", median(hit), "s", rounds, note=note),
    ]
    return with_ratios(rows, WHOLE) + [memory] + with_ratios(cache, RECOMPUTE)
