"""A site reads only its declared sources and what lies under its data roots."""

from __future__ import annotations

import os

import pytest

from dfm_prefect.core.errors import AccessDeniedError
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
