"""Views: the demo flow at growing sizes, with intermediates as views and as stored copies, against direct computation.

The demo's data and sites (``north`` local zarr, ``south`` zarr on S3 through
moto's server on 127.0.0.1) at 2, 4, 8 and 16 years of a daily 1-degree field.
For each size, in one run:

* **views**: the demo flow as it ships; ``xarray.subset`` is a view and
  ``xarray.moments`` reads the source once, in one Dask graph;
* **stored copies**: the same flow with the sources marked ``views: false``, so
  every subset is written to the result store with its sha256 and read back (how
  every dataset result was kept before views);
* **direct**: the same statistics computed in this process on the pooled raw data
  (`dfm_prefect.demo.direct_statistics`), the baseline.

Figures: the flow run's wall time as its caller sees it (a running Prefect API,
so no temporary server; Prefect's own ~1 s per flow run included), the subset
step's time at the sites (as the sites timed it, from the flow run's report), and the bytes each run wrote to the sites' result
stores. Every run's answer is checked against the direct one.

    python -m bench --only views                                   # 2, 4, 8, 16 years
    DFM_BENCH_VIEWS_YEARS=2 python -m bench --only views --rounds 1 --no-write
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from bench.harness import Row, median, with_ratios

BASELINE = "direct on the pooled data"
VARIANTS = ("views", "stored copies")


def _sizes() -> list[int]:
    return [int(y) for y in os.environ.get("DFM_BENCH_VIEWS_YEARS", "2,4,8,16").split(",") if y.strip()]


def _configs(paths: list[Path], views: bool, root: Path) -> list[Path]:
    """The demo's site configs, with ``views`` set on every source and a store of their own."""
    out = []
    root.mkdir(parents=True, exist_ok=True)
    for path in paths:
        config = yaml.safe_load(path.read_text())
        for source in config["sources"]:
            source["views"] = views
        config["result_store"] = {"url": f"file://{root / 'store' / config['name']}"}
        target = root / path.name
        target.write_text(yaml.safe_dump(config, sort_keys=False))
        out.append(target)
    return out


def _subset_seconds(flow_run_id: str) -> float:
    """The slowest site's ``xarray.subset`` as the site timed it (from the flow run's report; the sites run theirs at once)."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as api:
        artifacts = api.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    rows = [row for a in artifacts if a.type == "table" and a.task_run_id is None for row in json.loads(a.data)]
    return max((row["duration_s"] for row in rows if row["op"] == "xarray.subset"), default=float("nan"))


def run(env: Any, *, rounds: int = 2) -> list[Row]:
    """Per size: flow wall time with views and with stored copies, direct computation, store bytes per run."""
    from dfm_prefect.client import close_clients, get_client
    from dfm_prefect.demo import (
        DEMO_CREDENTIALS,
        DEMO_FLOW,
        _gained,
        _max_rel_diff,
        direct_statistics,
        load_flow,
        prepare_data,
        site_configs,
        store_usage,
        upload,
    )
    from dfm_prefect.task_runner import FederationTaskRunner
    from dfm_prefect.testing.climate import ClimateSpec
    from dfm_prefect.testing.s3 import LocalS3
    from dfm_prefect.transports.local.launcher import LocalFederation

    rounds = max(1, min(rounds, 3))
    flow = load_flow(DEMO_FLOW)
    rows: list[Row] = []
    for years in _sizes():
        spec = ClimateSpec(years=years)
        root = Path(env.root) / "views" / f"{years}y"
        t0 = time.perf_counter()
        paths = prepare_data(root, spec)
        start, stop = f"{spec.start_year + 1}-01-01", f"{spec.start_year + years - 1}-12-31"
        print(f"views: {years} years, {spec.raw_bytes / 1e6:.0f} MB of raw data ready in {time.perf_counter() - t0:.0f}s", flush=True)
        with LocalS3() as s3:
            south_url = upload(s3, paths["south"])
            demo_configs = site_configs(root, paths["north"], south_url)
            env_vars = {**DEMO_CREDENTIALS, "DFM_DEMO_S3_ENDPOINT": s3.endpoint_url}
            times: dict[str, list[float]] = {name: [] for name in (*VARIANTS, BASELINE)}
            subset_times: dict[str, list[float]] = {name: [] for name in VARIANTS}
            written: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for variant in VARIANTS:
                configs = _configs(demo_configs, variant == "views", root / variant.replace(" ", "-"))
                with LocalFederation(configs, workdir=root / variant.replace(" ", "-") / "federation", env=env_vars) as fed:
                    client = get_client(fed.federation_file)
                    runner_flow = flow.with_options(task_runner=FederationTaskRunner(fed.federation_file))
                    stores = [Path(yaml.safe_load(p.read_text())["result_store"]["url"][len("file://") :]) for p in configs]
                    args = {"datasets": ["dfm://north/temperature", "dfm://south/temperature"], "start": start, "stop": stop}
                    runner_flow(**args)  # warm: the sites' first open of each source, imports
                    for _ in range(rounds):
                        before = [store_usage(store) for store in stores]
                        t0 = time.perf_counter()
                        state = runner_flow(**args, return_state=True)
                        times[variant].append(time.perf_counter() - t0)
                        answer = state.result()
                        gained = [_gained(b, store_usage(store)) for b, store in zip(before, stores)]
                        written[variant].append(float(sum(sum(kinds.values()) for kinds in gained)))
                        subset_times[variant].append(_subset_seconds(str(state.state_details.flow_run_id)))
                        if _max_rel_diff(answer, direct_statistics(paths["north"], s3, south_url, start, stop)) > 1e-9:
                            raise RuntimeError(f"views bench: the {variant} answer at {years} years differs from the direct one")
                    client.close()
                close_clients()
            for _ in range(rounds):
                t0 = time.perf_counter()
                direct_statistics(paths["north"], s3, south_url, start, stop)
                times[BASELINE].append(time.perf_counter() - t0)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        print(
            f"views: {years} years: views {median(times['views']):.2f}s, stored copies {median(times['stored copies']):.2f}s, "
            f"direct {median(times[BASELINE]):.2f}s; written per run {median(written['views']) / 1e6:.2f} MB with views, "
            f"{median(written['stored copies']) / 1e6:.1f} MB with copies",
            flush=True,
        )
        bench = f"views:{years}y"
        note = f"{spec.raw_bytes / 1e6:.0f} MB raw ({years} years at 1°), answers agree"
        size_rows = [
            *(Row(bench, name, "flow wall time", median(times[name]), "s", rounds, note=note) for name in (*VARIANTS, BASELINE)),
            *(Row(bench, name, "subset step at the sites", median(subset_times[name]), "s", rounds) for name in VARIANTS),
            *(Row(bench, name, "store bytes written per run", median(written[name]) / 1e6, "MB", rounds) for name in VARIANTS),
        ]
        rows += with_ratios(size_rows, BASELINE)
    return rows
