"""Federated statistics over two real site processes, merged on the client, equal the pooled ones.

``east`` holds the northern hemisphere as local zarr and computes on a CPU
cluster it starts (``compute: cpu``); ``west`` holds the southern hemisphere
down to 60°S (so the two sites weigh differently) as zarr on S3 (moto's server,
real HTTP), asks for ``compute: auto`` and, with no GPU here, falls back to the
CPU. Flows run on a real Prefect API with `FederationTaskRunner`; only sums and
counts leave the sites.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
from prefect import flow, task

from adapters.combine import combine_histograms, combine_moments
from adapters.xarray_ops import histogram, moments, open_source
from dfm_prefect.testing.s3 import DEMO_CREDENTIALS
from dfm_prefect.transports.local.launcher import LocalFederation
from site_workers.compute import gpu_unavailable
from tests.conftest import ROOT
from tests.test_adapters_support import small_climate

pytestmark = pytest.mark.slow
BUCKET = "dfm-federated"
EDGES = {"start": 240.0, "stop": 330.0, "count": 45}


@pytest.fixture(scope="module")
def hemispheres():
    north = small_climate(seed=21, lat=(0.0, 90.0), days=730).load()
    south = small_climate(seed=22, lat=(-60.0, 0.0), days=730).load()
    south["temperature"] = south["temperature"] - 6.0  # the hemispheres differ, as real ones do
    return north, south


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, hemispheres, s3):
    root = tmp_path_factory.mktemp("federated")
    north, south = hemispheres
    north.chunk({"time": 100}).to_zarr(root / "north.zarr", zarr_format=2, consolidated=True)
    fs = s3.filesystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    south.chunk({"time": 100}).to_zarr(fs.get_mapper(f"{BUCKET}/south.zarr"), zarr_format=2, consolidated=True)
    wards = pd.DataFrame({"ward": ["a", "b", "c"] * 50, "beds": np.arange(150)})
    wards.to_parquet(root / "wards.parquet", index=False)
    s3_options = {
        "key": "${env:AWS_ACCESS_KEY_ID}",
        "secret": "${env:AWS_SECRET_ACCESS_KEY}",
        "client_kwargs": {"endpoint_url": "${env:DFM_FED_S3_ENDPOINT}"},
    }
    operations = ["xarray.open", "xarray.moments", "xarray.histogram", "xarray.reduce", "table.groupby_aggregate"]
    # These tests check exact pooling, bin by bin; the disclosure minimum is tested in test_disclosure.py.
    export = {"kinds": ["aggregate", "value"], "max_bytes": 1 << 20, "inline_bytes": 256 << 10, "disclosure": {"min_group_size": 1}}
    configs = {
        "east": {
            "sources": [
                {"name": "temperature", "url": f"file://{root / 'north.zarr'}"},
                {"name": "wards", "url": f"file://{root / 'wards.parquet'}"},
            ],
            "compute": {"kind": "cpu", "workers": 1, "threads_per_worker": 2, "memory_limit": "1GiB"},
        },
        "west": {
            "sources": [{"name": "temperature", "url": f"s3://{BUCKET}/south.zarr", "storage_options": s3_options}],
            "compute": {"kind": "auto", "workers": 1},
        },
    }
    paths = []
    for name, extra in configs.items():
        config = {"name": name, "operations": operations, "result_store": {"url": f"file://{root / 'store' / name}"}, "export": export, **extra}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        paths.append(path)
    env = {**DEMO_CREDENTIALS, "DFM_FED_S3_ENDPOINT": s3.endpoint_url}
    with LocalFederation(paths, workdir=root / "run", env=env, pythonpath=[str(ROOT)]) as federation:
        yield federation
    from dfm_prefect.client import close_clients

    close_clients()


@pytest.fixture
def runner(mesh, prefect_api):
    from dfm_prefect.task_runner import FederationTaskRunner

    return FederationTaskRunner(mesh.federation_file)


def pooled(hemispheres):
    north, south = hemispheres
    return xr.concat([south, north], dim="lat")["temperature"].astype("float64")


def test_pooled_mean_and_variance_from_site_sums(runner, hemispheres):
    @task
    def merge(parts):
        return combine_moments([part.fetch() for part in parts])

    @flow(task_runner=runner)
    def yearly():
        parts = [
            moments.submit(data=f"dfm://{site}/temperature", dims=["lat", "lon"], groupby="time.year", weights="area")
            for site in ("east", "west")
        ]
        return [part.result() for part in parts], merge(parts)

    refs, stats = yearly()
    assert {ref.site for ref in refs} == {"east", "west"}
    assert all(ref.kind == "aggregate" for ref in refs)

    t = pooled(hemispheres)
    w = np.cos(np.deg2rad(t["lat"])) * t.notnull()
    mean = (t * w).groupby("time.year").sum(dim=["time", "lat", "lon"]) / w.groupby("time.year").sum(dim=["time", "lat", "lon"])
    anomaly = (t - mean.sel(year=t["time.year"]).drop_vars("year")) ** 2
    var = (anomaly * w).groupby("time.year").sum(dim=["time", "lat", "lon"]) / w.groupby("time.year").sum(dim=["time", "lat", "lon"])
    np.testing.assert_allclose(stats["temperature_mean"].values, mean.values, rtol=1e-12)
    np.testing.assert_allclose(stats["temperature_var"].values, var.values, rtol=1e-9)
    np.testing.assert_array_equal(stats["temperature_n"].values, t.notnull().groupby("time.year").sum(dim=["time", "lat", "lon"]).values)

    # What a naive federation would report, the mean of the two site means, is not the pooled mean.
    site_means = [float(r.fetch()["temperature__wx"].sum() / r.fetch()["temperature__w"].sum()) for r in refs]
    assert abs(np.mean(site_means) - float((t * w).sum() / w.sum())) > 1e-3


def test_pooled_histogram_from_site_counts(runner, hemispheres):
    @flow(task_runner=runner)
    def counts():
        return [histogram.submit(data=f"dfm://{site}/temperature", bins=EDGES).result() for site in ("east", "west")]

    merged = combine_histograms([ref.fetch() for ref in counts()])
    values = pooled(hemispheres).values.ravel()
    finite = values[~np.isnan(values)]
    edges = np.linspace(EDGES["start"], EDGES["stop"], EDGES["count"] + 1)
    np.testing.assert_array_equal(merged["temperature__count"].values, np.histogram(finite, edges)[0])
    assert int(merged["temperature__below"]) == int((finite < edges[0]).sum())
    assert int(merged["temperature__above"]) == int((finite > edges[-1]).sum())
    assert int(merged["temperature__nan"]) == int(np.isnan(values).sum())


def test_histograms_with_different_bins_do_not_merge(runner):
    @flow(task_runner=runner)
    def mismatched():
        east = histogram.submit(data="dfm://east/temperature", bins=EDGES)
        west = histogram.submit(data="dfm://west/temperature", bins={**EDGES, "count": 10})
        return east.result(), west.result()

    east, west = mismatched()
    with pytest.raises(ValueError, match="different bin edges"):
        combine_histograms([east.fetch(), west.fetch()])


def test_catalog_lists_what_each_site_holds(mesh, hemispheres):
    from dfm_prefect.client import get_client

    client = get_client(mesh.federation_file)
    client.refresh()
    sites = client.sites
    west = {s.name: s for s in sites["west"].sources}["temperature"]
    assert west.format == "zarr" and west.url == f"s3://{BUCKET}/south.zarr"
    summary = west.summary
    assert summary["dims"] == {"time": 730, "lat": 6, "lon": 36}
    assert summary["coords"]["lat"]["min"] == pytest.approx(-55.0) and summary["coords"]["lat"]["max"] == pytest.approx(-5.0)
    assert summary["coords"]["time"]["min"].startswith("2001-01-01")
    temperature = summary["data_vars"]["temperature"]
    assert temperature["dtype"] == "float32" and temperature["units"] == "K"
    assert temperature["chunks"]["shape"]["time"] == 100
    assert west.size == summary["nbytes"] == int(hemispheres[1].nbytes)
    wards = {s.name: s for s in sites["east"].sources}["wards"].summary
    assert set(wards["columns"]) == {"ward", "beds"} and wards["columns"]["beds"] == "int64"
    assert wards["rows"] == 150


def test_sites_report_their_compute_and_auto_says_why_it_fell_back(mesh):
    from dfm_prefect.client import get_client

    if gpu_unavailable() is None:
        pytest.skip("this machine has a GPU: auto picks it")
    sites = get_client(mesh.federation_file).sites
    assert sites["east"].compute == "cpu" and sites["west"].compute == "cpu"
    log = (mesh.workdir / "logs" / "west.log").read_text()
    assert "compute: auto found no usable GPU" in log and "running Dask on the CPU" in log


def test_open_describes_a_remote_source_through_a_flow(runner):
    @flow(task_runner=runner)
    def describe():
        return open_source.submit(data="dfm://west/temperature").result()

    described = describe().fetch()
    assert described["data_vars"]["temperature"]["attrs"] == {"units": "K"}
