"""Attacks on what a site's readers open, past the check on the name: globs, symlinks, references inside files.

The ``paths`` site (a private federation of this
module) has one data root. Next to real data it holds what a neighbour who can
write into the root plants there: symlinks out of the root (a CSV and a Parquet
file matched by a glob, a part of a Parquet dataset, a chunk file and a variable
directory of a zarr store) and HDF5/netCDF files whose storage lies elsewhere
(an external dataset on a file outside, another on ``/proc/self/environ``, a
virtual dataset, an external link). Everything outside holds `SECRET`, and the
site's environment holds `TOKEN`. Each attack goes in through the public client
as a flow author would send it and must fail with `AccessDeniedError` that says
what to do, complete nothing, send no result bytes, leak neither value, and
leave the site serving.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dfm_prefect.client import FederationClient, get_client
from dfm_prefect.core.errors import AccessDeniedError
from tests.conftest import TRANSPORTS, site_config
from tests.support_sites import private_federation, private_flare_federation

pytestmark = pytest.mark.slow

SITE = "paths"
SECRET = 913131.0
TOKEN = "paths-Tk-5e4d3c2b1a0f"
TOKEN_VAR = "DFM_TEST_PATHS_TOKEN"
SUM_LOS = {"by": ["ward"], "aggregations": {"los": {"column": "los", "func": "sum"}}}
LEADS_OUT = "leads out of"
EXTERNAL = "refers to storage outside itself"


def _tables(data: Path, outside: Path) -> None:
    """CSV and Parquet inside the root; the same tables outside with `SECRET`, linked in where a glob or a dataset finds them."""
    import pandas as pd

    inside = pd.DataFrame({"ward": ["a", "b"], "los": [1.0, 2.0]})
    secret = inside.assign(los=SECRET)
    for folder in ("tables", "parts", "visits.parquet"):
        (data / folder).mkdir(parents=True)
    inside.to_csv(data / "tables" / "ok.csv", index=False)
    inside.to_parquet(data / "parts" / "ok.parquet")
    inside.to_parquet(data / "visits.parquet" / "part-0.parquet")
    secret.to_csv(outside / "secret.csv", index=False)
    secret.to_parquet(outside / "secret.parquet")
    for link, target in [("tables/zz.csv", "secret.csv"), ("parts/zz.parquet", "secret.parquet"), ("visits.parquet/part-1.parquet", "secret.parquet")]:
        os.symlink(outside / target, data / link)


def _hdf5(data: Path, outside: Path) -> None:
    """A plain netCDF file, and HDF5 files whose data the HDF5 library would read from elsewhere."""
    import h5py
    import numpy as np
    import xarray as xr

    values = np.full(16, SECRET)
    (outside / "raw.bin").write_bytes(values.tobytes())
    xr.Dataset({"t": ("x", values)}).to_netcdf(outside / "secret.nc", engine="h5netcdf")
    xr.Dataset({"t": ("x", np.arange(16.0))}).to_netcdf(data / "ok.nc", engine="h5netcdf")
    with h5py.File(data / "external.nc", "w") as file:
        file.create_dataset("t", shape=(16,), dtype="f8", external=[(str(outside / "raw.bin"), 0, values.nbytes)])
    with h5py.File(data / "environ.nc", "w") as file:
        file.create_dataset("t", shape=(4096,), dtype="u1", external=[("/proc/self/environ", 0, 4096)])
    layout = h5py.VirtualLayout(shape=(16,), dtype="f8")
    layout[:] = h5py.VirtualSource(str(outside / "secret.nc"), "t", shape=(16,))
    with h5py.File(data / "virtual.nc", "w") as file:
        file.create_virtual_dataset("t", layout)
    with h5py.File(data / "linked.nc", "w") as file:
        file["t"] = h5py.ExternalLink(str(outside / "secret.nc"), "/t")


def _zarr(data: Path, outside: Path) -> None:
    """Three zarr stores inside the root; in one a chunk file, in another a variable's directory, is a link to the secret store."""
    import numpy as np
    import xarray as xr

    for name in ("ok", "chunk", "folder"):
        xr.Dataset({"t": ("x", np.arange(16.0))}).chunk(x=4).to_zarr(data / f"{name}.zarr")
    xr.Dataset({"t": ("x", np.full(16, SECRET))}).chunk(x=4).to_zarr(outside / "secret.zarr")
    variable = data / "chunk.zarr" / "t"
    chunk = min(p for p in variable.rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs"))
    chunk.unlink()
    os.symlink(outside / "secret.zarr" / "t" / chunk.relative_to(variable), chunk)
    shutil.rmtree(data / "folder.zarr" / "t")
    os.symlink(outside / "secret.zarr" / "t", data / "folder.zarr" / "t")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paths")
    data, outside = root / "data", root / "outside"
    data.mkdir()
    outside.mkdir()
    _tables(data, outside)
    _hdf5(data, outside)
    _zarr(data, outside)
    return {"root": root, "data": data}


@pytest.fixture(scope="module", params=["local"])
def fed(request: pytest.FixtureRequest, layout: dict[str, Path]) -> Iterator[Any]:
    """The ``paths`` site; local unless a test asks for the transports by parametrizing ``fed`` indirectly."""
    root, data = layout["root"], layout["data"]
    config = site_config(
        SITE,
        root / "store",
        [{"name": "visits", "url": f"file://{data}/tables/*.csv"}],
        operations=["core.echo", "table.groupby_aggregate", "xarray.reduce"],
        data_roots=[{"url": f"file://{data}"}],
        # Tiny tables: these tests are about paths, not disclosure (test_disclosure.py).
        export={
            "kinds": ["aggregate", "value"],
            "max_bytes": 1 << 20,
            "inline_bytes": 64 << 10,
            "disclosure": {"min_group_size": 1, "min_subset_size": 1},
        },
    )
    start = private_federation if request.param == "local" else private_flare_federation
    with start(root / f"federation-{request.param}", {SITE: config}, env={TOKEN_VAR: TOKEN}) as federation:
        yield federation


@pytest.fixture
def client(fed: Any) -> FederationClient:
    return get_client(fed.federation_file)


def attack_fails(client: FederationClient, op: str, params: dict[str, Any], says: str) -> None:
    """The attack fails with `AccessDeniedError` saying ``says``; nothing completes or leaves, nothing leaks, the site serves on."""
    before = client.stats(SITE)
    with pytest.raises(AccessDeniedError, match=says) as refused:
        client.call(SITE, op, params)
    after = client.stats(SITE)
    assert (after.completed, after.bytes_out) == (before.completed, before.bytes_out), "the attack completed or sent bytes"
    message = str(refused.value)
    assert str(int(SECRET)) not in message and TOKEN not in message
    assert "ask the site administrator" in message.lower(), f"the error does not say what to do: {message}"
    assert client.call(SITE, "core.echo", {"value": "still-serving"}).fetch(client=client) == "still-serving"


# ------------------------------------------------------------- globs


@pytest.mark.parametrize("fed", TRANSPORTS, indirect=True)
def test_a_csv_glob_does_not_follow_a_symlink_out_of_the_root(fed, client, layout):
    attack_fails(client, "table.groupby_aggregate", {"data": f"{layout['data']}/tables/*.csv", **SUM_LOS}, LEADS_OUT)


@pytest.mark.parametrize(
    "pattern",
    [
        "t*/*.csv",  # the glob in a directory segment
        "parts/*.parquet",
        "parts/[oz]*.parquet",
        "visits.parquet",  # no glob: a part of the Parquet dataset is the link
    ],
)
def test_table_globs_and_datasets_read_nothing_through_a_symlink_out_of_the_root(client, layout, pattern):
    attack_fails(client, "table.groupby_aggregate", {"data": f"{layout['data']}/{pattern}", **SUM_LOS}, LEADS_OUT)


def test_a_declared_glob_source_does_not_follow_a_link_planted_in_it(client):
    attack_fails(client, "table.groupby_aggregate", {"data": "visits", **SUM_LOS}, LEADS_OUT)


@pytest.mark.parametrize("pattern", ["tables/ok*.csv", "parts/ok*.parquet", "t*/o[k].csv"])
def test_globs_inside_the_root_still_read(client, layout, pattern):
    table = client.call(SITE, "table.groupby_aggregate", {"data": f"{layout['data']}/{pattern}", **SUM_LOS}).fetch(client=client)
    assert table.set_index("ward")["los"].to_dict() == {"a": 1.0, "b": 2.0}


# ------------------------------------------------- references in files


@pytest.mark.parametrize(
    "name, why",
    [
        ("external.nc", "keeps its data in external files"),
        ("environ.nc", "keeps its data in external files"),  # the site's credentials, as numbers
        ("virtual.nc", "is a virtual dataset"),
        ("linked.nc", "is a link to another file"),
    ],
)
def test_an_hdf5_file_cannot_make_the_site_read_storage_outside_it(client, layout, name, why):
    params = {"data": f"{layout['data']}/{name}", "dims": ["phony_dim_0"], "stat": "sum"}
    attack_fails(client, "xarray.reduce", params, f"{EXTERNAL} \\('t' {why}\\)")


@pytest.mark.parametrize("store", ["chunk.zarr", "folder.zarr"])
def test_a_zarr_store_does_not_follow_a_chunk_or_directory_symlinked_out_of_it(client, layout, store):
    attack_fails(client, "xarray.reduce", {"data": f"{layout['data']}/{store}", "dims": ["x"], "stat": "max"}, LEADS_OUT)


@pytest.mark.parametrize("name", ["ok.nc", "ok.zarr"])
def test_self_contained_files_inside_the_root_still_read(client, layout, name):
    result = client.call(SITE, "xarray.reduce", {"data": f"{layout['data']}/{name}", "dims": ["x"], "stat": "max"}).fetch(client=client)
    assert float(result["t"]) == 15.0
