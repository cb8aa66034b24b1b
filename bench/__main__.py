"""Run the benchmarks side by side, print the table and rewrite BENCHMARKS.md.

    python -m bench                 # everything
    python -m bench --only dispatch # one benchmark (BENCHMARKS.md says which ran)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path

from bench import dispatch, files, gpu, latency, load, locality, locality_hosts, moves, peer_dfm, sql_locality, streams, views
from bench.env import BenchEnv
from bench.harness import Row, machine
from bench.report import markdown, table

ROOT = Path(__file__).resolve().parents[1]
# load runs before locality: the client's memory is measured in this process, which the
# locality baseline fills with gigabytes of downloaded data.
BENCHMARKS = {
    "dispatch": dispatch.run,
    "latency": latency.run,
    "peer": peer_dfm.run,
    "load": load.run,
    "locality": locality.run,
    "locality-hosts": locality_hosts.run,
    "views": views.run,
    "files": files.run,
    "moves": moves.run,
    "sql": sql_locality.run,
    "streams": streams.run,
    "gpu": gpu.run,
}
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
    "streams": """
**Streaming and the site cache.** One local site whose Dask work runs on one
worker held to 1 GiB, over a field larger than that. `xarray.moments_stream`
sends the moments of each 92-day chunk as it is computed (time to the first item
in the client's hands, and to the last), against `xarray.moments` over the whole
field (one answer at the end); the items add up to it. The cache rows: the same
`xarray.moments` request after the source's modification stamp changed (a miss:
recomputed) and then again (a hit: the stored result, checked intact).
The first item comes about 30 times sooner than the whole answer; the last
item comes about twice as late, because each item is its own Dask computation
of one chunk (one of the worker's two threads idles) and is stored, checked and
sent on its own.
""",
    "files": """
**Stores of many files.** One local site holds the same small field as a zarr
store of 20,000 one-day chunk files and as a store of a few chunks; the pipeline
is `xarray.subset` (ten days, a view) then `xarray.reduce` (the mean, recomputing
the view), each a request from a client. The site tells a changed source by its
files' stamps, so each request walks the store's files once (its cache key,
recipe, opening and view checks share that look); *one look* is that walk alone.
The baseline computes the same mean directly with xarray in the client process.
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
pipeline is two task runs (`xarray.subset`, a view; `xarray.reduce` on it) and the
value, inline in the second answer. *CPU per execution*: the user and system CPU
time, over the 21 executions inside one flow, of each process that does the work
(the flow's own process with Prefect's task engine, the Prefect API server that
records the task runs, each site, the FLARE server with the mesh job's
controller), divided by the executions: where the time of an execution goes.
Sites keep opened sources while their files are unchanged, so a step does not
open its source again.
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
Each site computes the moments and the histogram as one Dask graph that reads each
chunk once (`site_workers/fusion.py`: requests on the same inputs that run at the
same time share their computation). The same run with that sharing switched off
(`fusion.WAIT_S = 0`, `--no-write`, right after the recorded one): federated
19.09 s against 20.74 s for the download (0.92×).
""",
    "views": """
**Views.** The demo flow (`flows/federated_climate_stats.py`: per site `xarray.subset`
of the years asked, then area-weighted `xarray.moments` per year; the client pools
the sums) on the demo's two sites (north local zarr, south zarr on S3 through moto
on 127.0.0.1) at 2, 4, 8 and 16 years of a daily 1° float32 field, local transport,
a running Prefect API. *views*: the subset is a view and the moments read the
source once; *stored copies*: the same sources marked `views: false`, so each
subset is written to the result store with its sha256 and read back; *direct*: the
same statistics computed in the benchmark process on the pooled raw data. One warm
flow run per variant, then the timed ones; every answer is checked against direct.
Flow wall time includes Prefect's own per-flow-run cost (about 1 s).
""",
    "moves": """
**Moves between sites.** Two sites on 127.0.0.1 per transport: `north` holds a
float32 zarr source (1,000,000 bytes per time step, uncompressed), `hub` holds
nothing and imports datasets from north. *Throughput*: for each size
(`DFM_BENCH_MOVES_MB`, default 10,100,1000 MB) north stores the first steps with
`xarray.write` (a stored netCDF result, so no materialization is timed) and hub runs
`dfm.move` on it, timed at the client from the request until hub has stored its
checked copy: 4 MiB pieces, at most 4 in flight, sha256 of the whole checked at hub.
Each figure is the median of `--rounds` moves (at most 3 at 1 GB); MB are 10^6
bytes. The ceiling, measured in the same run and alternating with the local
transport's moves: a plain TLS copy of the same stored file over loopback (Python
`ssl`, a throwaway self-signed EC certificate), one process reading it in 4 MiB
pieces and sending, one receiving and writing to a file, timed from the receiver's
accept (handshake included) to the last byte written. Peak RSS: each site's
processes sampled every 50 ms during each move (local: the site process; FLARE:
its FLARE client plus its mesh-job process), the highest over the rounds, with the
largest growth over the RSS at the move's start. CPU per MB moved: the user and
system CPU time each process (and its children) used during a move, by role (each
site; over FLARE also FLARE's server process and the mesh job's controller), and
the whole machine's, divided by the MB moved. Each size is checked once per
transport: the mean of hub's copy equals north's. *Reliability*: the 10 MB result
moved 20 times in a row and 20 times at once (20 client threads; each site runs 4
operations at a time, the rest queue), each with a 300 s deadline; a failure,
a hang past the deadline or a copy of another size counts as failed. A size whose
first move fails on a transport is a *failed* row carrying the site's error, and
its rounds are skipped there.
*Two-site pipeline*: a lat/lon box of the 24×90×180 grid of the DFM head-to-head
cut at one site, its mean taken at another, the number to the client. nv-dfm-core
(local and FLARE POC targets): Load and Subset at `datasite`, Mean at `hubsite`
(checked in its prepared pipeline), the box sent by DFM as a token; dfm-prefect:
`xarray.subset` at north (a view), `xarray.reduce` with `site="hub"` (the box is
materialized at north and moved north→hub by `dfm.move`, its own task run), per
execution as one Prefect flow run each (which carries Prefect's ~1 s per flow run)
and inside one running flow.
""",
    "sql": """
**Databases.** Count, sum, sum of squares, min and max of `stay_days` per ward for
adults over two hospitals, each a PostgreSQL database of `DFM_BENCH_SQL_ROWS`
(default 1,000,000) visits on 127.0.0.1. Federated: a `FederationTaskRunner` flow
runs `sql.aggregate` at each site (the database groups) and pools the partials on
the client; bytes moved are what left the sites. Pull: the client streams the adult
rows' ward and stay from both databases and computes the same with pandas; bytes
moved are what the servers sent, counted by a TCP relay on an untimed repeat of
the same reads. Rounds alternate, are
timed inside the flow run, and each checks that the answers agree.
""",
    "locality-hosts": """
**Locality across hosts.** The locality question over real links: hosts made of
network namespaces (`dfm_prefect.testing.netns`), `hub` running the FLARE server
and routing, `north` and `south` each holding one hemisphere (float32, daily,
`DFM_BENCH_HOSTS_GB`, default 0.5 GB in all) and serving it over HTTP, `client`
running the flow and a Prefect API. The federation is brought up with
docs/flare.md's provisioned procedure. Each site's link to `hub` is shaped with a
`tc` token bucket to the rate named in the row, both directions; the client's link
is not shaped. Federated: one FLARE flow run of `xarray.moments` and
`xarray.histogram` at both sites, merged on the client, timed inside the flow run;
bytes moved are what left the sites. Download: the client reads both zarr stores
over HTTP (through `hub`, over the same links) and computes the same with Dask;
bytes moved are the stored bytes. Each round checks that the answers agree.
""",
    "gpu": """
**GPU.** `bench/gpu.py` on a GPU machine (`scripts/gpu_check.sh`): the same
operations (`xarray.moments`, `xarray.histogram`, `xarray.reduce`) on the same
`DFM_BENCH_GPU_GB` (default 10) GB float32 field, persisted in the cluster first
(generation outside the timed region), on a dask-cuda `LocalCUDACluster` with CuPy
chunks and on a CPU `distributed.LocalCluster` using every core.
""",
    "load": """
**Throughput and memory under load.** 2,000 `core.echo` operations mapped over the
two sites in one flow run on `FederationTaskRunner` (64 task runs in flight, its
default; sites at concurrency 4), against the same 2,000 no-op tasks on
`ThreadPoolTaskRunner(max_workers=64)` (Prefect's default would start a thread per
pending task). Wall time is the whole flow run, Prefect's own per-run cost
included. A 200-task flow run warms each runner, then each runs one round (with
the wait for the API a round takes about a minute, so `--rounds` does not apply).
A thread samples resident memory every 0.2 s until the Prefect API has recorded
every task run as Completed (task-run states reach it as events; the lag after the
flow ends is reported): the client process, the Prefect API server with its
children, each site (local: the site process; FLARE: its FLARE client and the mesh
job process) and the FLARE server with the mesh job's controller. Every round
checks that each result came back with its own value, from both sites, and that
the sites counted 2,000 completed, none failed or refused. The client process is
the benchmark process itself, which already holds what the earlier benchmarks
loaded: its growth during the round is the figure to read.
""",
}

SUMMARY = """
Ahead: per-task dispatch against `DaskTaskRunner` on both transports (Prefect's
engine stays on the client, so workers make no per-task API calls); NVIDIA DFM's
FLARE target by one to two orders of magnitude per execution (one long-lived mesh
job instead of an NVFlare job per execution: 0.25 s against 8.9 s inside a flow,
1.2 s as one flow run each); NVIDIA DFM's local target for a pipeline run inside a
running flow on the local transport (0.11 s against 0.20 s; sites keep opened
sources, so a step no longer opens its file again); and the locality benchmark,
in bytes moved (only aggregates leave the sites) and in wall time on loopback and
across hosts (each site reads its chunks once for all its statistics).

Behind, and why (the figures of each run come from that run, and the runs list
above names each run's machine: the 2026-11-27 run had another CPU than the later
ones, and the latency benchmark at the 2026-11-27 commit gave 3.50 ms on the
later machine against 1.58 ms then, so compare ratios within a run, not figures
across runs):

- **A pipeline in milliseconds.** Inside a running flow the head-to-head
  pipeline is two task runs and costs, per execution (peer rows *CPU per
  execution*), about 48 ms of CPU in the flow's process (Prefect's task engine
  for two task runs, the dispatch, decoding the value), 87 ms in the Prefect API
  server (recording the two task runs' states, events and log lines) and 32 ms at
  the site; on FLARE 91 ms, 125 ms, 73 ms and 122 ms in the FLARE server. On two
  cores Prefect's own share alone exceeds 20 ms per execution: a task run in a
  flow costs about 20 ms against 4 ms for the same request sent with the
  client (latency rows). Keeping opened sources took the whole pipeline from
  about 221 to 125 ms (its subset step from 64 to 18 ms) in a profiling script
  run before and after on the same machine, not in a recorded benchmark run.
- **FLARE dispatch against `ThreadPoolTaskRunner`.** Under `.map` load the mesh
  carries 0.71 FLARE messages per request (client exchanges, controller
  dispatches and reply chunks: requests and replies travel many to a message),
  yet every message crosses FLARE's admin path (server, job process, aux message
  to the site and back), which FLARE serializes under one lock, and on 2 cores
  the FLARE server, two site parents, two site job processes and the client
  share the CPUs (in the pipeline above the FLARE server alone uses 122 ms of CPU
  per execution). A lone warm result takes tens of milliseconds against a few on
  the local transport.
- **One Prefect flow run per execution against DFM's local target.** Each Prefect
  flow run costs about 1 s of Prefect's own work (creating the run, its state
  events, joining its heartbeat thread at exit), whatever the federation does.
- **Moves over FLARE against a TLS socket copy.** Every byte goes from the source
  site's job process to FLARE's server process, which relays it to the mesh job's
  controller, then back through the server process to the receiving site's job
  process, as base64 in JSON frames: 12-14 MB/s in the recorded run (0.05x of the
  copy), against 96-100 MB/s site to site on the local transport (0.34-0.36x). A
  MB moved over FLARE cost about 110 ms of CPU. In that run the row named FLARE
  server also counted the mesh controller, its child process (52-55 ms per MB);
  the server process alone took about 30 ms per MB (52.5 less the controller's
  22.9 at 100 MB; the benchmark now counts each process once). At half the copy's
  rate (about 140 MB/s) that process alone would need about 4 cores; with both
  cores of this machine and nothing else running it would relay at most about
  67 MB/s (0.24x), or about 0.47x if the bytes skipped the controller (one relay
  instead of two), leaving no CPU for the sites. The recorded run also sent up to
  4 pieces of a frame at once; that was taken back because its shared threads let
  a client that stopped reading block other clients' large replies.
- **Throughput under load on FLARE.** 2,000 operations run at about half the
  rate of `ThreadPoolTaskRunner`'s no-op tasks (the local transport at about 0.8x).
  Two cores run the client, the Prefect API server, the FLARE server and two
  sites, each a FLARE client with its job process, and they are saturated.
  Memory stays flat: the client grows by a few MiB, a FLARE site holds a few
  hundred MiB (FLARE's own client and job processes), and in every runner the
  Prefect API takes about 40 s after the flow ends to record 2,000 runs.
- **Locality across hosts.** The namespace hosts share this machine's two cores,
  so the sites' computation and the client's draw on the same CPUs and the
  federation saves only the transfer: 0.81x of the download at 1 Gbit/s and
  0.31x at 100 Mbit/s for 0.5 GB (the ratio tends to about 0.17 at 100 Mbit/s
  for large fields here: sites compute about 125 MB/s of raw data, the download
  brings about 22 MB/s).
- **Stores of many files.** A site tells a changed source by its files' stamps,
  so on a zarr store of 20,014 files each request walks them once (117 ms a walk
  in the recorded run): a subset then a mean take 406 ms at the site, against
  60 ms on the same field stored in 18 files and 46 ms computed directly with
  xarray. Before a request shared one look, its cache key, recipe, opening and
  view check each walked the store, and the walk used relpath: on a store of the
  same shape, with an in-process site, a subset took 361-372 ms and a mean over
  time 468-486 ms, and 229-258 ms and 189-216 ms after (a script run before and
  after on this machine, not a recorded benchmark run). Stamping only a store's
  metadata files would not see a rewritten chunk, which a view must see.
- **GPU.** The GPU rows are from `scripts/gpu_check.sh` on an H100 on
  2026-11-27; no GPU machine has been available since, so they were not run
  again.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated subset of {sorted(BENCHMARKS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and bench/results.json alone")
    parser.add_argument("--render", action="store_true", help="rewrite BENCHMARKS.md from bench/results.json without running")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only: replace only these benchmarks' rows in bench/results.json and BENCHMARKS.md, keeping the "
        "others (each benchmark's figures say which run produced them)",
    )
    args = parser.parse_args(argv)
    if args.render:
        return render(json.loads((ROOT / "bench" / "results.json").read_text()))
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
    if args.no_write:
        return 0
    run = {"command": command, "date": started.isoformat(), "seconds": seconds, "machine": machine(), "benchmarks": chosen}
    results = {**run, "rows": [r.as_dict() for r in rows], "runs": [run]}
    if args.merge and args.only:
        earlier = json.loads((ROOT / "bench" / "results.json").read_text())
        kept = [row for row in earlier["rows"] if benchmark_of(row["bench"]) not in chosen]
        runs = [dict(r, benchmarks=[b for b in r["benchmarks"] if b not in chosen]) for r in _runs(earlier)]
        results = {**earlier, "rows": kept + results["rows"], "runs": [r for r in runs if r["benchmarks"]] + [run]}
        (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2))
        return render(results)
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2))
    notes = {"Where dfm-prefect stands": SUMMARY} if not args.only else {}
    notes.update({name: NOTES[name] for name in chosen if name in NOTES})
    (ROOT / "BENCHMARKS.md").write_text(markdown(rows, machine=machine(), command=command, notes=notes, started=started, seconds=seconds))
    return 0


def benchmark_of(bench: str) -> str:
    """The benchmark a row's ``bench`` belongs to ("moves: 10 MB" and "locality-hosts @1gbit" are moves and locality-hosts)."""
    return re.split(r"[:\s]", bench, maxsplit=1)[0]


def _runs(results: dict) -> list[dict]:
    """The runs whose figures ``results`` holds (one, for results recorded before runs were merged)."""
    if "runs" in results:
        return list(results["runs"])
    benches = list(dict.fromkeys(benchmark_of(row["bench"]) for row in results["rows"]))
    keys = ("command", "date", "seconds", "machine")
    return [{**{key: results.get(key) for key in keys}, "benchmarks": benches}]


def render(results: dict) -> int:
    """BENCHMARKS.md from recorded results (each run's own command, date and machine)."""
    rows = [Row(**row) for row in results["rows"]]
    ran = list(dict.fromkeys(benchmark_of(row.bench) for row in rows))
    runs = _runs(results)
    if len(runs) > 1:
        newest = max(runs, key=lambda r: r["date"])
        text = markdown(rows, machine=newest["machine"], command=results["command"], notes={}, started=dt.datetime.now(), seconds=0)
        header = ["# Benchmarks", "", "Figures from these runs (each benchmark's rows come from one run; the machine below is the newest run's):", ""]
        header += [
            f"- `{r['command']}` on {dt.datetime.fromisoformat(r['date']):%Y-%m-%d} ({r['seconds'] / 60:.1f} min, "
            f"{r['machine']['cpu']}, {r['machine']['cores']} cores): {', '.join(r['benchmarks'])}"
            for r in runs
        ]
        body = text.split("\n", 3)[3]  # from the second paragraph on: ratios, machine, table
        notes = {"Where dfm-prefect stands": SUMMARY}
        notes.update({name: text for name, text in NOTES.items() if name in ran})
        extra = "".join(f"\n## {title}\n\n{note.strip()}\n" for title, note in notes.items())
        (ROOT / "BENCHMARKS.md").write_text("\n".join(header) + "\n\n" + body.rstrip("\n") + "\n" + extra)
        return 0
    notes = {"Where dfm-prefect stands": SUMMARY} if "--only" not in results["command"] else {}
    notes.update({name: text for name, text in NOTES.items() if name in ran or (name == "peer" and "peer" in ran)})
    (ROOT / "BENCHMARKS.md").write_text(
        markdown(
            rows,
            machine=results["machine"],
            command=results["command"],
            notes=notes,
            started=dt.datetime.fromisoformat(results["date"]),
            seconds=results.get("seconds", float("nan")),
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
