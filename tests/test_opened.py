"""Opened sources kept between requests: reused while the files are unchanged, opened again once they change.

An in-process site worker (real files, the threaded Dask scheduler) runs the
requests, so the test can count how often the site opened a source.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dfm_prefect.core.wire import Envelope, RunRequest, RunResult
from dfm_prefect.testing.climate import ClimateSpec, make_region, write_zarr
from site_workers import opened, views
from site_workers.config import parse_site_config
from site_workers.worker import SiteWorker
from tests.support_sites import Answers

BOX = {"lat": {"start": 0.0, "stop": 45.0}, "lon": {"start": 10.0, "stop": 90.0}}


def write_grid(path: Path, offset: float) -> float:
    lat, lon = np.linspace(-89.0, 89.0, 90), np.linspace(0.0, 358.0, 180)
    data = (offset + np.random.default_rng(0).standard_normal((6, lat.size, lon.size))).astype("float32")
    ds = xr.Dataset({"t2m": (("time", "lat", "lon"), data)}, coords={"time": np.arange(6), "lat": lat, "lon": lon})
    tmp = path.with_suffix(".tmp")
    ds.to_netcdf(tmp, engine="h5netcdf")
    os.replace(tmp, path)
    return float(ds["t2m"].sel(lat=slice(0.0, 45.0), lon=slice(10.0, 90.0)).mean())


@pytest.fixture
def lab(tmp_path: Path):
    expected = write_grid(tmp_path / "grid.nc", 280.0)
    write_zarr(make_region(ClimateSpec(years=1, resolution=8.0, chunk_days=122), -90.0, 90.0), str(tmp_path / "field.zarr"))
    config = parse_site_config(
        {
            "name": "lab",
            "operations": ["xarray.subset", "xarray.reduce", "core.echo"],
            "sources": [
                {"name": "grid", "url": f"file://{tmp_path / 'grid.nc'}"},
                {"name": "field", "url": f"file://{tmp_path / 'field.zarr'}"},
            ],
            "result_store": {"url": f"file://{tmp_path / 'store'}"},
            "export": {"kinds": ["aggregate"], "max_bytes": 1 << 20},
            "compute": {"kind": "threads"},
        }
    )
    worker = SiteWorker(config)
    yield worker, tmp_path, expected
    worker.close()


def run(worker: SiteWorker, op: str, params: dict) -> RunResult:
    answers = Answers()
    worker.handle_frame(Envelope(messages=[RunRequest(id=f"r-{time.monotonic_ns()}", op=op, params=params)]).model_dump_json(), answers, "test-peer")
    reply = next(m for m in answers.wait(1, timeout=60) if isinstance(m, RunResult))
    assert reply.ok, reply.error
    return reply


def box_mean(worker: SiteWorker, source: str, variable: str) -> float:
    ranges = BOX if source == "grid" else {"lat": BOX["lat"]}
    box = run(worker, "xarray.subset", {"data": source, "ranges": ranges})
    assert box.ref is not None and box.ref.is_view
    mean = run(worker, "xarray.reduce", {"data": box.ref.model_dump(mode="json"), "dims": list(box.ref.summary["dims"]), "stat": "mean"})
    assert mean.ref is not None
    return float(worker.store.open_value(mean.ref)[variable])


def test_a_pipeline_of_steps_opens_its_source_once(lab):
    worker, _, expected = lab
    for _ in range(3):
        assert box_mean(worker, "grid", "t2m") == pytest.approx(expected, rel=1e-6)
    assert worker.opened.opened == 1  # three subsets and three views recomputed under the reductions


def test_a_replaced_file_is_opened_again_and_gives_the_new_numbers(lab):
    worker, root, first = lab
    assert box_mean(worker, "grid", "t2m") == pytest.approx(first, rel=1e-6)
    second = write_grid(root / "grid.nc", 300.0)
    assert abs(second - first) > 10
    assert box_mean(worker, "grid", "t2m") == pytest.approx(second, rel=1e-6)
    assert worker.opened.opened == 2


def test_a_rewritten_zarr_chunk_is_seen(lab):
    worker, root, _ = lab
    before = box_mean(worker, "field", "temperature")
    chunk = next(p for p in sorted((root / "field.zarr" / "temperature").rglob("*")) if p.is_file() and not p.name.startswith((".", "zarr")))
    ds = xr.open_zarr(str(root / "field.zarr"))
    ds["temperature"][:] = ds["temperature"] + 50.0
    ds[["temperature"]].to_zarr(str(root / "field.zarr"), mode="r+")
    assert chunk.exists()
    after = box_mean(worker, "field", "temperature")
    assert after == pytest.approx(before + 50.0, rel=1e-5)
    assert worker.opened.opened == 2


def test_requests_that_open_a_source_at_once_share_one_opening(lab, monkeypatch):
    worker, _, _ = lab
    slow_open = opened.open_location

    def slow(location):
        time.sleep(0.5)  # long enough for every request to arrive while the first one opens
        return slow_open(location)

    monkeypatch.setattr(opened, "open_location", slow)
    location = worker.resolver.resolve("grid")
    with ThreadPoolExecutor(4) as pool:
        values = list(pool.map(lambda _: worker.opened.open(location), range(4)))
    assert worker.opened.opened == 1
    assert len({id(value) for value in values}) == 4  # each request still has its own copy


def test_a_removed_file_is_let_go(lab):
    worker, root, expected = lab
    assert box_mean(worker, "grid", "t2m") == pytest.approx(expected, rel=1e-6)
    assert len(worker.opened) == 1
    (root / "grid.nc").unlink()
    answers = Answers()
    worker.handle_frame(Envelope(messages=[RunRequest(id="gone", op="xarray.subset", params={"data": "grid", "ranges": BOX})]).model_dump_json(), answers, "test-peer")
    reply = next(m for m in answers.wait(1, timeout=60) if isinstance(m, RunResult))
    assert not reply.ok
    assert len(worker.opened) == 0  # not kept open: its disk space is freed


def test_what_one_request_changes_on_its_dataset_another_never_sees(lab):
    worker, _, _ = lab
    location = worker.resolver.resolve("grid")
    first = worker.opened.open(location)
    first.attrs["note"] = "changed by one request"
    first["t2m"].attrs["units"] = "changed"
    first["extra"] = first["t2m"] * 2
    second = worker.opened.open(location)
    assert "note" not in second.attrs and second["t2m"].attrs.get("units") != "changed" and "extra" not in second
    assert worker.opened.opened == 1


def test_what_one_request_changes_in_place_in_attributes_another_never_sees(tmp_path: Path):
    from site_workers.opened import OpenedSources
    from site_workers.sources import Location

    ds = xr.Dataset({"t": (("x",), np.arange(3.0), {"flags": np.array([1, 2, 3])})}, attrs={"valid_range": np.array([0.0, 100.0])})
    ds.to_netcdf(tmp_path / "a.nc", engine="h5netcdf")
    opened = OpenedSources(lambda location: "unchanged")
    where = Location(protocol="file", path=str(tmp_path / "a.nc"), format="netcdf")
    first = opened.open(where)
    first.attrs["valid_range"][0] = -999.0
    first["t"].attrs["flags"][0] = 777
    again = opened.open(where)
    assert opened.opened == 1
    assert list(again.attrs["valid_range"]) == [0.0, 100.0] and list(again["t"].attrs["flags"]) == [1, 2, 3]


def test_locations_that_share_a_url_are_kept_apart_and_unstamped_sources_are_opened_each_time(tmp_path: Path):
    from site_workers.opened import OpenedSources
    from site_workers.sources import Location

    xr.Dataset({"t": (("x",), np.arange(3.0))}).to_netcdf(tmp_path / "a.nc", engine="h5netcdf")
    opened = OpenedSources(lambda location: "unchanged")
    path = str(tmp_path / "a.nc")
    opened.open(Location(protocol="file", path=path, format="netcdf"))
    with pytest.raises(Exception):  # noqa: B017 - what the zarr reader says of a netCDF file varies by version
        opened.open(Location(protocol="file", path=path, format="zarr"))  # not the netCDF opened above
    opened.open(Location(protocol="file", path=path, format="netcdf", root=str(tmp_path)))  # another boundary: its own entry
    assert opened.opened == 2  # the zarr reader failed before it opened anything
    for _ in range(2):
        opened.open(Location(protocol="file", path=path, format="netcdf", views=False))  # the site does not trust its stamps
    assert opened.opened == 4


def test_a_request_looks_at_a_stores_files_once(lab, monkeypatch):
    """Cache key, recipe, opening and the views it recomputes: one walk of a zarr store's chunk files per request."""
    worker, _, _ = lab
    walked: list[str] = []
    look = views._local_stamps

    def counted(path: str) -> list:
        walked.append(path)
        return look(path)

    monkeypatch.setattr(views, "_local_stamps", counted)
    box = run(worker, "xarray.subset", {"data": "field", "ranges": {"lat": BOX["lat"]}})
    assert len(walked) == 1, walked  # its recipe and its opening
    run(worker, "xarray.reduce", {"data": box.ref.model_dump(mode="json"), "dims": list(box.ref.summary["dims"]), "stat": "mean"})
    assert len(walked) == 2, walked  # the view's check and its opening again


def test_a_source_rewritten_after_a_request_first_looked_refuses_the_view_it_recomputes(tmp_path: Path, monkeypatch):
    """The cache key's look comes first; the store changes before the view is checked: refused, never other numbers."""
    region = make_region(ClimateSpec(years=1, resolution=8.0, chunk_days=122), -90.0, 90.0)
    write_zarr(region, str(tmp_path / "field.zarr"))
    config = {
        "name": "lab",
        "operations": ["xarray.subset", "xarray.reduce"],
        "sources": [{"name": "field", "url": f"file://{tmp_path / 'field.zarr'}"}],
        "result_store": {"url": f"file://{tmp_path / 'store'}"},
        "export": {"kinds": ["aggregate"], "max_bytes": 1 << 20},
        "compute": {"kind": "threads"},
        "cache": {"operations": ["xarray.reduce"]},
    }
    worker = SiteWorker(parse_site_config(config))
    try:
        box = run(worker, "xarray.subset", {"data": "field", "ranges": {"lat": BOX["lat"]}})
        look, rewrites = views._local_stamps, [region + 100.0]

        def rewritten_after_the_first_look(path: str) -> list:
            stamps = look(path)
            if rewrites:
                write_zarr(rewrites.pop(), str(tmp_path / "field.zarr"))  # the administrator rewrites the store
            return stamps

        monkeypatch.setattr(views, "_local_stamps", rewritten_after_the_first_look)
        answers = Answers()
        params = {"data": box.ref.model_dump(mode="json"), "dims": list(box.ref.summary["dims"]), "stat": "mean"}
        worker.handle_frame(Envelope(messages=[RunRequest(id="after", op="xarray.reduce", params=params)]).model_dump_json(), answers, "test-peer")
        reply = next(m for m in answers.wait(1, timeout=60) if isinstance(m, RunResult))
        assert not reply.ok and reply.error is not None and reply.error.code == "source_changed", reply
    finally:
        worker.close()
