"""Site compute backends: a memory-limited CPU cluster, an existing scheduler, the GPU fallback.

Sites run in this process (`InProcessSite`) so that the tests can look at the
backend's cluster: how much memory its workers used, whether one restarted.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from dfm_prefect.core.errors import ConfigError
from site_workers.compute import ArrayModule, DistributedBackend, gpu_unavailable, register_backend
from site_workers.config import ComputeConfig, parse_site_config
from tests.test_adapters_support import InProcessSite, small_climate

MEMORY_LIMIT = 400 << 20
STEPS, NLAT, NLON, CHUNK = 3296, 256, 512, 32  # float32: 1.73 GB, 4.1x the workers' memory


def _write_big_field(path: str) -> dict[str, float]:
    """A (time, lat, lon) float32 field written chunk by chunk; returns its sums computed the same way."""
    import zarr

    lat = np.linspace(-89.75, 89.75, NLAT)
    root = zarr.open_group(path, mode="w", zarr_format=2)
    field = root.create_array(
        "field", shape=(STEPS, NLAT, NLON), chunks=(CHUNK, NLAT, NLON), dtype="float32",
        fill_value=float("nan"), attributes={"_ARRAY_DIMENSIONS": ["time", "lat", "lon"]},
    )
    for name, values in (("time", np.arange(STEPS)), ("lat", lat), ("lon", np.linspace(0.35, 359.65, NLON))):
        root.create_array(name, shape=values.shape, dtype=values.dtype, attributes={"_ARRAY_DIMENSIONS": [name]})[:] = values
    # Lat-dependent values with a time cycle compress well, so the test writes little to disk.
    base = (np.round(np.cos(np.deg2rad(lat)) * 40) / 4).astype("float32")[:, None] + np.zeros((1, NLON), "float32")
    sums = {"n": 0.0, "sum": 0.0, "sumsq": 0.0}
    for start in range(0, STEPS, CHUNK):
        steps = np.arange(start, start + CHUNK)
        block = base[None] + ((steps % 17) * 0.25).astype("float32")[:, None, None]
        block[steps % 97 == 0, 0, :] = np.nan
        field[start : start + CHUNK] = block
        values = block.astype("float64")
        valid = ~np.isnan(values)
        sums["n"] += valid.sum()
        sums["sum"] += values[valid].sum()
        sums["sumsq"] += (values[valid] ** 2).sum()
    zarr.consolidate_metadata(path)
    return sums


def _peak_rss() -> int:
    """This process's peak resident memory since it started (VmHWM; ru_maxrss would count its parent's from before exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@pytest.mark.slow
def test_cpu_cluster_reduces_data_four_times_its_memory_limit(tmp_path):
    expected = _write_big_field(str(tmp_path / "big.zarr"))
    compute = {"kind": "cpu", "workers": 1, "threads_per_worker": 1, "memory_limit": "400MiB"}
    with InProcessSite(tmp_path / "store", [{"name": "big", "url": f"file://{tmp_path / 'big.zarr'}"}], compute=compute) as site:
        (entry,) = site.worker.catalog.entries()
        assert entry.summary["nbytes"] >= 4 * MEMORY_LIMIT
        client = site.worker.compute.client
        workers = client.run(os.getpid)

        result = site.call("xarray.moments", data="big", dims=["time", "lat", "lon"])

        assert int(result["field__n"]) == expected["n"]
        assert float(result["field__wx"]) == pytest.approx(expected["sum"], rel=1e-12)
        assert float(result["field__wxx"]) == pytest.approx(expected["sumsq"], rel=1e-12)
        # The same worker process did all of it, and never held more than its limit.
        assert client.run(os.getpid) == workers
        assert max(client.run(_peak_rss).values()) < MEMORY_LIMIT


@pytest.fixture(scope="module")
def climate_zarr(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("compute") / "t.zarr"
    small_climate(seed=3).to_zarr(path, zarr_format=2, consolidated=True)
    return f"file://{path}"


CASES = [
    ("xarray.reduce", {"dims": ["time", "lon"], "stat": "std"}),
    ("xarray.moments", {"dims": ["lat", "lon"], "groupby": "time.month", "weights": "area"}),
    ("xarray.weighted_mean", {"dims": ["lat", "lon"]}),
    ("xarray.histogram", {"bins": {"start": 250, "stop": 330, "count": 16}, "weights": "area"}),
    ("xarray.groupby_reduce", {"group": "time.season", "stat": "max", "dims": ["lon"]}),
    ("xarray.resample", {"freq": "MS", "stat": "mean", "dims": ["lat", "lon"]}),
]


def _assert_same(a, b) -> None:
    import xarray as xr

    assert set(a.data_vars) == set(b.data_vars)
    xr.testing.assert_allclose(a, b, rtol=1e-6)


def test_auto_falls_back_to_a_cpu_cluster_and_says_why(tmp_path, climate_zarr, caplog):
    if gpu_unavailable() is None:
        pytest.skip("this machine has a usable GPU: auto picks it")
    sources = [{"name": "t", "url": climate_zarr}]
    with caplog.at_level(logging.WARNING, logger="dfm_prefect.site.compute"):
        auto = InProcessSite(tmp_path / "auto", sources, compute={"kind": "auto", "workers": 1})
    with auto, InProcessSite(tmp_path / "threads", sources) as reference:
        assert auto.worker.describe().compute == "cpu"
        assert isinstance(auto.worker.compute, DistributedBackend) and auto.worker.compute.device == "cpu"
        assert any("no usable GPU" in r.message and "on the CPU" in r.message for r in caplog.records)
        for op, params in CASES:
            _assert_same(auto.call(op, data="t", **params), reference.call(op, data="t", **params))


def test_gpu_kind_without_a_gpu_is_refused_with_what_to_do(tmp_path):
    reason = gpu_unavailable()
    if reason is None:
        pytest.skip("this machine has a usable GPU")
    with pytest.raises(ConfigError, match="use kind: auto to fall back"):
        InProcessSite(tmp_path, [], compute={"kind": "gpu"})


def test_an_existing_scheduler_does_the_work(tmp_path, climate_zarr):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        before = cluster.scheduler.transition_counter
        compute = {"kind": "cpu", "scheduler_address": cluster.scheduler_address}
        with InProcessSite(tmp_path, [{"name": "t", "url": climate_zarr}], compute=compute) as site:
            result = site.call("xarray.reduce", data="t", dims=["time"], stat="max")
        assert result["temperature"].shape == (18, 36)
        assert cluster.scheduler.transition_counter > before


@pytest.mark.parametrize(
    ("compute", "message"),
    [
        ({"kind": "threads", "scheduler_address": "tcp://127.0.0.1:8786"}, "needs kind: cpu"),
        ({"kind": "cpu", "memory_limit": "lots"}, "memory_limit"),
        ({"kind": "quantum"}, "compute kind 'quantum' is not available"),
    ],
)
def test_compute_config_errors_say_what_is_wrong(tmp_path, compute, message):
    with pytest.raises(ConfigError, match=message):
        InProcessSite(tmp_path, [], compute=compute)


# -- the GPU code path, on the CPU ------------------------------------------------


class DeviceArray(np.ndarray):
    """Stands in for a CuPy array: arithmetic with a plain (host) array fails, as CuPy's does."""

    converted = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        host = [x for x in inputs if isinstance(x, np.ndarray) and not isinstance(x, DeviceArray) and x.ndim]
        if host:
            raise TypeError(f"{ufunc.__name__}: device and host arrays mixed")
        plain = [x.view(np.ndarray) if isinstance(x, DeviceArray) else x for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(x.view(np.ndarray) if isinstance(x, DeviceArray) else x for x in kwargs["out"])
        result = getattr(ufunc, method)(*plain, **kwargs)
        return result.view(DeviceArray) if isinstance(result, np.ndarray) else result

    def __array_function__(self, func, types, args, kwargs):
        # Like CuPy, NumPy functions (concatenate, stack, where, ...) keep device arrays on the device.
        result = super().__array_function__(func, types, args, kwargs)
        return result.view(DeviceArray) if type(result) is np.ndarray else result


def _to_device(block):
    DeviceArray.converted += 1
    return np.asarray(block).view(DeviceArray)


def _to_host(block):
    return np.array(block.view(np.ndarray))


def _empty(shape, dtype):
    return np.empty(shape, dtype).view(DeviceArray)


def test_device_code_path_keeps_every_operand_on_the_device(tmp_path, climate_zarr):
    """The GPU backend's path (chunks moved with to_device, results brought back) with a strict stand-in for CuPy."""
    from distributed import Client, LocalCluster

    def emulated(config: ComputeConfig) -> DistributedBackend:
        cluster = LocalCluster(n_workers=1, processes=False, dashboard_address=None)
        arrays = ArrayModule("emulated", _to_device, _to_host, _empty, DeviceArray)
        return DistributedBackend(Client(cluster, set_as_default=False), cluster, arrays=arrays, name="gpu")

    register_backend("emulated-gpu", emulated)
    sources = [{"name": "t", "url": climate_zarr}]
    with InProcessSite(tmp_path / "dev", sources, compute={"kind": "emulated-gpu"}) as device, InProcessSite(tmp_path / "host", sources) as host:
        assert device.worker.compute.device == "gpu"
        for op, params in CASES:
            DeviceArray.converted = 0
            on_device = device.call(op, data="t", **params)
            assert DeviceArray.converted > 0, f"{op} did not move its chunks to the device"
            assert all(type(var.data) is np.ndarray for var in on_device.data_vars.values())
            _assert_same(on_device, host.call(op, data="t", **params))


def test_site_config_accepts_the_documented_compute_section():
    config = parse_site_config(
        {
            "name": "s",
            "operations": [],
            "result_store": {"url": "file:///tmp/x"},
            "compute": {"kind": "cpu", "workers": 2, "threads_per_worker": 2, "memory_limit": "2GiB"},
        }
    )
    assert config.compute == ComputeConfig(kind="cpu", workers=2, threads_per_worker=2, memory_limit="2GiB")
