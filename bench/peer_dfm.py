"""Head to head with NVIDIA's DFM (nv-dfm-core): the same small pipeline on both systems.

Pipeline: at one site, load a 24×90×180 float32 grid, cut a lat/lon box, take
the mean, bring the number to the client. NVIDIA DFM runs it on its local target
(multiprocessing) and its FLARE POC target, in its own virtual environment (it
pins nvflare 2.6) created here on first use; dfm-prefect runs it on its
transports. Both report wall time per execution (median) and for 20 executions
in a row, and both check every answer against the mean computed directly.

For dfm-prefect an "execution" is measured two ways: a whole Prefect flow run
(which carries ~1 s of Prefect's own flow-run overhead, mostly the heartbeat
thread join) and the pipeline inside an already running flow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.env import BenchEnv
from bench.harness import Row, median

NVDFM_VERSION = "3.1.31"
HERE = Path(__file__).resolve().parent
VENV = Path(os.environ.get("DFM_BENCH_NVDFM_VENV", Path.home() / ".cache" / "dfm-prefect" / "nvdfm-venv"))
BBOX = {"lat": {"start": 0.0, "stop": 45.0}, "lon": {"start": 10.0, "stop": 90.0}}
RUNS = 20


def ensure_venv() -> Path:
    """The nv-dfm-core virtual environment (created once, reused)."""
    python = VENV / "bin" / "python"
    marker = VENV / f".nv-dfm-core-{NVDFM_VERSION}"
    if marker.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"nv-dfm-core=={NVDFM_VERSION}"], check=True)
    marker.touch()
    return python


def run_nvdfm(targets: str = "local,flare", n: int = RUNS, *, two_site: bool = False) -> dict[str, Any]:
    """Run the DFM driver in its own environment; returns its JSON report.

    ``two_site``: the box is cut at one site and its mean taken at another (DFM sends the box between them).
    """
    python = ensure_venv()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    result = subprocess.run(
        [str(python), str(HERE / "nvdfm_driver.py"), "--n", str(n), "--targets", targets, *(["--two-site"] if two_site else [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"nv-dfm-core driver failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def make_grid(path: Path) -> float:
    """The same grid as the DFM driver (same seed), as netCDF4; returns the expected mean."""
    import numpy as np
    import xarray as xr

    lat = np.linspace(-89.0, 89.0, 90)
    lon = np.linspace(0.0, 358.0, 180)
    rng = np.random.default_rng(0)
    data = (280.0 + 10.0 * rng.standard_normal((24, lat.size, lon.size))).astype("float32")
    ds = xr.Dataset({"t2m": (("time", "lat", "lon"), data)}, coords={"time": np.arange(24), "lat": lat, "lon": lon})
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, engine="h5netcdf")
    return float(ds["t2m"].sel(lat=slice(0.0, 45.0), lon=slice(10.0, 90.0)).mean())


def _pipeline(expected: float) -> float:
    """Load + subset at the site, mean at the site, value to the client (inside a running flow)."""
    from adapters.xarray_ops import reduce, subset

    box = subset.submit(data="dfm://north/peer-grid", ranges=BBOX, site="north")
    mean = reduce.submit(data=box, dims=["time", "lat", "lon"], stat="mean")
    value = float(mean.result().fetch()["t2m"])
    if abs(value - expected) > 1e-4:
        raise RuntimeError(f"wrong answer: {value} != {expected}")
    return value


def processes(federation: Any) -> dict[str, list[int]]:
    """Who else does the work of an execution: the Prefect API, each site, the FLARE server (the flow's own process is `own_cpu_seconds`)."""
    from bench.load import _prefect_server_pid

    found = {"Prefect API server": [_prefect_server_pid()]}
    for site in getattr(federation, "sites", None) or list(federation.configs):
        found[f"site {site}"] = federation.site_pids(site)
    if hasattr(federation, "server_pids"):
        found["FLARE server"] = federation.server_pids()
    return found


def own_cpu_seconds() -> float:
    """User and system CPU of this process alone (its children are the servers and sites measured on their own)."""
    times = os.times()
    return times.user + times.system


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU of processes and their descendants, so far."""
    import psutil

    from bench.load import cpu_of, family

    return cpu_of(family(*(pid for pid in pids if psutil.pid_exists(pid))).values())


def run_ours(
    federation_file: Path,
    expected: float,
    label: str,
    *,
    pipeline: Any = _pipeline,
    bench: str = "peer: DFM pipeline",
    federation: Any = None,
) -> list[Row]:
    from prefect import flow

    from dfm_prefect.task_runner import FederationTaskRunner

    runner = FederationTaskRunner(federation_file)

    @flow(name="bench-peer-pipeline", task_runner=runner)
    def once() -> float:
        return pipeline(expected)

    @flow(name="bench-peer-pipeline-loop", task_runner=runner)
    def many(n: int) -> list[float]:
        times = []
        for _ in range(n + 1):
            start = time.perf_counter()
            pipeline(expected)
            times.append(time.perf_counter() - start)
        return times

    first, _ = _timed(once)
    flow_runs = [_timed(once)[0] for _ in range(RUNS)]
    who = processes(federation) if federation is not None else {}
    before = {name: cpu_seconds(pids) for name, pids in who.items()}
    own = own_cpu_seconds()
    inside = many(RUNS)[1:]
    cpu = {"client (the flow's process)": (own_cpu_seconds() - own) / (RUNS + 1)} if who else {}
    cpu.update({name: (cpu_seconds(pids) - before[name]) / (RUNS + 1) for name, pids in who.items()})
    variant = f"dfm-prefect {label}, inside one flow"
    profile = [Row(bench, variant, f"CPU per execution: {name}", seconds, "s", RUNS + 1) for name, seconds in cpu.items()]
    return profile + [
        Row(bench, f"dfm-prefect {label}, one flow run each", "first execution", first, "s", 1),
        Row(bench, f"dfm-prefect {label}, one flow run each", "per execution", median(flow_runs), "s", RUNS),
        Row(bench, f"dfm-prefect {label}, one flow run each", f"{RUNS} executions in a row", sum(flow_runs), "s", 1),
        Row(bench, f"dfm-prefect {label}, inside one flow", "per execution", median(inside), "s", RUNS),
        Row(bench, f"dfm-prefect {label}, inside one flow", f"{RUNS} executions in a row", sum(inside), "s", 1),
    ]


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def nvdfm_rows(report: dict[str, Any], bench: str = "peer: DFM pipeline") -> list[Row]:
    rows = []
    names = {"local": "nv-dfm-core local target", "flare": "nv-dfm-core FLARE POC target"}
    for target, name in names.items():
        data = report.get(target)
        if not data:
            continue
        if "error" in data:
            rows.append(Row(bench, name, "failed", float("nan"), "", 0, note=str(data["error"])[:200]))
            continue
        bad = data.get("executions_with_missing_or_wrong_result", 0)
        note = f"{bad} executions with missing or wrong results" if bad else ""
        rows += [
            Row(bench, name, "first execution", data["first_s"], "s", 1, note=note),
            Row(bench, name, "per execution", data["per_exec_median_s"], "s", data["n"]),
            Row(bench, name, f"{RUNS} executions in a row", data["twenty_s"], "s", 1),
        ]
    return rows


def run(env: BenchEnv, *, rounds: int = 5, include_flare: bool = True) -> list[Row]:
    """DFM (local, FLARE) against dfm-prefect on the local transport and on FLARE."""
    ours: dict[str, Any] = {"local": env.local_federation()}
    if include_flare:
        ours["FLARE"] = env.flare_federation()
    expected = env.peer_expected
    assert expected is not None
    rows = nvdfm_rows(run_nvdfm())
    for label, federation in ours.items():
        rows += run_ours(federation.federation_file, expected, label, federation=federation)
    baseline = {r.metric: r.median for r in rows if r.variant == "nv-dfm-core local target"}
    for row in rows:
        if row.metric in baseline and baseline[row.metric]:
            row.baseline, row.ratio = "nv-dfm-core local target", row.median / baseline[row.metric]
    return rows
