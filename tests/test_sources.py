"""A site reads only its declared sources and what lies under its data roots."""

from __future__ import annotations

import os
import uuid

import fsspec
import pytest

from dfm_prefect.core.errors import AccessDeniedError, InvalidParametersError
from site_workers.config import parse_site_config
from site_workers.sources import SourceResolver


@pytest.fixture
def resolver(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "x.nc").write_bytes(b"")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "s.nc").write_bytes(b"")
    os.symlink(secret, data / "escape")
    os.symlink(secret / "s.nc", data / "sub" / "z.nc")
    config = parse_site_config(
        {
            "name": "s",
            "operations": [],
            "sources": [{"name": "t", "url": f"file://{data}/t.zarr"}, {"name": "remote", "url": "s3://bucket/site/t.zarr"}],
            "data_roots": [{"url": f"file://{data}"}],
            "result_store": {"url": f"file://{tmp_path / 'store'}"},
        }
    )
    return SourceResolver(config), data, secret


def test_names_and_urls_resolve(resolver):
    r, data, _ = resolver
    assert r.resolve("t").path == f"{data}/t.zarr"
    assert r.resolve("dfm://s/remote").url == "s3://bucket/site/t.zarr"
    assert r.resolve(f"{data}/sub/x.nc").format == "netcdf"
    assert r.resolve("s3://bucket/site/t.zarr/temperature").source == "remote"


@pytest.mark.parametrize(
    "attempt",
    [
        "{data}/../secret/s.nc",
        "file://{data}/sub/../../secret/s.nc",
        "{secret}/s.nc",
        "{data}/escape/s.nc",
        "relative/path.nc",
        "memory://{data}/sub/x.nc",
        "s3://bucket/other/t.zarr",
        "s3://bucket/site/t.zarr2",
        "simplecache::file://{data}/sub/x.nc",
        "file://{data}/sub/x.nc?version=1",
        "dfm://other-site/t",
        "no-such-source",
        "{data}/sub/x.nc\x00.zarr",
    ],
)
def test_escapes_are_refused(resolver, attempt):
    r, data, secret = resolver
    with pytest.raises(AccessDeniedError):
        r.resolve(attempt.format(data=data, secret=secret))


def test_a_glob_is_expanded_at_the_site_and_every_match_confined(resolver):
    r, data, _ = resolver
    assert r.resolve(f"{data}/sub/x*.nc").files() == [f"{data}/sub/x.nc"]
    with pytest.raises(AccessDeniedError, match="leads out of"):
        r.resolve(f"{data}/sub/*.nc").files()
    with pytest.raises(InvalidParametersError, match="matches nothing"):
        r.resolve(f"{data}/sub/none*.nc").files()


def test_a_glob_on_a_remote_root_matches_in_the_filesystems_own_spelling(tmp_path):
    bucket = f"dfm-glob-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for name in ("a.csv", "b.csv"):
        fs.pipe(f"/{bucket}/site/{name}", b"x\n1\n")
    fs.pipe(f"/{bucket}/other.csv", b"x\n2\n")
    config = parse_site_config(
        {"name": "m", "operations": [], "data_roots": [{"url": f"memory://{bucket}/site"}], "result_store": {"url": f"file://{tmp_path}"}}
    )
    try:
        files = SourceResolver(config).resolve(f"memory://{bucket}/site/*.csv").files()
        assert files == [f"/{bucket}/site/a.csv", f"/{bucket}/site/b.csv"]
    finally:
        fs.rm(f"/{bucket}", recursive=True)


def test_a_remote_netcdf_file_cannot_point_the_site_at_its_own_disk():
    import io

    import h5py

    from site_workers.readers import open_location
    from site_workers.sources import Location

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as file:
        file.create_dataset("t", shape=(64,), dtype="u1", external=[("/proc/self/environ", 0, 64)])
    path = f"/dfm-ext-{uuid.uuid4().hex}/environ.nc"
    fs = fsspec.filesystem("memory")
    fs.pipe(path, buffer.getvalue())
    try:
        with pytest.raises(AccessDeniedError, match="keeps its data in external files"):
            open_location(Location("memory", path, format="netcdf"))
    finally:
        fs.rm(path)
