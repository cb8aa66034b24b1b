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

from bench.locality import client_statistics, federated_round


def download(urls: list[str]) -> tuple[float, int, dict[str, Any]]:
    import fsspec
    import xarray as xr

    start = time.perf_counter()
    answer = client_statistics([xr.open_zarr(fsspec.get_mapper(url), chunks={}) for url in urls])
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
