"""What a first user meets: `site check` on broken sources, the CLI with a Federation block, and the messages that say what to do."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from dfm_prefect.core.refs import DataRef
from site_workers.config import ExportPolicy
from site_workers.policy import ExportGate
from tests.conftest import ROOT


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **env}
    return subprocess.run([sys.executable, "-m", "dfm_prefect.cli", *args], capture_output=True, text=True, timeout=180, env=full_env)


def _site(tmp_path: Path, sources: list[dict[str, str]]) -> Path:
    config = {
        "name": "clinic",
        "operations": ["core.echo", "xarray.moments"],
        "sources": sources,
        "result_store": {"url": f"file://{tmp_path / 'store'}"},
    }
    path = tmp_path / "clinic.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def good_zarr(tmp_path: Path) -> str:
    path = tmp_path / "good.zarr"
    xr.Dataset({"pm25": (("y", "x"), np.arange(12.0).reshape(3, 4))}).to_zarr(path)
    return f"file://{path}"


def test_site_check_names_each_missing_or_misformatted_source_once_and_fails(tmp_path: Path, good_zarr: str):
    (tmp_path / "visits.parquet").write_text("patient,age\n1,40\n")  # CSV text under a Parquet name
    (tmp_path / "grid.nc").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)  # a truncated HDF5 header
    config = _site(
        tmp_path,
        [
            {"name": "grid", "url": good_zarr},
            {"name": "missing", "url": f"file://{tmp_path / 'nowhere' / 'visits.parquet'}"},
            {"name": "visits", "url": f"file://{tmp_path / 'visits.parquet'}"},
            {"name": "broken", "url": f"file://{tmp_path / 'grid.nc'}"},
            {"name": "mystery", "url": f"file://{tmp_path / 'grid.bin'}"},
        ],
    )
    (tmp_path / "grid.bin").write_bytes(b"?")
    result = cli("site", "check", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "config is valid" not in result.stdout
    errors = result.stderr
    assert errors.count("source 'missing'") == 1 and "does not exist at this site" in errors
    assert errors.count("source 'visits'") == 1 and "cannot be opened as parquet" in errors
    assert errors.count("source 'broken'") == 1 and "cannot be opened as netcdf" in errors
    assert errors.count("source 'mystery'") == 1 and "declare `format:`" in errors
    assert "source 'grid'" not in errors
    assert "4 of 5 source(s) cannot be served" in errors


def test_site_check_of_readable_sources_shows_what_the_site_offers(tmp_path: Path, good_zarr: str):
    result = cli("site", "check", str(_site(tmp_path, [{"name": "grid", "url": good_zarr}])))
    assert result.returncode == 0, result.stderr
    assert "config is valid and every source opens" in result.stdout
    assert "xarray.moments" in result.stdout and "pm25" in result.stdout


def test_a_table_that_may_not_leave_points_to_a_table_aggregate():
    gate = ExportGate("clinic", ExportPolicy(kinds=["aggregate"]))
    ref = DataRef(site="clinic", uri="file:///r/x.parquet", kind="table", format="parquet", size=10, sha256="0" * 64, op="table.filter")
    reason = gate.refusal(ref)
    assert reason is not None and "table.groupby_aggregate" in reason and "xarray" not in reason
    grid = ref.model_copy(update={"kind": "dataset"})
    assert "xarray.moments" in (gate.refusal(grid) or "")


def test_flare_admin_chatter_goes_to_the_debug_log(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture):
    from nvflare.fuel.hci.client import api as hci_api

    from dfm_prefect.transports.flare.admin import FLARE_ADMIN_LOGGER, quiet_flare

    quiet_flare()
    with caplog.at_level(logging.DEBUG, logger=FLARE_ADMIN_LOGGER):
        for _ in range(3):
            hci_api._print_hci_message("Connecting to FLARE ...")
    out = capsys.readouterr()
    assert "Connecting to FLARE" not in out.out + out.err
    assert [r.getMessage() for r in caplog.records].count("Connecting to FLARE ...") == 3


@pytest.mark.slow
def test_the_cli_accepts_a_federation_block_as_flows_do(federation, prefect_api: str):
    from dfm_prefect.blocks import Federation

    Federation.from_file(federation.federation_file).save("first-use", overwrite=True)
    status = cli("federation", "status", DFM_FEDERATION="block:first-use", PREFECT_API_URL=prefect_api)
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("ready") == 2
    missing = cli("catalog", DFM_FEDERATION="block:no-such-block", PREFECT_API_URL=prefect_api)
    assert missing.returncode == 2
    assert "cannot load Federation block 'no-such-block'" in missing.stderr and "dfm-prefect prefect setup" in missing.stderr


@pytest.mark.slow
def test_the_catalog_shows_every_parameter_readably_and_cuts_nothing(federation):
    shown = cli("catalog", "--federation", str(federation.federation_file), COLUMNS="80")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    for name in ("core.echo", "core.sleep", "xarray.subset", "xarray.moments", "xarray.reduce", "testing.flaky"):
        assert any(line.startswith(f"{name}  result: ") for line in lines), f"{name} is not shown whole"
    assert "offered by: north, south" in shown.stdout
    assert "…" not in shown.stdout  # rich's mark of a cut cell
    moments = shown.stdout[shown.stdout.index("xarray.moments  result:") :]
    for cell in ("dims", "list of string", "required", "weights", '"none" | "area"', '"none"', "DataRef or source"):
        assert cell in moments, cell
    assert "north: data sources" in shown.stdout and "temperature" in shown.stdout

    one = cli("catalog", "--federation", str(federation.federation_file), "--op", "xarray.subset", COLUMNS="80")
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("xarray.subset  result: dataset") and "Range (an item of the parameters above)" in one.stdout
    assert "xarray.moments" not in one.stdout and "data sources" not in one.stdout

    unknown = cli("catalog", "--federation", str(federation.federation_file), "--op", "xarray.nope")
    assert unknown.returncode == 2 and "no site offers operation 'xarray.nope'" in unknown.stderr


def test_a_federation_started_again_in_its_workdir_issues_its_users_again(tmp_path: Path):
    from dfm_prefect.transports.local.pki import LocalCA

    first = LocalCA.create(tmp_path / "identities")
    cert, _ = first.issue("admin@local")
    assert first.issued(cert)
    second = LocalCA.create(tmp_path / "identities")  # `federation down`, then `up` in the same workdir
    assert not second.issued(cert) and not second.issued(tmp_path / "nobody.crt")
    again, _ = second.issue("admin@local")
    assert second.issued(again)
