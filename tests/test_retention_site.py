"""Retention end to end: real site processes over the local transport, and the CLI as a user runs it.

Site ``brief`` keeps results for 1 s; site ``tight`` holds 600 bytes in all and
400 per client, and never removes a result younger than 300 s to make room, so a
result that does not fit is refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dfm_prefect.client import get_client
from dfm_prefect.core.errors import ResultExpiredError, StoreFullError
from dfm_prefect.transports.base import write_spec
from site_workers.config import parse_site_config
from site_workers.store import ResultStore
from tests.conftest import ROOT, site_config
from tests.support_sites import private_federation, private_flare_federation

pytestmark = pytest.mark.slow

ALICE = "alice@lab.example"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "dfm_prefect.cli", *args], capture_output=True, text=True, timeout=180, env=env)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.25)


def site(name: str, root: Path, retention: dict[str, Any]) -> dict[str, Any]:
    return site_config(
        name,
        root / "store" / name,
        [],
        operations=["core.echo", "testing.read"],
        export={"kinds": ["value"], "max_bytes": 1 << 20, "inline_bytes": 0},  # every fetch asks the site
        result_store={"url": f"file://{root / 'store' / name}", "retention": retention},
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("retention")
    import numpy as np
    import xarray as xr

    xr.Dataset({"t": (("x",), np.arange(4.0))}).to_zarr(root / "tiny.zarr", zarr_format=2, consolidated=True)
    brief = site("brief", root, {"max_age_s": 1, "min_age_s": 0})
    configs = {
        "brief": {**brief, "sources": [{"name": "tiny", "url": f"file://{root / 'tiny.zarr'}"}], "cache": {"operations": ["testing.read"]}},
        "tight": site("tight", root, {"max_bytes": 600, "max_bytes_per_client": 400}),
    }
    with private_federation(root, configs) as fed:
        alice_file = write_spec(fed.spec_for(ALICE), root / "alice.json")
        yield {"fed": fed, "admin": get_client(fed.federation_file), "alice": get_client(alice_file)}
        get_client(alice_file).close()


def echo(client: Any, site: str, chars: int) -> Any:
    ref = client.call(site, "core.echo", {"value": "x" * (chars - 2)})
    assert ref.size == chars
    return ref


def poke(client: Any) -> None:
    """Store a new 20-byte result at ``brief`` (storing runs the collector); never the same, so never a cache hit."""
    assert client.call("brief", "core.echo", {"value": uuid.uuid4().hex[:18]}).size == 20


def test_an_expired_result_fails_clearly_in_a_later_operation_and_when_fetched(mesh):
    admin = mesh["admin"]
    old = echo(admin, "brief", 50)
    assert admin.call("brief", "testing.read", {"data": old.model_dump(mode="json")}).fetch(client=admin)  # usable while it is young

    stored = Path(old.uri.removeprefix("file://"))
    assert stored.exists()

    def collected() -> bool:
        poke(admin)
        return not stored.exists()

    wait_until(collected)
    usage = admin.stats("brief").store
    assert usage.bytes == 20 * usage.results and usage.max_age_s == 1  # only the young 20-byte results are left
    expected = r"removed from the store by the site's retention \(result_store.retention.max_age_s\); run the operation that produced it again"
    with pytest.raises(ResultExpiredError, match=expected):
        admin.call("brief", "testing.read", {"data": old.model_dump(mode="json")})
    with pytest.raises(ResultExpiredError, match=expected):
        old.fetch(client=admin)


def test_a_cached_answer_whose_result_was_collected_is_computed_again(mesh):
    admin = mesh["admin"]

    def ask() -> Any:
        _, future = admin.run("brief", "testing.read", {"data": "tiny"})  # a source: it outlives the results
        return future.result(timeout=60)

    first = ask()
    assert first.ok and not first.cached and ask().cached
    stored = Path(first.ref.uri.removeprefix("file://"))

    def collected() -> bool:
        poke(admin)
        return not stored.exists()

    wait_until(collected)
    fresh = ask()
    assert fresh.ok and not fresh.cached and fresh.ref.uri != first.ref.uri
    assert fresh.ref.fetch(client=admin) == {"type": "Dataset", "variables": ["t"]}


def test_a_full_store_refuses_per_client_and_in_all_then_keeps_serving(mesh):
    admin, alice = mesh["admin"], mesh["alice"]
    echo(admin, "tight", 300)
    with pytest.raises(StoreFullError, match=rf"client {admin.identity!r}'s share of the result store is full.*max_bytes_per_client: 400 bytes"):
        echo(admin, "tight", 150)
    kept = echo(alice, "tight", 250)  # another client's share is its own
    with pytest.raises(StoreFullError, match=r"site 'tight': the result store is full.*retention.max_bytes: 600 bytes.*nothing was stored"):
        echo(alice, "tight", 100)
    small = echo(admin, "tight", 20)  # the site keeps serving what fits
    assert small.fetch(client=admin) == "x" * 18 and kept.fetch(client=alice) == "x" * 248
    usage = admin.stats("tight").store
    assert (usage.bytes, usage.results, usage.max_bytes, usage.max_bytes_per_client) == (570, 3, 600, 400)
    held = [p for p in (Path(mesh["fed"].workdir) / "store" / "tight").iterdir() if not p.name.startswith(".")]
    assert sum(p.stat().st_size for p in held) == 570

    status = cli("federation", "status", "--federation", str(mesh["fed"].federation_file))
    assert status.returncode == 0, status.stderr[-2000:]
    row = next(line for line in status.stdout.splitlines() if "tight" in line and "600 bytes" in line)
    assert "570" in row and "400 bytes" in row
    assert "unbounded" in next(line for line in status.stdout.splitlines() if "brief" in line and "1 s" in line)


def test_site_gc_says_what_would_go_and_removes_it(tmp_path):
    store_dir = tmp_path / "store"
    config = site("north", tmp_path, {"max_age_s": 3600})
    config["result_store"]["url"] = f"file://{store_dir}"
    (tmp_path / "north.yaml").write_text(yaml.safe_dump(config))
    store = ResultStore("north", parse_site_config(config).result_store)
    fresh, _ = store.put("y" * 48, op="core.echo", kind="value", summary={})
    store.retention.clock = lambda: time.time() - 7200  # stored two hours ago
    old = [store.put("x" * 98, op="core.echo", kind="value", summary={}, owner=ALICE)[0] for _ in range(2)]

    dry = cli("site", "gc", str(tmp_path / "north.yaml"), "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert sum(line.startswith("would remove ") for line in dry.stdout.splitlines()) == 2 and f"stored by {ALICE}" in dry.stdout and "max_age_s" in dry.stdout
    assert "would hold 1 result(s), 50 bytes" in dry.stdout
    for ref in old:
        store.verify(ref)

    done = cli("site", "gc", str(tmp_path / "north.yaml"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "site north: removed 2 result(s), 200 bytes; the store holds 1 result(s), 50 bytes" in done.stdout
    assert "anonymous: 50 bytes" in done.stdout
    for ref in old:
        with pytest.raises(ResultExpiredError):
            store.verify(ref)
    store.verify(fresh)
    assert (store_dir / ".digest-key").exists()

    config["result_store"]["retention"] = {"max_bytes": 0}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    bad = cli("site", "gc", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 2 and "result_store.retention.max_bytes" in bad.stderr


@pytest.mark.flare
def test_a_full_store_refuses_over_flare_and_the_site_keeps_serving(tmp_path):
    with private_flare_federation(tmp_path, {"tight": site("tight", tmp_path, {"max_bytes": 300})}) as fed:
        client = get_client(fed.federation_file)
        echo(client, "tight", 200)
        with pytest.raises(StoreFullError, match=r"site 'tight': the result store is full.*retention.max_bytes: 300 bytes"):
            echo(client, "tight", 200)
        assert echo(client, "tight", 50).fetch(client=client) == "x" * 48
        assert client.stats("tight").store.bytes == 250
