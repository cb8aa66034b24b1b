"""GPU sites: dask-cuda LocalCUDACluster with CuPy chunks gives the CPU's answers.

Skipped where there is no CUDA device, CuPy or dask-cuda (the CPU suite covers the
same code path with a strict CuPy stand-in in `tests/test_compute.py`). These
tests need neither Prefect nor a Prefect server: `scripts/gpu_check.sh` runs them
on a bare GPU machine with ``pytest --noconftest -m gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest

from site_workers.compute import gpu_unavailable
from tests.test_adapters_support import InProcessSite, small_climate

REASON = gpu_unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"no GPU site possible here: {REASON}")]

CASES = [
    ("xarray.reduce", {"dims": ["time"], "stat": "mean"}, 1e-5),
    ("xarray.reduce", {"dims": ["time", "lon"], "stat": "std"}, 1e-5),
    ("xarray.reduce", {"dims": ["time", "lat", "lon"], "stat": "min"}, 0),
    ("xarray.reduce", {"dims": ["time", "lat", "lon"], "stat": "max"}, 0),
    ("xarray.reduce", {"dims": ["time"], "stat": "count"}, 0),
    ("xarray.reduce", {"dims": ["time"], "stat": "quantile", "q": 0.9}, 1e-6),
    ("xarray.moments", {"dims": ["time", "lat", "lon"], "weights": "area"}, 1e-12),
    ("xarray.moments", {"dims": ["lat", "lon"], "groupby": "time.year", "weights": "area"}, 1e-12),
    ("xarray.weighted_mean", {"dims": ["lat", "lon"]}, 1e-9),
    ("xarray.histogram", {"bins": {"start": 250, "stop": 330, "count": 32}}, 0),
    ("xarray.histogram", {"bins": [200, 280, 300, 400], "weights": "area"}, 1e-12),
    ("xarray.groupby_reduce", {"group": "time.season", "stat": "mean", "dims": ["lon"]}, 1e-5),
    ("xarray.resample", {"freq": "MS", "stat": "max", "dims": ["lat", "lon"]}, 0),
]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    small_climate(seed=11, days=730, step=5.0).to_zarr(root / "t.zarr", zarr_format=2, consolidated=True)
    sources = [{"name": "t", "url": f"file://{root / 't.zarr'}"}]
    gpu = InProcessSite(root / "gpu-store", sources, name="gpu", compute={"kind": "gpu"})
    cpu = InProcessSite(root / "cpu-store", sources, name="cpu")
    yield gpu, cpu
    gpu.close()
    cpu.close()


def test_gpu_site_runs_on_dask_cuda(sites):
    gpu, _ = sites
    assert gpu.worker.describe().compute == "gpu"
    backend = gpu.worker.compute
    assert type(backend.cluster).__name__ == "LocalCUDACluster"
    import dask
    import xarray as xr

    chunk = backend.to_device(xr.DataArray(np.arange(12.0).reshape(3, 4), dims=("a", "b")).chunk({"a": 1}))
    (first,) = dask.compute(chunk.data.to_delayed().ravel()[0], scheduler=backend.client)
    assert type(first).__module__.startswith("cupy")


@pytest.mark.parametrize(("op", "params", "rtol"), CASES, ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(CASES)])
def test_gpu_and_cpu_sites_agree(sites, op, params, rtol):
    import xarray as xr

    gpu, cpu = sites
    on_gpu, on_cpu = gpu.call(op, data="t", **params), cpu.call(op, data="t", **params)
    assert all(type(var.data) is np.ndarray for var in on_gpu.data_vars.values())
    if rtol == 0:
        xr.testing.assert_identical(on_gpu, on_cpu)
    else:
        xr.testing.assert_allclose(on_gpu, on_cpu, rtol=rtol)


def test_auto_picks_the_gpu(tmp_path):
    with InProcessSite(tmp_path, [], compute={"kind": "auto"}) as site:
        assert site.worker.describe().compute == "gpu"
