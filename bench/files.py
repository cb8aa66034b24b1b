"""Stores of many files: a two-step pipeline on a local zarr store of 20,000 chunk files, against a store of few.

A site tells a changed source by the stamps of its files (size, modification and
change stamps, inode), so a request walks a zarr store's chunk files: for its
cache key, its view's recipe, opening the source (the site keeps opened sources
while the stamps hold) and checking each view it recomputes. A request walks
them once and every use shares that look. This benchmark shows what the walk
still costs per request.

One local site (its own process) holds the same field twice: as a store of
20,000 one-day chunks and as a store of a few large chunks. The pipeline, as a
flow would send it: ``xarray.subset`` (ten days: a view), then ``xarray.reduce``
(the mean over that view, recomputed at the site). Baseline: the same subset and
mean computed directly in this process with xarray on the many-file store.
Also timed, in this process: one look at the many-file store (every file's stamps).

    python -m bench --only files
    DFM_BENCH_FILES=5000 python -m bench --only files --rounds 3 --no-write
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.harness import Row, median, with_ratios

DIRECT = "direct: xarray in this process, many-file store"
DAYS = {"time": {"start": 0, "stop": 9}}


def _field(days: int) -> Any:
    import xarray as xr

    rng = np.random.default_rng(0)
    data = (280.0 + rng.standard_normal((days, 4, 4))).astype("float32")
    coords = {"time": np.arange(days), "lat": np.linspace(-60.0, 60.0, 4), "lon": np.linspace(0.0, 270.0, 4)}
    return xr.Dataset({"t2m": (("time", "lat", "lon"), data)}, coords=coords)


def run(env: Any, *, rounds: int = 5) -> list[Row]:
    """Per-step wall time of subset then mean at a site, many-file store against few, and against direct xarray."""
    import xarray as xr

    from dfm_prefect.client import close_clients, get_client
    from dfm_prefect.transports.local.launcher import LocalFederation
    from site_workers.views import _local_stamps

    rounds = max(1, rounds)
    days = int(os.environ.get("DFM_BENCH_FILES", "20000"))
    root = Path(env.root) / "files"
    root.mkdir(parents=True, exist_ok=True)
    field = _field(days)
    stores = {"many": root / "many.zarr", "few": root / "few.zarr"}
    field.chunk({"time": 1}).to_zarr(stores["many"], zarr_format=2, mode="w")
    field.chunk({"time": max(1, days // 4)}).to_zarr(stores["few"], zarr_format=2, mode="w")
    files = {name: sum(1 for path in store.rglob("*") if path.is_file()) for name, store in stores.items()}
    config = {
        "name": "lab",
        "operations": ["xarray.subset", "xarray.reduce"],
        "sources": [{"name": name, "url": f"file://{store}"} for name, store in stores.items()],
        "result_store": {"url": f"file://{root / 'store'}"},
        "export": {"kinds": ["aggregate"], "max_bytes": 1 << 20},
        "compute": {"kind": "threads"},
    }
    path = root / "lab.yaml"
    path.write_text(yaml.safe_dump(config))

    def direct() -> float:
        with xr.open_zarr(stores["many"]) as ds:
            return float(ds["t2m"].isel(time=slice(0, 10)).mean())

    expected = direct()
    times: dict[tuple[str, str], list[float]] = {}
    looks: list[float] = []
    with LocalFederation([path], workdir=root / "federation") as fed:
        client = get_client(fed.federation_file)
        for name in stores:  # warm: imports, the site's first opening
            box = client.call("lab", "xarray.subset", {"data": name, "ranges": DAYS})
            client.call("lab", "xarray.reduce", {"data": box, "dims": ["time", "lat", "lon"], "stat": "mean"})
        for _ in range(rounds):
            for name in stores:
                t0 = time.perf_counter()
                box = client.call("lab", "xarray.subset", {"data": name, "ranges": DAYS})
                t1 = time.perf_counter()
                mean = client.call("lab", "xarray.reduce", {"data": box, "dims": ["time", "lat", "lon"], "stat": "mean"})
                t2 = time.perf_counter()
                value = float(mean.fetch(client)["t2m"])
                if not np.isclose(value, expected, rtol=1e-6):
                    raise RuntimeError(f"files bench: the site's mean {value} is not the direct one {expected}")
                times.setdefault((name, "subset"), []).append(t1 - t0)
                times.setdefault((name, "mean"), []).append(t2 - t1)
            t0 = time.perf_counter()
            direct()
            times.setdefault(("direct", "pipeline"), []).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _local_stamps(str(stores["many"]))
            looks.append(time.perf_counter() - t0)
        client.close()
    close_clients()
    note = {name: f"{files[name]:,} files" for name in stores}
    print(
        "files: " + "; ".join(f"{name} {step} {median(v) * 1e3:.0f} ms" for (name, step), v in times.items())
        + f"; one look at {files['many']:,} files {median(looks) * 1e3:.0f} ms",
        flush=True,
    )
    ms = lambda values: median(values) * 1e3  # noqa: E731
    pipeline = [
        Row("files", DIRECT, "subset + mean", ms(times[("direct", "pipeline")]), "ms", rounds, note=note["many"]),
        *(
            Row("files", f"site, {name}-file store", "subset + mean", ms([a + b for a, b in zip(times[(name, "subset")], times[(name, "mean")])]), "ms", rounds, note=note[name])
            for name in stores
        ),
    ]
    steps = [Row("files:steps", f"site, {name}-file store, {step}", "wall", ms(times[(name, step)]), "ms", rounds, note=note[name]) for name in stores for step in ("subset", "mean")]
    look = Row("files:look", "one look at the many-file store (every file's stamps)", "wall", ms(looks), "ms", rounds, note=note["many"])
    return with_ratios(pipeline, DIRECT) + steps + [look]
