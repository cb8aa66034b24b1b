"""Run the benchmarks side by side, print the table and rewrite BENCHMARKS.md.

    python -m bench                 # everything
    python -m bench --only dispatch # one benchmark (BENCHMARKS.md says which ran)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from bench import dispatch, gpu, latency, locality, peer_dfm
from bench.env import BenchEnv
from bench.harness import Row, machine
from bench.report import markdown, table

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = {"dispatch": dispatch.run, "latency": latency.run, "peer": peer_dfm.run, "locality": locality.run, "gpu": gpu.run}
NOTES = {
    "dispatch": """
**Dispatch overhead.** 200 no-op tasks submitted with `.map` inside one flow run,
timed per round (first round is a warm-up). `FederationTaskRunner` runs Prefect's
task engine on the client like `ThreadPoolTaskRunner` and adds one round trip to a
site process plus the site storing the result with its sha256; `DaskTaskRunner`
runs the engine in worker processes that each talk to the Prefect API. On FLARE
the same requests go through the long-lived mesh job: batched into admin app
commands (`dfm.exchange`, which also long-polls for replies) and pushed to the
sites with aux messages.
""",
    "latency": """
**Latency per transport.** First result on a warm mesh: after a 0.5 s pause (an
idle transport), one `core.echo` to a site and back, called directly and as one
task run inside a running flow. Client connect: a new client opens the transport
and describes every site (on FLARE this includes the admin login, about 1 s of
which is FLARE's authenticator retry interval). Federation up: a fresh two-site
federation until every site is ready (FLARE: provision mTLS kits, start server
and clients, submit the mesh job, wait for each site's hello), median of 3.
""",
    "peer": """
**NVIDIA DFM head to head.** The same pipeline (load a 24×90×180 grid at one site,
cut a lat/lon box, mean, value to the client) on nv-dfm-core's local and FLARE POC
targets (its own virtual environment, nvflare 2.6) and on dfm-prefect. DFM's local
target keeps 12 warm worker processes and polls its queues every 0.1 s; on FLARE
it starts one NVFlare job per execution, which costs seconds. A dfm-prefect flow
run carries Prefect's own ~1 s flow-run overhead; inside a running flow the same
pipeline is two round trips to a warm site.
""",
    "locality": """
**Locality.** Area-weighted yearly mean and variance plus a 90-bin histogram of a
daily float32 field of `DFM_BENCH_LOCALITY_GB` (default 2) GB, one hemisphere per
site: `north` local zarr, `south` zarr on S3 (moto on 127.0.0.1, real HTTP).
Federated: a `FederationTaskRunner` flow runs `xarray.moments` and
`xarray.histogram` at each site and merges the sums on the client; bytes moved are
what left the sites. Download: the client reads both stores (local files, s3fs)
and computes the same with Dask; bytes moved are the stored bytes read. Rounds
alternate, are timed inside the flow run, and each checks that the answers agree.
""",
    "gpu": """
**GPU.** `bench/gpu.py` on a GPU machine (`scripts/gpu_check.sh`): the same
operations (`xarray.moments`, `xarray.histogram`, `xarray.reduce`) on the same
`DFM_BENCH_GPU_GB` (default 10) GB float32 field, persisted in the cluster first
(generation outside the timed region), on a dask-cuda `LocalCUDACluster` with CuPy
chunks and on a CPU `distributed.LocalCluster` using every core.
""",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated subset of {sorted(BENCHMARKS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(BENCHMARKS)
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; known: {sorted(BENCHMARKS)}")

    started = dt.datetime.now()
    t0 = time.perf_counter()
    rows: list[Row] = []
    with BenchEnv() as env:
        for name in chosen:
            print(f"running {name}...", file=sys.stderr, flush=True)
            rows += BENCHMARKS[name](env, rounds=args.rounds)
    seconds = time.perf_counter() - t0
    print(table(rows))
    command = "python -m bench" + (f" --only {','.join(chosen)}" if args.only else "")
    (ROOT / "bench" / "results.json").write_text(
        json.dumps({"command": command, "date": started.isoformat(), "machine": machine(), "rows": [r.as_dict() for r in rows]}, indent=2)
    )
    if not args.no_write:
        notes = {name: NOTES[name] for name in chosen if name in NOTES}
        (ROOT / "BENCHMARKS.md").write_text(markdown(rows, machine=machine(), command=command, notes=notes, started=started, seconds=seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
