"""Shared fixtures: a real Prefect API, a real S3 endpoint, and real site processes.

Everything binds to 127.0.0.1 and is stopped when the session ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dfm_prefect.testing.climate import ClimateSpec, make_region, write_zarr
from dfm_prefect.testing.prefect_server import LocalPrefectServer
from dfm_prefect.testing.s3 import DEMO_CREDENTIALS, LocalS3
from dfm_prefect.transports.local.launcher import LocalFederation

ROOT = Path(__file__).resolve().parents[1]
SMALL = ClimateSpec(years=2, resolution=5.0, chunk_days=120)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `prefect server start` (sqlite) on a free loopback port, used by every flow in the session."""
    with LocalPrefectServer(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


@pytest.fixture(scope="session")
def s3() -> Iterator[LocalS3]:
    """moto's S3 server on a free loopback port (real HTTP)."""
    with LocalS3() as server:
        yield server


@pytest.fixture(scope="session")
def climate_data(tmp_path_factory: pytest.TempPathFactory, s3: LocalS3) -> dict[str, str]:
    """Small synthetic hemispheres: north as local zarr, south as zarr on S3."""
    root = tmp_path_factory.mktemp("climate")
    north = root / "north.zarr"
    south = root / "south.zarr"
    write_zarr(make_region(SMALL, 0.0, 90.0), str(north))
    write_zarr(make_region(SMALL, -90.0, 0.0), str(south))
    fs = s3.filesystem()
    fs.mkdir("climate")
    fs.put(str(south), "s3://climate/south/temperature.zarr", recursive=True)
    return {"north": f"file://{north}", "south": "s3://climate/south/temperature.zarr", "south_local": f"file://{south}"}


def site_config(name: str, store: Path, sources: list[dict[str, object]], **overrides: object) -> dict[str, object]:
    config: dict[str, object] = {
        "name": name,
        "operations": ["core.echo", "core.sleep", "xarray.subset", "xarray.moments", "xarray.moments_stream", "xarray.reduce", "testing.flaky"],
        "operation_modules": ["tests.site_ops"],
        "sources": sources,
        "result_store": {"url": f"file://{store}"},
        "export": {"kinds": ["aggregate", "value"], "max_bytes": 1 << 20, "inline_bytes": 64 << 10},
        "limits": {"concurrency": 4},
    }
    config.update(overrides)
    return config


S3_OPTIONS = {
    "key": "${env:AWS_ACCESS_KEY_ID}",
    "secret": "${env:AWS_SECRET_ACCESS_KEY}",
    "client_kwargs": {"endpoint_url": "${env:DFM_TEST_S3_ENDPOINT}"},
}


def climate_site_configs(root: Path, climate_data: dict[str, str]) -> list[Path]:
    """The two test sites: north (local zarr) and south (S3 zarr), with their stores under ``root``."""
    configs = []
    for name, sources in {
        "north": [{"name": "temperature", "url": climate_data["north"]}],
        "south": [{"name": "temperature", "url": climate_data["south"], "storage_options": S3_OPTIONS}],
    }.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(site_config(name, root / "store" / name, sources)))
        configs.append(path)
    return configs


def _climate_sites(federation_class: Any, root: Path, climate_data: dict[str, str], s3: LocalS3) -> Iterator[Any]:
    """The two climate sites (north local zarr, south S3 zarr) started by ``federation_class``, stopped after."""
    configs = climate_site_configs(root, climate_data)
    env = {**DEMO_CREDENTIALS, "DFM_TEST_S3_ENDPOINT": s3.endpoint_url}
    fed = federation_class(configs, workdir=root, env=env, pythonpath=[str(ROOT)])
    fed.start()
    try:
        yield fed
    finally:
        from dfm_prefect.client import close_clients

        close_clients()
        fed.stop()


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory, climate_data: dict[str, str], s3: LocalS3) -> Iterator[LocalFederation]:
    """Two real site processes over the local transport: north (local zarr) and south (S3 zarr)."""
    yield from _climate_sites(LocalFederation, tmp_path_factory.mktemp("federation"), climate_data, s3)


@pytest.fixture(scope="session")
def flare_federation(tmp_path_factory: pytest.TempPathFactory, climate_data: dict[str, str], s3: LocalS3) -> Iterator[Any]:
    """The same two sites behind NVIDIA FLARE: a POC on 127.0.0.1 (mTLS kits, one supervised mesh job).

    Started once per session, on first use, and stopped with every process it started.
    """
    from dfm_prefect.transports.flare.deploy.launcher import FlareFederation

    yield from _climate_sites(FlareFederation, tmp_path_factory.mktemp("flare-federation"), climate_data, s3)


TRANSPORTS = ["local", pytest.param("flare", marks=pytest.mark.flare)]


@pytest.fixture(params=TRANSPORTS)
def any_federation(request: pytest.FixtureRequest) -> Any:
    """The session's two-site federation over each transport in turn (for tests that must pass on both)."""
    return request.getfixturevalue("federation" if request.param == "local" else "flare_federation")


@pytest.fixture
def runner(federation: LocalFederation, prefect_api: str):
    """A fresh FederationTaskRunner for the session federation."""
    from dfm_prefect.task_runner import FederationTaskRunner

    return FederationTaskRunner(federation.federation_file)


@pytest.fixture
def client(federation: LocalFederation):
    from dfm_prefect.client import get_client

    return get_client(federation.federation_file)


def read_task_runs(flow_run_id: str) -> list:
    """Task runs of a flow run, as the Prefect API records them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs: list = []
    with get_client(sync_client=True) as api:
        while True:
            page = api.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200, offset=len(runs)
            )
            runs.extend(page)
            if len(page) < 200:
                return runs


def wait_for_task_runs(flow_run_id: str, count: int, predicate=lambda run: True, timeout: float = 60.0) -> list:
    """Task-run records arrive through Prefect's event pipeline; wait until ``count`` match."""
    deadline = time.monotonic() + timeout
    runs: list = []
    while time.monotonic() < deadline:
        runs = [run for run in read_task_runs(flow_run_id) if predicate(run)]
        if len(runs) >= count:
            return runs
        time.sleep(0.5)  # the API offers no notification for recorded events
    return runs


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT

