"""xarray operations at a site (in process), on local zarr, netCDF and memory:// sources.

Each answer is checked against the same computation done directly with
xarray/NumPy on the data in memory.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import xarray as xr

from dfm_prefect.core.errors import AccessDeniedError, InvalidParametersError
from tests.test_adapters_support import InProcessSite, small_climate


@pytest.fixture(scope="module")
def data():
    return small_climate(seed=5).load()


@pytest.fixture(scope="module")
def site(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("xarray-ops")
    data.chunk({"time": 50}).to_zarr(root / "t.zarr", zarr_format=2, consolidated=True)
    data.to_netcdf(root / "t.nc", engine="h5netcdf")
    memory = f"memory://dfm-test-{uuid.uuid4().hex}/t.zarr"
    data.chunk({"time": 100}).to_zarr(memory, zarr_format=2, consolidated=True)
    sources = [
        {"name": "zarr", "url": f"file://{root / 't.zarr'}"},
        {"name": "nc", "url": f"file://{root / 't.nc'}"},
        {"name": "mem", "url": memory},
    ]
    with InProcessSite(root / "store", sources) as site:
        yield site


@pytest.mark.parametrize("source", ["zarr", "nc", "mem"])
@pytest.mark.parametrize("stat", ["mean", "sum", "min", "max", "std", "var", "count", "median"])
def test_reduce_matches_xarray_on_every_source(site, data, source, stat):
    result = site.call("xarray.reduce", data=source, dims=["time", "lon"], stat=stat)
    expected = getattr(data, stat)(dim=["time", "lon"])
    xr.testing.assert_allclose(result, expected.astype(result.temperature.dtype) if stat == "count" else expected, rtol=1e-5)


def test_quantile_streams_over_the_kept_dimensions(site, data):
    result = site.call("xarray.reduce", data="zarr", variables=["temperature"], dims=["time"], stat="quantile", q=0.25)
    np.testing.assert_allclose(result["temperature"].values, data["temperature"].quantile(0.25, dim="time").values, rtol=1e-6)
    with pytest.raises(InvalidParametersError, match="needs q"):
        site.call("xarray.reduce", data="zarr", dims=["time"], stat="quantile")


def test_open_describes_a_source_without_data(site, data):
    described = site.call("xarray.open", data="mem", variables=["temperature"])
    assert described["dims"] == {"time": 400, "lat": 18, "lon": 36}
    assert described["coords"]["lat"]["min"] == pytest.approx(-85.0)
    assert described["data_vars"]["temperature"]["chunks"]["shape"] == {"time": 100, "lat": 18, "lon": 36}
    assert described["data_vars"]["temperature"]["attrs"] == {"units": "K"}
    assert described["attrs"]["title"] == "test field"


def test_subset_by_range_point_and_nearest(site, data):
    box = site.call("xarray.subset", data="zarr", ranges={"lat": {"start": 0, "stop": 40}}, nearest={"lon": 101.0})
    expected = data.sel(lat=slice(0, 40)).sel(lon=101.0, method="nearest")
    xr.testing.assert_allclose(box, expected)


def test_moments_are_the_weighted_sums_of_the_data(site, data):
    result = site.call("xarray.moments", data="nc", variables=["temperature"], dims=["lat", "lon"], groupby="time.year", weights="area")
    x = data["temperature"].astype("float64")
    w = np.cos(np.deg2rad(data["lat"])) * x.notnull()
    expected_wx = (x * w).groupby("time.year").sum(dim=["time", "lat", "lon"])
    np.testing.assert_allclose(result["temperature__wx"].values, expected_wx.values, rtol=1e-12)
    np.testing.assert_allclose(result["temperature__w"].values, w.groupby("time.year").sum(dim=["time", "lat", "lon"]).values, rtol=1e-12)
    assert result["temperature__n"].dtype == np.int64
    assert int(result["temperature__n"].sum()) == int(x.notnull().sum())


def test_weighted_mean_by_area_and_by_a_weights_variable(site, data):
    area = site.call("xarray.weighted_mean", data="zarr", variables=["temperature"], dims=["lat", "lon"])
    w = np.cos(np.deg2rad(data["lat"]))
    expected = data["temperature"].astype("float64").weighted(w).mean(dim=["lat", "lon"])
    np.testing.assert_allclose(area["temperature"].values, expected.values, rtol=1e-10)
    by_pressure = site.call("xarray.weighted_mean", data="zarr", dims=["time", "lat", "lon"], weights="pressure")
    p = data["pressure"].fillna(0.0)
    t = data["temperature"].astype("float64")
    assert float(by_pressure["temperature"]) == pytest.approx(float((t * p).sum() / (t.notnull() * p).sum()), rel=1e-10)


def test_histogram_counts_every_value_once(site, data):
    edges = [200.0, 270.0, 290.0, 300.0, 310.0]
    result = site.call("xarray.histogram", data="mem", variables=["temperature"], bins=edges)
    x = data["temperature"].values.astype("float64").ravel()
    finite = x[~np.isnan(x)]
    np.testing.assert_array_equal(result["temperature__count"].values, np.histogram(finite, edges)[0])
    assert int(result["temperature__above"]) == int((finite > 310).sum())
    assert int(result["temperature__nan"]) == int(np.isnan(x).sum())
    total = int(result["temperature__count"].sum() + result["temperature__below"] + result["temperature__above"] + result["temperature__nan"])
    assert total == x.size


def _float64_histogram(x: np.ndarray, edges: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Counts (and weights) per bin from a float64 copy, out-of-range and NaN values taken out first."""
    x = x.astype("float64")
    nan, below, above = np.isnan(x), x < edges[0], x > edges[-1]
    inside = ~(nan | below | above)
    n = len(edges) - 1
    out = [np.histogram(x[inside], bins=n, range=(edges[0], edges[-1]))[0], [below.sum(), above.sum(), nan.sum()]]
    if w is not None:
        out += [np.histogram(x[inside], bins=n, range=(edges[0], edges[-1]), weights=w[inside])[0], [w[below].sum(), w[above].sum(), w[nan].sum()]]
    return np.concatenate(out).astype("float64")


@pytest.mark.parametrize(("start", "stop", "count"), [(200, 330, 90), (0.1, 0.7, 3), (-1.7, 3.3, 7), (1e-3, 2e-3, 17), (-5, 5, 1000)])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32"])
def test_equal_bins_count_as_on_a_float64_copy_on_and_next_to_every_edge(start, stop, count, dtype):
    """The host path bins blocks as they are (no float64 copy): values on, just below and just above each edge land alike."""
    from adapters.xarray_stats import _block_histogram

    edges = np.linspace(start, stop, count + 1)
    near = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf)]).astype("float32")
    near = np.concatenate([near, np.nextafter(near, np.float32(-np.inf)), np.nextafter(near, np.float32(np.inf))])
    rng = np.random.default_rng(3)
    spread = rng.uniform(start - 1, stop + 1, 20_000).astype("float32")
    x = np.concatenate([near, spread, np.array([np.nan, -np.inf, np.inf, 0.0], dtype="float32")])
    x = (x * 1000).clip(-2e9, 2e9).round() if dtype == "int32" else x
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(dtype) if dtype == "int32" else x.astype(dtype)
    w = rng.uniform(0.0, 2.0, x.size)
    counted = _block_histogram(x, edges=edges, uniform=True, ndim=1, weighted=False).ravel()
    np.testing.assert_array_equal(counted, _float64_histogram(x, edges))
    weighted = _block_histogram(x, w, edges=edges, uniform=True, ndim=1, weighted=True).ravel()
    expected = _float64_histogram(x, edges, w)
    np.testing.assert_array_equal(weighted[: count + 3], expected[: count + 3])
    np.testing.assert_allclose(weighted[count + 3 :], expected[count + 3 :], rtol=1e-12, atol=1e-9)


def test_histogram_rejects_edges_that_are_not_increasing(site):
    with pytest.raises(InvalidParametersError, match="strictly increasing"):
        site.call("xarray.histogram", data="zarr", bins=[1.0, 1.0, 2.0])


def test_groupby_and_resample_in_time(site, data):
    seasonal = site.call("xarray.groupby_reduce", data="zarr", variables=["temperature"], group="time.season", stat="max", dims=["lon"])
    xr.testing.assert_allclose(seasonal, data[["temperature"]].groupby("time.season").max(dim=["time", "lon"]))
    monthly = site.call("xarray.resample", data="nc", variables=["temperature"], freq="MS", stat="mean")
    xr.testing.assert_allclose(monthly, data[["temperature"]].resample(time="MS").mean(), rtol=1e-5)
    with pytest.raises(InvalidParametersError, match="freq"):
        site.call("xarray.resample", data="nc", freq="1D; import os")


def test_derive_then_reduce_where_the_derived_data_is(site, data):
    derived = site.ref("xarray.derive", data="zarr", variables={"celsius": "temperature - 273.15", "ratio": "pressure / temperature"})
    assert derived.kind == "dataset" and set(derived.summary["data_vars"]) == {"celsius", "ratio"}
    means = site.call("xarray.reduce", data=derived.model_dump(), dims=["time", "lat", "lon"], stat="mean")
    assert float(means["celsius"]) == pytest.approx(float(data["temperature"].mean()) - 273.15, rel=1e-5)
    assert float(means["ratio"]) == pytest.approx(float((data["pressure"] / data["temperature"]).mean()), rel=1e-6)


def test_derive_refuses_code_and_unknown_names(site):
    with pytest.raises(InvalidParametersError, match="unknown function 'open'"):
        site.call("xarray.derive", data="zarr", variables={"x": "open(temperature)"})
    with pytest.raises(InvalidParametersError, match=r"names \['humidity'\]"):
        site.call("xarray.derive", data="zarr", variables={"x": "humidity * 2"})


@pytest.mark.parametrize("fmt", ["netcdf", "zarr"])
def test_write_stores_a_copy_that_later_operations_read(site, data, fmt):
    ref = site.ref("xarray.write", data="zarr", variables=["temperature"], format=fmt, chunks={"time": 200})
    assert ref.format == fmt and ref.kind == "dataset"
    assert site.worker.store.verify(ref)  # stored with its sha256
    back = site.call("xarray.reduce", data=ref.model_dump(), dims=["time"], stat="max")
    xr.testing.assert_allclose(back, data[["temperature"]].max(dim="time"))


def test_sources_outside_the_site_are_refused(site):
    with pytest.raises(AccessDeniedError):
        site.call("xarray.reduce", data="memory://elsewhere/t.zarr", dims=["time"])
