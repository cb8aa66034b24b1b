"""Locality: federated statistics over two sites against downloading the raw data to the client.

Two sites hold one hemisphere each of a daily float32 temperature field (noise
included, so it compresses like real data): ``north`` as local zarr, ``south``
as zarr on S3 (moto's server on 127.0.0.1, real HTTP). The same answer, the
area-weighted mean and variance per year and a 90-bin histogram of the whole
field, is computed two ways:

* federated: a flow on `FederationTaskRunner` sends `xarray.moments` and
  `xarray.histogram` to each site and merges the partial sums on the client
  (`adapters.combine`); the bytes moved are what left the sites (their counters);
* download: the client reads both zarr stores (local files and s3fs from the S3
  server) and computes the same statistics itself with Dask; the bytes moved are
  the stored bytes it read.

Rounds alternate between the two (same cache state), are timed inside the flow
(Prefect's ~1 s flow-run overhead excluded), and each round checks that both
answers agree. The field is generated chunk by chunk once per run, under the
benchmark's temporary directory. Size: ``DFM_BENCH_LOCALITY_GB`` (default 2).

    python -m bench --only locality                          # the 2 GB run
    DFM_BENCH_LOCALITY_GB=0.05 python -m bench --only locality --rounds 1 --no-write
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.harness import Row, median, with_ratios

SITES = ("north", "south")
BUCKET = "dfm-bench-locality"
RESOLUTION = 0.5
STEPS_PER_CHUNK = 32
BINS = {"start": 220.0, "stop": 340.0, "count": 90}
BASELINE = "download + compute on the client"


def _block(block_info: Any = None, *, south: bool) -> np.ndarray:
    """Days of one hemisphere: climatology by latitude, a seasonal cycle, a trend and weather noise."""
    info = block_info[None]
    (t0, t1), (y0, y1), (x0, x1) = info["array-location"]
    lats = _lats(south)[y0:y1]
    day = np.arange(t0, t1)
    rng = np.random.default_rng([42, int(south), *info["chunk-location"]])
    phi = np.deg2rad(lats)[None, :, None]
    season = -12.0 * np.sin(phi) * np.cos(2 * np.pi * (day[:, None, None] - 15) / 365.25)
    mean = 302.0 - 45.0 * np.sin(phi) ** 2 + 0.00007 * day[:, None, None]
    noise = rng.standard_normal((t1 - t0, y1 - y0, x1 - x0), dtype=np.float32)
    return (mean + season + 2.5 * noise).astype(np.float32)


def _lats(south: bool) -> np.ndarray:
    lats = np.arange(-90 + RESOLUTION / 2, 90, RESOLUTION)
    return lats[lats < 0] if south else lats[lats >= 0]


def hemisphere(days: int, *, south: bool) -> Any:
    """A lazy hemisphere of ``days`` daily steps, generated chunk by chunk."""
    import dask.array as da
    import pandas as pd
    import xarray as xr

    lats, lons = _lats(south), np.arange(RESOLUTION / 2, 360, RESOLUTION)
    chunks = (tuple(min(STEPS_PER_CHUNK, days - s) for s in range(0, days, STEPS_PER_CHUNK)), (lats.size,), (lons.size,))
    data = da.map_blocks(_block, south=south, chunks=chunks, dtype=np.float32)
    time_index = pd.date_range("2000-01-01", periods=days, freq="D")
    return xr.Dataset(
        {"temperature": (("time", "lat", "lon"), data, {"units": "K"})},
        coords={"time": time_index, "lat": lats, "lon": lons},
    )


def prepare(root: Path, size_gb: float) -> tuple[dict[str, Path], int]:
    """Write both hemispheres as zarr (once per size under ``root``); return their paths and raw bytes."""
    per_day = _lats(False).size * int(360 / RESOLUTION) * 4 * 2
    days = max(STEPS_PER_CHUNK, math.ceil(size_gb * 1e9 / per_day))
    folder = root / "locality" / f"{days}d"
    paths = {site: folder / f"{site}.zarr" for site in SITES}
    marker = folder / "done.json"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for site in SITES:
            hemisphere(days, south=site == "south").to_zarr(paths[site], zarr_format=2, consolidated=True, compute=True)
        marker.write_text(json.dumps({"days": days}))
    return paths, days * per_day


def _stored_bytes(fs: Any, path: str) -> int:
    return int(fs.du(path, total=True))


def _site_configs(root: Path, north: Path, south_url: str) -> list[Path]:
    operations = ["xarray.moments", "xarray.histogram"]
    # The field is synthetic: these sites release every histogram bin, the sparse tails included.
    export = {"kinds": ["aggregate", "value"], "max_bytes": 1 << 20, "inline_bytes": 256 << 10, "disclosure": {"min_group_size": 1}}
    sources = {
        "north": [{"name": "temperature", "url": f"file://{north}"}],
        "south": [
            {
                "name": "temperature",
                "url": south_url,
                "storage_options": {
                    "key": "${env:AWS_ACCESS_KEY_ID}",
                    "secret": "${env:AWS_SECRET_ACCESS_KEY}",
                    "client_kwargs": {"endpoint_url": "${env:DFM_BENCH_S3_ENDPOINT}"},
                },
            }
        ],
    }
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for site in SITES:
        config = {"name": site, "operations": operations, "sources": sources[site], "export": export,
                  "result_store": {"url": f"file://{root / 'store' / site}"}, "limits": {"concurrency": 2}}
        path = root / f"{site}.yaml"
        path.write_text(yaml.safe_dump(config))
        paths.append(path)
    return paths


def _answer(stats: Any, hist: Any) -> dict[str, Any]:
    return {
        "mean": np.asarray(stats["temperature_mean"].values, dtype="float64"),
        "var": np.asarray(stats["temperature_var"].values, dtype="float64"),
        "counts": np.asarray(hist["temperature__count"].values),
    }


def federated_round(runner: Any, client: Any) -> tuple[float, int, dict[str, Any]]:
    """One federated round in its own flow run: seconds inside the flow, bytes that left the sites, answer."""
    from prefect import flow

    from adapters.combine import combine_histograms, combine_moments
    from adapters.xarray_ops import histogram, moments

    before = {site: client.stats(site).bytes_out for site in SITES}

    @flow(name="bench-locality", task_runner=runner)
    def federated() -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        parts = [moments.submit(data=f"dfm://{s}/temperature", dims=["lat", "lon"], groupby="time.year", weights="area") for s in SITES]
        hists = [histogram.submit(data=f"dfm://{s}/temperature", bins=BINS) for s in SITES]
        stats = combine_moments([p.result().fetch() for p in parts])
        hist = combine_histograms([h.result().fetch() for h in hists])
        return time.perf_counter() - start, _answer(stats, hist)

    seconds, answer = federated()
    moved = sum(client.stats(site).bytes_out - before[site] for site in SITES)
    return seconds, moved, answer


def download_round(north: Path, s3: Any, south_url: str) -> tuple[float, dict[str, Any]]:
    """Read both hemispheres on the client and compute the same statistics there."""
    import xarray as xr

    start = time.perf_counter()
    answer = client_statistics([xr.open_zarr(str(north), chunks={}), xr.open_zarr(s3.filesystem().get_mapper(south_url), chunks={})])
    return time.perf_counter() - start, answer


def client_statistics(parts: list[Any]) -> dict[str, Any]:
    """The federated answer computed on the client from the opened hemispheres (the download baseline)."""
    import dask
    import dask.array as da
    import xarray as xr

    t = xr.concat(parts, dim="lat")["temperature"]
    w = np.cos(np.deg2rad(t["lat"])) * t.notnull()
    x = t.astype("float64").fillna(0.0)
    sums = xr.Dataset({"w": w, "wx": x * w, "wxx": x * x * w}).groupby("time.year").sum(dim=["time", "lat", "lon"])
    edges = np.linspace(BINS["start"], BINS["stop"], BINS["count"] + 1)
    counts, _ = da.histogram(t.data, bins=edges)
    sums, counts = dask.compute(sums, counts, scheduler="threads")
    mean = sums.wx / sums.w
    return {"mean": mean.values, "var": (sums.wxx / sums.w - mean**2).values, "counts": counts}


def _check(a: dict[str, Any], b: dict[str, Any]) -> None:
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-9)
    np.testing.assert_allclose(a["var"], b["var"], rtol=1e-6)
    np.testing.assert_array_equal(a["counts"], b["counts"])


def run(env: Any, *, rounds: int = 3, size_gb: float | None = None) -> list[Row]:
    """Wall time and bytes moved, federated against download-and-compute, over the same field."""
    from dfm_prefect.client import close_clients, get_client
    from dfm_prefect.task_runner import FederationTaskRunner
    from dfm_prefect.testing.s3 import DEMO_CREDENTIALS, LocalS3
    from dfm_prefect.transports.local.launcher import LocalFederation

    size = size_gb if size_gb is not None else float(os.environ.get("DFM_BENCH_LOCALITY_GB", "2"))
    rounds = max(1, min(rounds, 3))  # each download round reads the whole field
    root = Path(env.root)
    t0 = time.perf_counter()
    paths, raw = prepare(root, size)
    print(f"locality: {raw / 1e9:.2f} GB of raw data ready in {time.perf_counter() - t0:.0f}s", flush=True)
    with LocalS3() as s3:
        fs = s3.filesystem()
        fs.mkdir(BUCKET)
        south_url = f"s3://{BUCKET}/south.zarr"
        t0 = time.perf_counter()
        fs.put(str(paths["south"]), south_url, recursive=True)
        print(f"locality: south uploaded to {s3.endpoint_url} in {time.perf_counter() - t0:.0f}s", flush=True)
        import fsspec

        stored = _stored_bytes(fsspec.filesystem("file"), str(paths["north"])) + _stored_bytes(fs, south_url)
        configs = _site_configs(root / "locality" / "sites", paths["north"], south_url)
        env_vars = {**DEMO_CREDENTIALS, "DFM_BENCH_S3_ENDPOINT": s3.endpoint_url}
        with LocalFederation(configs, workdir=root / "locality" / "federation", env=env_vars) as federation:
            runner = FederationTaskRunner(federation.federation_file)
            client = get_client(federation.federation_file)
            fed_times, fed_bytes, down_times = [], [], []
            for i in range(rounds):
                seconds, moved, federated = federated_round(runner, client)
                fed_times.append(seconds)
                fed_bytes.append(moved)
                seconds, downloaded = download_round(paths["north"], s3, south_url)
                down_times.append(seconds)
                _check(federated, downloaded)
                print(f"locality: round {i + 1}: federated {fed_times[-1]:.1f}s, {moved} B; download {seconds:.1f}s, {stored} B", flush=True)
            close_clients()
    # zarr opens its own asynchronous s3fs clients and never closes them; aiohttp would
    # complain about their sessions at interpreter exit, after the S3 server is gone.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    note = f"{raw / 1e9:.2f} GB raw, {stored / 1e9:.2f} GB stored; answers agree"
    rows = [
        Row("locality", "federated (2 sites)", "wall time", median(fed_times), "s", rounds, note=note),
        Row("locality", BASELINE, "wall time", median(down_times), "s", rounds, note=note),
        Row("locality", "federated (2 sites)", "bytes moved", median(fed_bytes) / 1e6, "MB", rounds),
        Row("locality", BASELINE, "bytes moved", stored / 1e6, "MB", rounds),
    ]
    return with_ratios(rows, BASELINE)
