"""Attacks on a site through real site processes: what a client may run, read, forge and take away.

The ``vault`` site (a private federation of this module, over each transport in
turn) guards local data with a credential in its config, a narrow export policy
and ``error_detail: type``; the session federations' ``south`` reads its data
from S3. Every attack goes in through the public client (``client.call`` /
``client.request``) or a flow, the way a client of the federation would send it.
FLARE identities (admin kits, mTLS) are in ``test_flare_security.py``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import flow

from adapters.xarray_ops import subset
from dfm_prefect.client import FederationClient, get_client
from dfm_prefect.core.errors import (
    AccessDeniedError,
    ExportRefusedError,
    FederationError,
    InvalidParametersError,
    ResultIntegrityError,
    UnknownOperationError,
)
from dfm_prefect.core.refs import DataRef
from dfm_prefect.core.wire import FetchRequest
from dfm_prefect.transports.local.launcher import LocalFederation
from site_workers.config import parse_site_config
from site_workers.worker import SiteWorker
from tests.conftest import SMALL, TRANSPORTS, site_config
from tests.support_sites import FlareSites, ask, private_federation, private_flare_federation, run_frame

pytestmark = pytest.mark.slow

TOKEN = "vault-Tk-9f8e7d6c5b4a"
TOKEN_VAR = "DFM_TEST_VAULT_TOKEN"


@pytest.fixture(scope="module")
def vault_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A data root with a readable dataset inside, one outside, and a symlink from the root to the outside."""
    from dfm_prefect.testing.climate import make_region, write_zarr

    root = tmp_path_factory.mktemp("vault")
    data, outside = root / "data", root / "outside"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    region = make_region(SMALL, 0.0, 10.0).isel(time=slice(0, 30))
    write_zarr(region, str(data / "sub" / "ok.zarr"))
    write_zarr(region, str(outside / "secret.zarr"))
    os.symlink(outside, data / "escape")
    return {"root": root, "data": data, "outside": outside}


@pytest.fixture(scope="module", params=TRANSPORTS)
def vault(request: pytest.FixtureRequest, vault_paths: dict[str, Path], climate_data: dict[str, str]) -> Iterator[LocalFederation | FlareSites]:
    root, data = vault_paths["root"], vault_paths["data"]
    config = site_config(
        "vault",
        root / "store",
        [{"name": "temperature", "url": climate_data["north"]}],
        operations=["core.echo", "xarray.subset", "xarray.write", "xarray.moments", "testing.leak", "testing.read"],
        data_roots=[{"url": f"file://{data}", "storage_options": {"token": f"${{env:{TOKEN_VAR}}}"}}],
        export={
            "kinds": ["value", "aggregate", "dataset"],
            "max_bytes": 65536,
            "inline_bytes": 256,
            "recipients": {"dataset": ["alice@lab.example"]},
            "error_detail": "type",
        },
        limits={"concurrency": 2, "max_params_bytes": 2048},
    )
    start = private_federation if request.param == "local" else private_flare_federation
    with start(root / f"federation-{request.param}", {"vault": config}, env={TOKEN_VAR: TOKEN}) as fed:
        yield fed


@pytest.fixture
def any_client(any_federation) -> FederationClient:
    """The client of the session's two-site federation, over each transport in turn."""
    return get_client(any_federation.federation_file)


@pytest.fixture
def any_runner(any_federation, prefect_api: str):
    from dfm_prefect.task_runner import FederationTaskRunner

    return FederationTaskRunner(any_federation.federation_file)


@pytest.fixture(scope="module")
def vault_client(vault: LocalFederation) -> FederationClient:
    return get_client(vault.federation_file)


@pytest.fixture(scope="module")
def small_dataset(vault_client: FederationClient) -> DataRef:
    """A stored dataset result at the vault (one grid point's time series): small, but raw data.

    Stored on purpose with ``xarray.write`` (a subset alone is a view, whose forgeries test_views.py covers).
    """
    point = vault_client.call("vault", "xarray.subset", {"data": "temperature", "points": {"lat": 2.5, "lon": 2.5}})
    return vault_client.call("vault", "xarray.write", {"data": point.model_dump(mode="json")})


def refused(
    client: FederationClient, site: str, op: str, params: dict[str, Any], error: type[FederationError], match: str | None = None, **kw: Any
) -> None:
    """The call fails with ``error``, is counted as rejected or failed, and the site keeps serving."""
    before = client.stats(site)
    with pytest.raises(error, match=match):
        client.call(site, op, params, **kw)
    after = client.stats(site)
    assert after.completed == before.completed, "nothing may complete for a refused request"
    assert client.call(site, "core.echo", {"value": "still-serving"}).fetch(client=client) == "still-serving"


# -------------------------------------------------------------- credentials


def test_a_client_without_the_federation_key_is_refused(vault, vault_client):
    if isinstance(vault, FlareSites):
        pytest.skip("FLARE has no federation key: admin kits and mTLS, see test_flare_security.py")
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    host, port = vault.spec.sites["vault"].rsplit(":", 1)
    with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
        Client((host, int(port)), family="AF_INET", authkey=b"not-the-federation-key").send_bytes(b"{}")
    assert vault_client.call("vault", "core.echo", {"value": "still-serving"}).fetch(client=vault_client) == "still-serving"


# ------------------------------------------------------------------ allow-list


@pytest.mark.parametrize(
    "op, version, why",
    [
        ("nope.missing", None, "not offered here"),
        ("testing.flaky", None, "not in this site's allow-list"),  # installed at the site, not listed
        ("core.echo", "99", "version '99' is not offered here"),
        ("os.system", None, "not offered here"),
        ("code.python", None, "does not run code sent by clients"),
    ],
)
def test_a_site_runs_only_what_its_allow_list_offers(vault_client, op, version, why):
    refused(vault_client, "vault", op, {}, UnknownOperationError, why, version=version)


def test_an_operation_name_is_never_imported(tmp_path, monkeypatch):
    sentinel = tmp_path / "imported"
    (tmp_path / "dfm_probe_module.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    worker = SiteWorker(parse_site_config({"name": "w", "operations": ["core.echo"], "result_store": {"url": f"file://{tmp_path}/s"}}))
    try:
        (answer,) = ask(worker, run_frame("dfm_probe_module.run", {}))
    finally:
        worker.close()
    assert answer.error.code == "unknown_operation"
    assert not sentinel.exists() and "dfm_probe_module" not in sys.modules


# ------------------------------------------------------------------ parameters


@pytest.mark.parametrize(
    "op, params, why",
    [
        ("xarray.subset", {"data": 5}, "data"),
        ("xarray.subset", {"data": "temperature", "evil": 1}, "evil: Extra inputs"),
        ("xarray.subset", {"data": "temperature", "ranges": {"time": {"start": [1]}}}, "ranges"),
        ("xarray.moments", {"data": "temperature", "dims": "lat"}, "dims"),
        ("core.echo", {"value": "x" * 3000}, "this site accepts at most 2048"),
        ("testing.leak", {"variable": "HOME"}, "variable"),
    ],
)
def test_invalid_parameters_are_refused_before_any_work(vault_client, op, params, why):
    refused(vault_client, "vault", op, params, InvalidParametersError, why)


def test_a_flow_cannot_get_bad_parameters_past_the_site(vault, prefect_api):
    from adapters.core import echo
    from dfm_prefect.task_runner import FederationTaskRunner

    @flow(task_runner=FederationTaskRunner(vault.federation_file))
    def careless() -> list[str]:
        futures = [
            echo.submit(value="x" * 3000, site="vault"),
            subset.submit(data="temperature", ranges="all of it", site="vault"),
            subset.submit(data={"uri": "file:///etc/passwd"}, site="vault"),
        ]
        return [str(future.state.message) for future in futures if future.wait() is None]

    messages = careless()
    assert len(messages) == 3 and all("InvalidParametersError" in message for message in messages), messages
    assert "at most 2048" in messages[0] and "ranges" in messages[1] and "data" in messages[2]


# ------------------------------------------------------------ data confinement

LOCAL_ATTACKS = [
    "../..",
    "../outside/secret.zarr",
    "temperature/../../outside/secret.zarr",
    "{outside}/secret.zarr",
    "file://{outside}/secret.zarr",
    "FILE://{outside}/secret.zarr",
    "file://localhost{outside}/secret.zarr",
    "{data}/../outside/secret.zarr",
    "file://{data}/sub/../../outside/secret.zarr",
    "{data}/escape/secret.zarr",
    "file://{data}/escape/secret.zarr",
    "memory://{data}/sub/ok.zarr",
    "simplecache::file://{data}/sub/ok.zarr",
    "zip://x.zarr::file://{data}/sub/ok.zarr",
    "{data}/sub/ok.zarr?x=1",
    "{data}/sub/ok.zarr#frag",
    "{data}/sub/ok.zarr\x00.nc",
    "dfm://south/temperature",
    "dfm://vault/../outside/secret.zarr",
    "dfm://vault@south/temperature",
    "http://127.0.0.1:9/secret.zarr",
    "s3://anything/secret.zarr",
    "/" + "a" * 1500,
]


def test_the_data_root_itself_is_readable(vault_client, vault_paths):
    ref = vault_client.call("vault", "xarray.subset", {"data": f"{vault_paths['data']}/sub/ok.zarr"})
    assert ref.kind == "dataset" and ref.summary["dims"] == ["lat", "lon", "time"]  # names only: it may not leave for us


@pytest.mark.parametrize("attack", LOCAL_ATTACKS)
def test_nothing_outside_the_declared_sources_and_roots_is_read(vault_client, vault_paths, attack):
    data = attack.format(data=vault_paths["data"], outside=vault_paths["outside"])
    refused(vault_client, "vault", "xarray.subset", {"data": data}, AccessDeniedError)


def test_percent_encoded_dots_are_not_decoded_into_a_way_out(vault_client, vault_paths):
    data = f"{vault_paths['data']}/sub/%2e%2e/%2e%2e/outside/secret.zarr"
    with pytest.raises(FederationError) as info:
        vault_client.call("vault", "xarray.subset", {"data": data})
    assert not isinstance(info.value, AccessDeniedError) or "not under its data roots" in str(info.value)


S3_ATTACKS = [
    "file:///climate/south/temperature.zarr",
    "simplecache::s3://climate/south/temperature.zarr",
    "s3://climate/south/other.zarr",
    "s3://climate/south/temperature.zarr2",
    "s3://climate/south/temperature.zarr/../../north",
    "s3a://climate/south/temperature.zarr",
    "s3://climate/south/temperature.zarr?versionId=1",
    "http://127.0.0.1:1/climate/south/temperature.zarr",
    "dfm://north/temperature",
]


@pytest.mark.parametrize("attack", S3_ATTACKS)
def test_an_s3_site_reads_only_its_own_prefix(any_client, attack):
    refused(any_client, "south", "xarray.subset", {"data": attack}, AccessDeniedError)


@pytest.mark.parametrize("data", ["../../etc/passwd", "/etc/passwd", "file:///etc/shadow"])
def test_traversal_from_a_flow_fails_the_task_run(any_runner, prefect_api, data):
    @flow(task_runner=any_runner)
    def sneaky() -> DataRef:
        return subset.submit(data=data, site="north").result()

    with pytest.raises(AccessDeniedError):
        sneaky()


# --------------------------------------------------------------- forged refs


@pytest.mark.parametrize(
    "forgery, error, why",
    [
        ({"site": "south"}, AccessDeniedError, "held by site 'south'"),
        ({"uri": "file:///etc/passwd"}, AccessDeniedError, "does not point into this site's result store"),
        ({"uri": "{store}/../vault.yaml"}, AccessDeniedError, "not allowed"),
        ({"uri": "{store}/00000000000000000000000000000000.dataset.netcdf"}, ResultIntegrityError, "missing"),
        ({"kind": "value"}, AccessDeniedError, "the reference was altered"),
        ({"format": "json"}, AccessDeniedError, "the reference was altered"),
        ({"sha256": "0" * 64}, ResultIntegrityError, "corrupted"),
        ({"size": 1}, ResultIntegrityError, "corrupted"),
    ],
)
def test_forged_references_are_refused_as_inputs_and_for_export(vault_client, small_dataset, forgery, error, why):
    store = small_dataset.uri.rsplit("/", 1)[0]
    forged = small_dataset.model_copy(update={k: v.format(store=store) if isinstance(v, str) else v for k, v in forgery.items()})
    refused(vault_client, "vault", "testing.read", {"data": forged.model_dump(mode="json")}, error, why)
    before = vault_client.stats("vault").bytes_out
    with pytest.raises(error, match=why):
        vault_client.request("vault", FetchRequest(id=os.urandom(8).hex(), ref=forged)).result(timeout=30)
    assert vault_client.stats("vault").bytes_out == before


# ------------------------------------------------------------- export policy


def test_export_kinds_sizes_and_inline_limits(vault_client, vault_paths):
    tiny = vault_client.call("vault", "core.echo", {"value": "t" * 100})
    assert tiny.is_local  # within inline_bytes: came back with the result
    before = vault_client.stats("vault").bytes_out
    medium = vault_client.call("vault", "core.echo", {"value": "m" * 600})
    assert not medium.is_local and medium.fetch(client=vault_client) == "m" * 600
    assert vault_client.stats("vault").bytes_out - before == medium.size
    whole = vault_client.call("vault", "xarray.subset", {"data": "temperature"})
    with pytest.raises(ExportRefusedError, match="at most 65536 bytes leave per result"):
        whole.fetch(client=vault_client)


def test_raw_data_for_named_recipients_never_leaves_for_another_identity(vault_client, small_dataset):
    before = vault_client.stats("vault").bytes_out
    assert vault_client.identity not in (None, "alice@lab.example")  # the federation file's own person, from its certificate
    with pytest.raises(ExportRefusedError, match=f"client '{vault_client.identity}' is not among the clients"):
        small_dataset.fetch(client=vault_client)
    aggregate = vault_client.call("vault", "xarray.moments", {"data": small_dataset.model_dump(mode="json"), "dims": ["time"]})
    came_inline = aggregate.is_local
    assert aggregate.kind == "aggregate" and aggregate.fetch(client=vault_client) is not None
    assert vault_client.stats("vault").bytes_out - before == (0 if came_inline else aggregate.size)


# ----------------------------------------------------------------- redaction


def test_credentials_stay_out_of_errors_logs_progress_results_and_the_site_log(vault, vault_client):
    with pytest.raises(FederationError) as info:
        vault_client.call("vault", "testing.leak", {"variable": TOKEN_VAR, "mode": "raise"})
    message = str(info.value)
    assert TOKEN not in message and "patient_weight" not in message and "incident" in message

    progress: list[str] = []
    _, future = vault_client.run("vault", "testing.leak", {"variable": TOKEN_VAR, "mode": "progress"}, on_progress=lambda u: progress.append(u.message))
    reply = future.result(timeout=30)
    assert reply.ok and progress and all(TOKEN not in text for text in progress)
    assert reply.logs and all(TOKEN not in line.message for line in reply.logs)

    returned = vault_client.call("vault", "testing.leak", {"variable": TOKEN_VAR, "mode": "return"})
    with pytest.raises(ExportRefusedError, match="contains one of this site's credentials"):
        returned.fetch(client=vault_client)

    assert TOKEN not in json.dumps(vault_client.sites["vault"].model_dump(mode="json"))
    site_log = vault.site_log("vault") if isinstance(vault, FlareSites) else (vault.workdir / "logs" / "vault.log").read_text()
    assert "incident" in site_log and TOKEN not in site_log
