"""Run the federated climate demo end to end and check it against direct computation.

Two sites hold one hemisphere each of a synthetic daily temperature field:
``north`` reads local zarr, ``south`` reads zarr from S3 (moto's server on
127.0.0.1). The flow `flows.federated_climate_stats` computes global yearly
statistics with only partial sums leaving the sites; the demo then computes the
same statistics directly on the pooled raw data and says whether they agree,
and draws the federated answer to ``<workdir>/federated-climate-stats.png``
(the flow run shows the same picture as an artifact).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.testing.climate import ClimateSpec, make_region, write_zarr
from dfm_prefect.testing.s3 import DEMO_CREDENTIALS, LocalS3
from dfm_prefect.transports import launcher_class

BUCKET = "dfm-south"
S3_KEY = "climate/temperature.zarr"
RTOL = 1e-9
PICTURE = "federated-climate-stats.png"


@dataclass
class StepRow:
    name: str
    site: str
    state: str
    seconds: float


@dataclass
class DemoReport:
    """What the demo measured; `ok` is True when federated and direct answers agree."""

    answer: dict[int, dict[str, float]]
    direct: dict[int, dict[str, float]]
    max_rel_diff: float
    ok: bool
    steps: list[StepRow] = field(default_factory=list)
    bytes_out: dict[str, int] = field(default_factory=dict)
    raw_bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    flow_run_id: str | None = None
    transport: str = "flare"
    stored: dict[str, dict[str, int]] = field(default_factory=dict)
    """Bytes each site's result store gained during the flow run, by result kind (views write nothing)."""
    picture: str | None = None
    """The PNG of the federated answer (pooled yearly mean and spread, values per year)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def prepare_data(workdir: Path, spec: ClimateSpec) -> dict[str, Path]:
    """Write each hemisphere as zarr under ``workdir/data`` (reused if the spec is unchanged)."""
    data = workdir / "data"
    marker = data / "spec.json"
    paths = {"north": data / "north.zarr", "south": data / "south.zarr"}
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec) and all(p.exists() for p in paths.values()):
        return paths
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    write_zarr(make_region(spec, 0.0, 90.0), str(paths["north"]))
    write_zarr(make_region(spec, -90.0, 0.0), str(paths["south"]))
    marker.write_text(json.dumps(asdict(spec)))
    return paths


def upload(s3: LocalS3, local: Path) -> str:
    fs = s3.filesystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    url = f"s3://{BUCKET}/{S3_KEY}"
    fs.put(str(local), url, recursive=True)
    return url


def site_configs(workdir: Path, north: Path, south_url: str) -> list[Path]:
    """Write the two site configs: local zarr for north, S3 for south (credentials from env)."""
    sites = workdir / "sites"
    sites.mkdir(parents=True, exist_ok=True)
    common = {
        "operations": ["core.echo", "xarray.subset", "xarray.moments", "xarray.reduce"],
        "export": {"kinds": ["aggregate", "value"], "max_bytes": 1 << 20, "inline_bytes": 256 << 10},
        "limits": {"concurrency": 2},
    }
    north_cfg = {
        "name": "north",
        **common,
        "sources": [{"name": "temperature", "url": f"file://{north}", "description": "northern hemisphere, daily"}],
        "result_store": {"url": f"file://{workdir / 'store' / 'north'}"},
    }
    south_cfg = {
        "name": "south",
        **common,
        "sources": [
            {
                "name": "temperature",
                "url": south_url,
                "description": "southern hemisphere, daily, on S3",
                "storage_options": {
                    "key": "${env:AWS_ACCESS_KEY_ID}",
                    "secret": "${env:AWS_SECRET_ACCESS_KEY}",
                    "client_kwargs": {"endpoint_url": "${env:DFM_DEMO_S3_ENDPOINT}"},
                },
            }
        ],
        "result_store": {"url": f"file://{workdir / 'store' / 'south'}"},
    }
    paths = []
    for cfg in (north_cfg, south_cfg):
        path = sites / f"{cfg['name']}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        paths.append(path)
    return paths


def store_usage(store: Path) -> dict[str, int]:
    """Bytes in a site's result store by result kind (from the names it gives results: ``<id>.<kind>[-n<count>].<format>``)."""
    usage: dict[str, int] = {}
    if store.is_dir():
        for path in store.iterdir():
            parts = path.name.split(".")
            if len(parts) == 3 and len(parts[0]) == 32:
                kind = parts[1].split("-")[0]
                usage[kind] = usage.get(kind, 0) + path.stat().st_size
    return usage


def _gained(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {kind: after[kind] - before.get(kind, 0) for kind in sorted(after) if after[kind] != before.get(kind, 0)}


def direct_statistics(north: Path, s3: LocalS3, south_url: str, start: str, stop: str) -> dict[int, dict[str, float]]:
    """The same statistics computed the conventional way: all raw data pooled in one place."""
    import numpy as np
    import xarray as xr

    parts = [
        xr.open_zarr(str(north)),
        xr.open_zarr(s3.filesystem().get_mapper(south_url)),
    ]
    ds = xr.concat(parts, dim="lat").sortby("lat").sel(time=slice(start, stop))
    t = ds["temperature"].astype("float64")
    w = np.cos(np.deg2rad(ds["lat"])) * t.notnull()
    grouped = xr.Dataset({"w": w, "wx": t * w, "wxx": t * t * w, "n": t.notnull().astype("int64")})
    sums = grouped.groupby("time.year").sum(dim=["time", "lat", "lon"]).compute()
    out = {}
    for year in sums["year"].values:
        s = sums.sel(year=year)
        mean = float(s.wx / s.w)
        out[int(year)] = {"mean": mean, "std": float(np.sqrt(max(float(s.wxx / s.w) - mean * mean, 0.0))), "n": int(s.n)}
    return out


def _max_rel_diff(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]]) -> float:
    if set(a) != set(b):
        return float("inf")
    worst = 0.0
    for year in a:
        for key in ("mean", "std"):
            worst = max(worst, abs(a[year][key] - b[year][key]) / max(abs(b[year][key]), 1e-300))
        if a[year]["n"] != b[year]["n"]:
            return float("inf")
    return worst


def _steps(flow_run_id: str) -> list[StepRow]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    rows = []
    for run in sorted(runs, key=lambda r: r.start_time or r.expected_start_time or 0):
        site = next((tag.split(":", 1)[1] for tag in run.tags if tag.startswith("site:")), "client")
        rows.append(StepRow(run.name, site, run.state_name or "?", float(run.total_run_time.total_seconds())))
    return rows


def draw_answer(answer: dict[int, dict[str, float]], path: Path) -> Path:
    """Draw the federated yearly statistics to ``path`` (PNG)."""
    from dfm_prefect.pictures import yearly_statistics_png

    path.write_bytes(yearly_statistics_png(answer))
    return path


DEMO_FLOW = "flows.federated_climate_stats:federated_climate_stats"
"""The example flow the demo runs, by entrypoint (as a Prefect deployment names it)."""


def load_flow(entrypoint: str) -> Any:
    """The flow object at ``module:name`` (the demo runs whichever flow it is given)."""
    import importlib

    module, _, name = entrypoint.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load the flow {entrypoint!r}: {exc}") from None


def run_demo(
    workdir: Path,
    spec: ClimateSpec = ClimateSpec(),
    *,
    start: str | None = None,
    stop: str | None = None,
    log: Any = print,
    transport: str = "flare",
    flow_entrypoint: str = DEMO_FLOW,
) -> DemoReport:
    """Set everything up under ``workdir``, run the flow, compare with the direct answer."""
    from dfm_prefect.client import close_clients, get_client
    from dfm_prefect.task_runner import FederationTaskRunner

    federated_climate_stats = load_flow(flow_entrypoint)
    launcher = launcher_class(transport)

    start = start or f"{spec.start_year + min(1, spec.years - 1)}-01-01"
    stop = stop or f"{spec.start_year + spec.years - 1}-12-31"
    workdir = workdir.resolve()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    log(f"preparing {spec.raw_bytes / 1e6:.0f} MB of synthetic daily temperature (made once, then reused)")
    paths = prepare_data(workdir, spec)
    seconds["data"] = time.perf_counter() - t0
    log(f"data: {spec.raw_bytes / 1e6:.0f} MB of daily temperature, {spec.years} years at {spec.resolution} degrees")

    with LocalS3() as s3:
        t0 = time.perf_counter()
        south_url = upload(s3, paths["south"])
        seconds["upload"] = time.perf_counter() - t0
        log(f"south's data is on a local S3 server ({s3.endpoint_url})")
        configs = site_configs(workdir, paths["north"], south_url)
        env = {**DEMO_CREDENTIALS, "DFM_DEMO_S3_ENDPOINT": s3.endpoint_url}
        t0 = time.perf_counter()
        federation = launcher(configs, workdir=workdir / "federation", env=env)
        if hasattr(federation, "on_step"):
            federation.on_step = log  # each stage of a FLARE start (kits, server, clients, mesh job)
        with federation:
            seconds["federation_up"] = time.perf_counter() - t0
            log(f"federation over {transport}: sites north (local zarr) and south ({south_url} via {s3.endpoint_url}) are up")
            client = get_client(federation.federation_file)
            before = {site: client.stats(site).bytes_out for site in client.sites}
            stores = {site: workdir / "store" / site for site in client.sites}
            usage = {site: store_usage(store) for site, store in stores.items()}
            raw = {site: sum(s.size or 0 for s in info.sources) for site, info in client.sites.items()}
            flow = federated_climate_stats.with_options(task_runner=FederationTaskRunner(federation.federation_file))
            log("running the flow (its operations run at the sites; only partial sums come back)")
            t0 = time.perf_counter()
            state = flow(datasets=["dfm://north/temperature", "dfm://south/temperature"], start=start, stop=stop, return_state=True)
            seconds["flow"] = time.perf_counter() - t0
            answer = state.result()
            flow_run_id = str(state.state_details.flow_run_id)
            bytes_out = {site: client.stats(site).bytes_out - before[site] for site in before}
            stored = {site: _gained(usage[site], store_usage(store)) for site, store in stores.items()}
            close_clients()
        log("flow finished; computing the same statistics directly on the pooled data, to compare")
        t0 = time.perf_counter()
        direct = direct_statistics(paths["north"], s3, south_url, start, stop)
        seconds["direct"] = time.perf_counter() - t0
    # zarr opens its own asynchronous s3fs clients and never closes them; aiohttp
    # would complain about their sessions at interpreter exit. Nothing leaks: the
    # S3 server is gone by then.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)

    picture = draw_answer(answer, workdir / PICTURE)
    log(f"picture of the federated answer: {picture}")
    worst = _max_rel_diff(answer, direct)
    return DemoReport(
        answer=answer,
        direct=direct,
        max_rel_diff=worst,
        ok=worst <= RTOL,
        steps=_steps(flow_run_id),
        bytes_out=bytes_out,
        raw_bytes=raw,
        seconds=seconds,
        flow_run_id=flow_run_id,
        transport=transport,
        stored=stored,
        picture=str(picture),
    )
