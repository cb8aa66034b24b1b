"""One round of ``bench.locality_hosts``, run on the ``client`` host (``python -m bench.locality_hosts_client``).

``federated FEDERATION_FILE``: one flow run of `bench.locality.federated_round`.
``download URL...``: read the zarr stores over HTTP and compute the same statistics.
Prints one ``RESULT {...}`` line: seconds, bytes moved, the answer.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

from bench.locality import BINS, federated_round


def download(urls: list[str]) -> tuple[float, int, dict[str, Any]]:
    import dask
    import dask.array as da
    import fsspec
    import xarray as xr

    start = time.perf_counter()
    parts = [xr.open_zarr(fsspec.get_mapper(url), chunks={}) for url in urls]
    t = xr.concat(parts, dim="lat")["temperature"]
    w = np.cos(np.deg2rad(t["lat"])) * t.notnull()
    x = t.astype("float64").fillna(0.0)
    sums = xr.Dataset({"w": w, "wx": x * w, "wxx": x * x * w}).groupby("time.year").sum(dim=["time", "lat", "lon"])
    edges = np.linspace(BINS["start"], BINS["stop"], BINS["count"] + 1)
    counts, _ = da.histogram(t.data, bins=edges)
    sums, counts = dask.compute(sums, counts, scheduler="threads")
    mean = sums.wx / sums.w
    answer = {"mean": mean.values, "var": (sums.wxx / sums.w - mean**2).values, "counts": counts}
    return time.perf_counter() - start, 0, answer


def main(argv: list[str]) -> None:
    if argv[0] == "federated":
        from dfm_prefect.client import get_client
        from dfm_prefect.task_runner import FederationTaskRunner

        client = get_client(argv[1])
        seconds, moved, answer = federated_round(FederationTaskRunner(argv[1]), client)
    elif argv[0] == "download":
        seconds, moved, answer = download(argv[1:])
    else:
        raise SystemExit(f"unknown round {argv[0]!r}")
    out = {"seconds": seconds, "moved": moved, "answer": {key: np.asarray(value).tolist() for key, value in answer.items()}}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
