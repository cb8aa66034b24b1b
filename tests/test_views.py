"""Views: a gridded intermediate stays a recipe at its site until its bytes are needed.

A real `SiteWorker` in this process, asked through its message interface (the
path a transport takes). What is checked: nothing is written for a subset, the
chain's answer equals the direct computation, a fetch materializes and verifies,
a changed source fails the next use of an old view, an altered view is refused,
and the site's rules hold for views as for stored results.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dfm_prefect.core.errors import (
    AccessDeniedError,
    DisclosureRefusedError,
    ExportRefusedError,
    ResultIntegrityError,
    SourceChangedError,
)
from dfm_prefect.core.refs import Recipe
from tests.test_adapters_support import InProcessSite, small_climate

BOX = {"lat": {"start": 0, "stop": 60}, "time": {"start": "2001-02-01", "stop": "2001-10-31"}}


def stored(site: InProcessSite) -> dict[str, int]:
    """The result store's files (name -> bytes), without the store's key."""
    root = Path(site.worker.store.root)
    return {p.name: p.stat().st_size for p in root.iterdir() if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def data():
    return small_climate(seed=11).load()


@pytest.fixture
def site(tmp_path, data):
    data.chunk({"time": 50}).to_zarr(tmp_path / "t.zarr", zarr_format=2, consolidated=True)
    data.to_netcdf(tmp_path / "t.nc", engine="h5netcdf")
    shutil.copytree(tmp_path / "t.zarr", tmp_path / "copy.zarr")
    sources = [
        {"name": "zarr", "url": f"file://{tmp_path / 't.zarr'}"},
        {"name": "nc", "url": f"file://{tmp_path / 't.nc'}"},
        {"name": "copied", "url": f"file://{tmp_path / 'copy.zarr'}", "views": False},
    ]
    with InProcessSite(tmp_path / "store", sources) as site:
        yield site


def test_a_subset_is_a_view_that_writes_nothing(site):
    box = site.ref("xarray.subset", data="zarr", variables=["temperature"], ranges=BOX)
    assert box.is_view and box.uri.startswith("view:")
    assert stored(site) == {}
    # The summary is the same as a stored copy's: dims, coordinate ranges, size in memory.
    assert box.summary["dims"] == {"time": 273, "lat": 6, "lon": 36}
    assert box.size == box.summary["nbytes"] > 0
    assert box.recipe == Recipe(
        op="xarray.subset",
        version="1",
        params={"data": "zarr", "variables": ["temperature"], "ranges": BOX},  # what was asked; defaults left out
        sources={"zarr": box.recipe.sources["zarr"]},
    )
    assert len(box.recipe.sources["zarr"]) == 32
    assert site.worker.stats().bytes_stored == 0


@pytest.mark.parametrize("source", ["zarr", "nc"])
def test_a_chain_of_views_gives_the_direct_answer_and_stores_only_the_aggregate(site, data, source):
    box = site.ref("xarray.subset", data=source, variables=["temperature"], ranges=BOX)
    warm = site.ref("xarray.derive", data=box, variables={"celsius": "temperature - 273.15"})
    assert warm.is_view
    stats = site.call("xarray.moments", data=warm, dims=["lat", "lon"], groupby="time.month")
    direct = data["temperature"].sel(lat=slice(0, 60), time=slice("2001-02-01", "2001-10-31")) - 273.15
    np.testing.assert_allclose(stats["celsius__wx"].values, direct.groupby("time.month").sum(dim=["time", "lat", "lon"]).values, rtol=1e-5)
    names = list(stored(site))
    assert len(names) == 1 and ".aggregate-n" in names[0]
    moments = site.ref("xarray.moments", data=warm, dims=["lat", "lon"])
    steps = moments.lineage().split(" → ")
    assert steps[0] == source
    assert steps[1].startswith('xarray.subset(variables=["temperature"], ranges={"lat":{"start":0,"stop":60},"time":')
    assert steps[2] == 'xarray.derive(variables={"celsius":"temperature - 273.15"})'
    assert steps[3] == 'xarray.moments(dims=["lat","lon"])'


def test_a_fetch_materializes_the_view_once_and_checks_it(site, data):
    box = site.ref("xarray.subset", data="zarr", variables=["temperature"], ranges=BOX)
    first = site.call_fetch(box)
    expected = data[["temperature"]].sel(lat=slice(0, 60), time=slice("2001-02-01", "2001-10-31"))
    xr.testing.assert_equal(first, expected)
    copies = stored(site)
    assert len(copies) == 1 and ".dataset." in next(iter(copies))
    xr.testing.assert_equal(site.call_fetch(box), expected)
    assert stored(site) == copies  # the second fetch reads the same copy
    assert site.worker.stats().bytes_stored == next(iter(copies.values()))


def test_a_damaged_copy_is_never_sent(site, data):
    box = site.ref("xarray.subset", data="zarr", variables=["temperature"], ranges=BOX)
    site.call_fetch(box)
    (name,) = stored(site)
    path = Path(site.worker.store.root) / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    # The damaged copy fails its sha256 check; the site materializes the view again.
    expected = data[["temperature"]].sel(lat=slice(0, 60), time=slice("2001-02-01", "2001-10-31"))
    xr.testing.assert_equal(site.call_fetch(box), expected)
    assert len(stored(site)) == 2


@pytest.mark.parametrize("change", ["rewrite_chunk", "replace_store", "touch_netcdf"])
def test_a_changed_source_fails_the_next_use_of_an_old_view(site, tmp_path, change):
    source = "nc" if change == "touch_netcdf" else "zarr"
    box = site.ref("xarray.subset", data=source, variables=["temperature"], ranges=BOX)
    site.call("xarray.moments", data=box, dims=["lat", "lon"])  # fine while the source is as it was
    if change == "rewrite_chunk":
        chunk = tmp_path / "t.zarr" / "temperature" / "0.0.0"
        chunk.write_bytes(chunk.read_bytes())  # same bytes, rewritten: a change all the same
    elif change == "replace_store":
        shutil.rmtree(tmp_path / "t.zarr")
        shutil.copytree(tmp_path / "copy.zarr", tmp_path / "t.zarr")
    else:
        os.utime(tmp_path / "t.nc", ns=(1, 1))
    with pytest.raises(SourceChangedError, match=r"is a view of '(zarr|nc)', which changed since the view was made"):
        site.call("xarray.moments", data=box, dims=["lat", "lon"])
    with pytest.raises(SourceChangedError):
        site.call_fetch(box)
    # A new view of the source as it is now works, and the site kept serving.
    fresh = site.ref("xarray.subset", data=source, variables=["temperature"], ranges=BOX)
    assert site.call("xarray.moments", data=fresh, dims=["lat", "lon"]) is not None


def test_an_altered_view_is_refused(site):
    box = site.ref("xarray.subset", data="zarr", variables=["temperature"], ranges=BOX)
    wider = box.recipe.model_copy(update={"params": {**box.recipe.params, "ranges": {}}})
    forged = [
        box.model_copy(update={"recipe": wider}),
        box.model_copy(update={"kind": "aggregate"}),
        box.model_copy(update={"site": "other"}),
        box.model_copy(update={"uri": "view:" + "0" * 32}),
        box.model_copy(update={"recipe": None}),
        box.model_copy(update={"size": 1}),  # the size the export policy first decides on
    ]
    for ref in forged:
        with pytest.raises(AccessDeniedError):
            site.call("xarray.moments", data=ref.model_dump(mode="json"), dims=["lat", "lon"])
        with pytest.raises(AccessDeniedError):
            site.call_fetch(ref)
    # The summary is not part of what the view stands for: changing it changes nothing the site computes.
    relabelled = box.model_copy(update={"summary": {"dims": {"time": 1}}})
    assert site.call("xarray.moments", data=relabelled.model_dump(mode="json"), dims=["lat", "lon"]) is not None


def test_a_view_of_another_site_is_refused(site, tmp_path, data):
    with InProcessSite(tmp_path / "other-store", [{"name": "zarr", "url": f"file://{tmp_path / 't.zarr'}"}], name="other") as other:
        theirs = other.ref("xarray.subset", data="zarr", ranges=BOX)
    with pytest.raises(AccessDeniedError, match="held by site 'other'"):
        site.call("xarray.moments", data=theirs.model_dump(mode="json"), dims=["lat", "lon"])


def test_the_export_policy_decides_on_a_view_before_anything_is_computed(tmp_path, data):
    data.chunk({"time": 50}).to_zarr(tmp_path / "t.zarr", zarr_format=2, consolidated=True)
    sources = [{"name": "zarr", "url": f"file://{tmp_path / 't.zarr'}"}]
    export = {"kinds": ["aggregate", "value"], "max_bytes": 1 << 20}
    with InProcessSite(tmp_path / "store", sources, export=export) as site:
        box = site.ref("xarray.subset", data="zarr", ranges=BOX)
        # Kept in, the view shows its structure only, like a stored dataset would.
        assert "min" not in box.summary["coords"]["lat"] and box.summary["dims"] == ["lat", "lon", "time"]
        with pytest.raises(ExportRefusedError, match="results of kind 'dataset' may not leave this site"):
            site.call_fetch(box)
        assert stored(site) == {}  # refused before it was materialized
    with InProcessSite(tmp_path / "store2", sources, export={**export, "kinds": ["dataset"], "max_bytes": 1000}) as site:
        box = site.ref("xarray.subset", data="zarr", ranges=BOX)
        with pytest.raises(ExportRefusedError, match="lets at most 1000 bytes leave"):
            site.call_fetch(box)


def test_disclosure_checks_run_again_when_a_view_is_recomputed(tmp_path, data):
    data.chunk({"time": 50}).to_zarr(tmp_path / "t.zarr", zarr_format=2, consolidated=True)
    sources = [{"name": "zarr", "url": f"file://{tmp_path / 't.zarr'}"}]
    export = {"kinds": ["aggregate", "dataset"], "disclosure": {"min_subset_size": 2}}
    with InProcessSite(tmp_path / "store", sources, export=export) as site:
        one = {"lat": {"start": 5, "stop": 5}, "lon": {"start": 5, "stop": 5}, "time": {"start": "2001-01-01", "stop": "2001-01-01"}}
        with pytest.raises(DisclosureRefusedError):
            site.ref("xarray.subset", data="zarr", ranges=one)
        box = site.ref("xarray.subset", data="zarr", ranges=BOX)
    # The same view brought to a site with stricter rules (same store key, same sources) is checked by its rules.
    strict = {"kinds": ["aggregate", "dataset"], "disclosure": {"min_subset_size": 10**6}}
    with InProcessSite(tmp_path / "store", sources, export=strict) as site:
        with pytest.raises(DisclosureRefusedError):
            site.call("xarray.moments", data=box.model_dump(mode="json"), dims=["lat", "lon"])


def test_what_stays_stored(site):
    # A source its administrator marks `views: false` gets stored copies.
    copied = site.ref("xarray.subset", data="copied", ranges=BOX)
    assert not copied.is_view and copied.size > 0
    # xarray.write stores on purpose, also from a view.
    box = site.ref("xarray.subset", data="zarr", ranges=BOX)
    written = site.ref("xarray.write", data=box, format="zarr")
    assert not written.is_view and written.format == "zarr"
    assert written.lineage().startswith("zarr → xarray.subset(")
    # Results that are not lazy gridded data (aggregates, values, tables) are stored as before.
    assert not site.ref("xarray.moments", data=box, dims=["lat", "lon"]).is_view


def test_a_stored_copy_that_disappears_fails_a_view_over_it_clearly(site):
    written = site.ref("xarray.write", data="zarr")
    box = site.ref("xarray.subset", data=written, ranges=BOX)
    assert box.is_view
    os.remove(site.worker.store.check_owned(written))
    with pytest.raises(ResultIntegrityError, match="missing from the store"):
        site.call("xarray.moments", data=box, dims=["lat", "lon"])
