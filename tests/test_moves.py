"""Moves: a result goes from the site that holds it to another site, site to site, under both sites' policies.

Real site processes on each transport. ``north`` and ``south`` hold data and
let datasets move to ``hub``; ``hub`` (a compute site with no data of its own)
accepts datasets from both, up to a quota; ``closed`` accepts nothing. Each test
checks what crossed where with the sites' own counters and the client's.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import xarray as xr
import yaml
from prefect import flow

from adapters.xarray_ops import derive, subset
from adapters.xarray_stats import moments
from dfm_prefect.client import FederationClient, get_client
from dfm_prefect.core.errors import ExportRefusedError, ResultIntegrityError, SiteUnavailableError
from dfm_prefect.testing.climate import ClimateSpec, make_region, write_zarr
from tests.conftest import TRANSPORTS, read_task_runs, site_config
from tests.support_sites import private_federation, private_flare_federation, restart_site, site_processes

pytestmark = pytest.mark.slow

SPEC = ClimateSpec(years=2, resolution=2.0, chunk_days=120)
NORTH_BOX = {"lat": {"start": 0, "stop": 60}}
OPS = ["xarray.subset", "xarray.derive", "xarray.moments", "core.echo"]


def configs(root: Path) -> dict[str, dict[str, Any]]:
    data = root / "data"
    if not data.exists():
        write_zarr(make_region(SPEC, 0.0, 90.0), str(data / "north.zarr"))
        write_zarr(make_region(SPEC, -90.0, 0.0), str(data / "south.zarr"))
        # ~95 MB: two years of the northern hemisphere at 1 degree, for the large moves.
        write_zarr(make_region(ClimateSpec(years=2, resolution=1.0, chunk_days=30), 0.0, 90.0), str(data / "big.zarr"))
    to_hub = {"hub": {"kinds": ["dataset"], "max_bytes": 1 << 30}}
    return {
        "north": site_config("north", root / "store" / "north", [{"name": "temperature", "url": f"file://{data / 'north.zarr'}"},
                                                                      {"name": "big", "url": f"file://{data / 'big.zarr'}"}],
                             operations=OPS, operation_modules=[], export={"kinds": ["aggregate", "value"], "sites": to_hub}),
        "south": site_config("south", root / "store" / "south", [{"name": "temperature", "url": f"file://{data / 'south.zarr'}"}],
                             operations=OPS, operation_modules=[],
                             export={"kinds": ["aggregate", "value"], "sites": {"hub": {"kinds": ["dataset"], "max_bytes": 1000}}}),
        "hub": site_config("hub", root / "store" / "hub", [], operations=OPS, operation_modules=[],
                           imports={"sites": {"north": {"kinds": ["dataset"]}, "south": {"kinds": ["dataset"]}}, "quota_bytes": 1 << 30}),
        "closed": site_config("closed", root / "store" / "closed", [], operations=OPS, operation_modules=[]),
    }


@pytest.fixture(scope="module")
def mesh_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    root = tmp_path_factory.mktemp("moves-local")
    with private_federation(root / "fed", configs(root)) as fed:
        yield fed, root


@pytest.fixture(scope="module")
def mesh_flare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    root = tmp_path_factory.mktemp("moves-flare")
    with private_flare_federation(root / "fed", configs(root)) as fed:
        yield fed, root


@pytest.fixture(params=TRANSPORTS)
def mesh(request: pytest.FixtureRequest) -> tuple[Any, Path, FederationClient]:
    fed, root = request.getfixturevalue("mesh_local" if request.param == "local" else "mesh_flare")
    return fed, root, get_client(fed.federation_file)


def stored(root: Path, site: str) -> dict[str, int]:
    folder = root / "store" / site
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")} if folder.exists() else {}


def incoming(root: Path, site: str) -> list[str]:
    folder = root / "store" / site / ".incoming"
    return [str(p) for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def pooled_box(root: Path) -> xr.Dataset:
    return xr.open_zarr(root / "data" / "north.zarr").sel(lat=slice(0, 60)).load()


def test_a_flow_runs_a_step_at_another_site_and_the_data_never_passes_the_client(mesh, prefect_api):
    from prefect.client.orchestration import get_client as prefect_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from dfm_prefect.task_runner import FederationTaskRunner

    fed, root, client = mesh
    before = {site: client.stats(site) for site in ("north", "hub")}
    client_in = sum(client.bytes_in.values())

    @flow(task_runner=FederationTaskRunner(fed.federation_file))
    def at_the_hub():
        box = subset.submit(data="dfm://north/temperature", ranges=NORTH_BOX)                     # stays at north (a view)
        warm = derive.submit(data=box, variables={"celsius": "temperature - 273.15"}, site="hub")  # north → hub
        return moments.submit(data=warm, dims=["lat", "lon"], groupby="time.year").result()  # at hub, the answer leaves

    state = at_the_hub(return_state=True)
    agg = state.result()
    assert agg.site == "hub"
    expected = (pooled_box(root)["temperature"] - 273.15).groupby("time.year").sum(dim=["time", "lat", "lon"])
    np.testing.assert_allclose(agg.fetch()["celsius__wx"].values, expected.values, rtol=1e-6)

    after = {site: client.stats(site) for site in ("north", "hub")}
    moved = after["north"].bytes_to_sites - before["north"].bytes_to_sites
    assert moved > 10 << 20  # the whole box (a view, materialized at north for the move)
    assert after["hub"].bytes_from_sites - before["hub"].bytes_from_sites == moved
    assert after["north"].bytes_out == before["north"].bytes_out  # nothing from north to any client
    assert sum(client.bytes_in.values()) - client_in < 1 << 20  # the client got only the small aggregate
    assert agg.lineage().split(" → ")[:3] == ["dfm://north/temperature", 'xarray.subset(ranges={"lat":{"start":0,"stop":60}})', "dfm.move(from=north)"]

    flow_run_id = str(state.state_details.flow_run_id)
    runs = {run.name: run for run in read_task_runs(flow_run_id)}
    move = runs["move@north→hub"]
    assert move.state_name == "Completed"
    assert {"site:north", "site:hub", "op:dfm.move"} <= set(move.tags)
    with prefect_client(sync_client=True) as api:
        artifacts = api.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    report = next(a.data for a in artifacts if a.type == "markdown" and "Federation report" in (a.data or ""))
    assert "## Moves between sites" in report and f"| north | hub | {moved:,} |" in report
    rows = json.loads(next(a.data for a in artifacts if a.type == "table" and a.task_run_id is None))
    derive_row = next(row for row in rows if row["op"] == "xarray.derive")
    assert derive_row["site"] == "hub" and "named by the flow; its inputs from north move there" in derive_row["placement"]


def test_placement_moves_the_fewest_bytes_and_says_why(mesh, prefect_api):
    from dfm_prefect.task_runner import FederationTaskRunner

    fed, root, client = mesh

    big = client.call("north", "xarray.subset", {"data": "temperature", "ranges": NORTH_BOX})
    small = client.call("north", "xarray.subset", {"data": "temperature", "ranges": {"lat": {"start": 0, "stop": 10}}})
    tiny = {"time": {"start": "2000-01-01", "stop": "2000-01-01"}, "lat": {"start": -2, "stop": 0}, "lon": {"start": 0, "stop": 10}}
    at_south = client.call("south", "xarray.subset", {"data": "temperature", "ranges": tiny})  # under south's 1000 bytes for hub
    # Both inputs at north, which offers the operation: nothing moves.
    assert client.place("xarray.derive", data=[big, small]).site == "north"
    # Named by the flow: the inputs move there, and the reason says how much.
    placed = client.place("xarray.derive", data=[big, small], explicit="hub")
    assert placed.site == "hub" and placed.moves == (big, small)
    assert f"move there ({big.size + small.size:,} bytes)" in placed.reason
    # Inputs on two sites: only hub may receive from both (north and south send each other nothing).
    both = client.place("xarray.derive", data=[big, at_south])
    assert both.site == "hub" and "hub: moves" in both.reason and "north: south does not send" in both.reason

    # In a flow, the move is a task run of its own and the step runs where placement said.
    @flow(task_runner=FederationTaskRunner(fed.federation_file))
    def joined():
        return moments.submit(data=big, dims=["lat", "lon"], site="hub").result()

    assert joined().site == "hub"


@pytest.mark.parametrize("case", ["source refuses the kind", "source refuses the size", "destination accepts nothing"])
def test_a_move_either_side_refuses_fails_before_any_byte_leaves(mesh, case):
    fed, root, client = mesh
    source, target = {"source refuses the kind": ("north", "hub"), "source refuses the size": ("south", "hub"),
                      "destination accepts nothing": ("north", "closed")}[case]
    ref = client.call(source, "xarray.subset", {"data": "temperature", "ranges": {"lat": {"start": -60, "stop": 60}}})
    if case == "source refuses the kind":
        ref = client.call(source, "xarray.moments", {"data": ref.model_dump(mode="json"), "dims": ["lat", "lon"]})
    before = client.stats(source).bytes_to_sites, stored(root, target)
    expected = {
        "source refuses the kind": "imports.sites.north.kinds",  # hub takes only datasets from north
        "source refuses the size": "export.sites.hub.max_bytes",  # south sends hub at most 1000 bytes per result
        "destination accepts nothing": "this site accepts no results from site 'north' (imports.sites names: none)",
    }[case]
    with pytest.raises(ExportRefusedError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        client.call(target, "dfm.move", {"ref": ref.model_dump(mode="json")})
    assert (client.stats(source).bytes_to_sites, stored(root, target)) == before
    assert incoming(root, target) == []


def test_a_site_cannot_fetch_without_a_persons_move_request(mesh_local):
    """A site (its own certificate) fetching a result with no grant, or with a grant for another site or result, is refused."""
    from dfm_prefect.core.identity import Signer
    from dfm_prefect.core.wire import FetchRequest, RunRequest
    from dfm_prefect.transports.local.client import LocalSpec, LocalTransport
    from site_workers.peers import Peers

    fed, root = mesh_local
    client = get_client(fed.federation_file)
    box = client.call("north", "xarray.subset", {"data": "temperature", "ranges": NORTH_BOX})
    other = client.call("north", "xarray.subset", {"data": "temperature", "ranges": {"lat": {"start": 0, "stop": 30}}})
    spec = LocalSpec.model_validate_json((fed.workdir / "identities" / "site-hub.json").read_text())
    transport = LocalTransport(spec)
    peers = Peers("hub", transport.send, transport.signer())
    transport.open(peers.on_message, peers.on_lost)
    person = Signer.from_files(fed.spec.cert, fed.spec.key)
    try:
        grant_for = lambda ref, site: person.sign(RunRequest(id=os.urandom(8).hex(), op="dfm.move", params={"ref": ref.model_dump(mode="json")}), site)  # noqa: E731
        cases = {
            "no grant": (None, "without a move request signed for it"),
            "grant for another site": (grant_for(box, "closed"), "signature does not match"),
            "grant for another result": (grant_for(other, "hub"), "but its move request names"),
        }
        for grant, error in cases.values():
            with pytest.raises(Exception, match=error):
                peers.request("north", FetchRequest(id=os.urandom(8).hex(), ref=box, grant=grant), 60)
        # A person's own certificate cannot fetch as a site either: it fetches as a client, under the client rules.
        with pytest.raises(ExportRefusedError, match="may not leave this site"):
            box.fetch(client)
        # With the right grant the fetch is allowed (what hub does during a move).
        chunk = peers.request("north", FetchRequest(id=os.urandom(8).hex(), ref=box, grant=grant_for(box, "hub")), 120)
        assert chunk.materialized is not None and chunk.total > 0
    finally:
        transport.close()


def test_a_large_move_streams_with_memory_bounded_at_both_ends(mesh, tmp_path):
    fed, root, client = mesh
    # ~ 200 MB in memory: the whole northern field as float64, materialized at north for the move.
    wide = client.call("north", "xarray.subset", {"data": "big"})
    assert wide.size > 50 << 20
    # A small move first, so that both processes have loaded what moves need (libraries, connections).
    small = client.call("north", "xarray.subset", {"data": "big", "ranges": {"lat": {"start": 0, "stop": 5}}})
    client.call("hub", "dfm.move", {"ref": small.model_dump(mode="json")})
    pids = {site: site_processes(fed, site) for site in ("north", "hub")}
    rss = lambda site: sum(psutil.Process(pid).memory_info().rss for pid in pids[site])  # noqa: E731
    start = {site: rss(site) for site in pids}
    peak = dict(start)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            for site in pids:
                peak[site] = max(peak[site], rss(site))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        moved = client.call("hub", "dfm.move", {"ref": wide.model_dump(mode="json")})
    finally:
        done.set()
        sampler.join()
    assert moved.site == "hub" and moved.size > 50 << 20
    # hub writes pieces to disk as they arrive: its memory grows by the pieces in flight (at most 4 of 4 MiB,
    # base64 in JSON, over FLARE also in the mesh's 1 MiB chunks), not by the payload; bench/moves.py shows it at 1 GB.
    flare = hasattr(fed, "site_log")  # a FLARE site is two processes (its FLARE client and the mesh job's)
    assert peak["hub"] - start["hub"] < (128 if flare else 64) << 20, (peak, start, moved.size)
    # north materializes the view chunk by chunk and sends it piece by piece.
    assert peak["north"] - start["north"] < (192 if flare else 96) << 20, (peak, start, moved.size)


def test_a_source_that_dies_mid_move_fails_the_move_naming_it_and_a_retry_completes(mesh):
    fed, root, client = mesh
    wide = client.call("north", "xarray.subset", {"data": "big"})
    before = stored(root, "hub")
    _, future = client.run("hub", "dfm.move", {"ref": wide.model_dump(mode="json")})
    deadline = time.monotonic() + 60
    while client.stats("north").bytes_to_sites == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    fed.stop_site("north", kill=True)
    with pytest.raises(SiteUnavailableError, match="north"):
        from dfm_prefect.core.wire import unwrap

        unwrap(future.result(timeout=120))
    assert stored(root, "hub") == before and incoming(root, "hub") == []
    restart_site(fed, client, "north")
    moved = client.call("hub", "dfm.move", {"ref": wide.model_dump(mode="json")})
    assert moved.site == "hub" and moved.size > 0


class _Flipper:
    """A TCP relay that damages one byte of the first piece of result data going to the receiving site."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flipped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            outbound = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(inbound, outbound, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(outbound, inbound, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, damage: bool) -> None:
        seen = b""
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                for sock in (src, dst):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            if damage and not self.flipped:
                window = seen[-64:] + data
                at = window.find(b'"data":"')
                if at >= 0 and at + 40 < len(window):
                    i = at + 30 - (len(window) - len(data))
                    if 0 <= i < len(data):
                        b = bytearray(data)
                        b[i] = ord("A") if b[i] != ord("A") else ord("B")
                        data = bytes(b)
                        self.flipped = True
                seen = window
            dst.sendall(data)

    def close(self) -> None:
        self.listener.close()


def test_a_piece_damaged_on_the_way_is_caught_and_nothing_is_stored(tmp_path):
    root = tmp_path
    cfg = configs(root)
    with private_federation(root / "fed", {"north": cfg["north"], "hub": cfg["hub"]}) as fed:
        # hub reaches north through a relay that flips one base64 character of the first piece.
        peers_file = fed.workdir / "identities" / "site-hub.json"
        spec = json.loads(peers_file.read_text())
        host, port = spec["sites"]["north"].rsplit(":", 1)
        flipper = _Flipper((host, int(port)))
        spec["sites"]["north"] = f"127.0.0.1:{flipper.port}"
        peers_file.write_text(json.dumps(spec))
        fed.stop_site("hub")
        fed._peers_file = lambda name: peers_file  # keep the relayed file on restart
        fed.start_site("hub")
        client = get_client(fed.federation_file)
        client.refresh()
        box = client.call("north", "xarray.subset", {"data": "temperature", "ranges": NORTH_BOX})
        with pytest.raises(ResultIntegrityError, match="arrived damaged from site 'north'.*nothing was stored"):
            client.call("hub", "dfm.move", {"ref": box.model_dump(mode="json")})
        assert flipper.flipped
        assert stored(root, "hub") == {} and incoming(root, "hub") == []
        flipper.close()


FENCE = re.compile(r"```(python|yaml)\n(.*?)```", re.S)
ROOT = Path(__file__).resolve().parents[1]


def fenced(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def test_the_site_rules_the_docs_show_are_valid_configs():
    from site_workers.config import parse_site_config

    configs = [yaml.safe_load(block) for block in fenced(ROOT / "docs" / "mesh.md", "yaml")]
    whole = [parse_site_config(c) for c in configs if "name" in c]
    assert {c.name for c in whole} == {"north", "hub"}
    north, hub = sorted(whole, key=lambda c: c.name != "north")
    assert north.export.sites["hub"].kinds == ["dataset"] and hub.imports.sites["north"].kinds == ["dataset"]
    (partial,) = [c for c in configs if "name" not in c]
    assert partial["sources"][0]["views"] is False


def test_the_docs_pipelines_and_the_example_flow_run_across_sites(mesh, prefect_api, monkeypatch):
    from flows.cross_site_pipeline import cross_site_pipeline

    fed, root, client = mesh
    monkeypatch.setenv("DFM_FEDERATION", str(fed.federation_file))
    moved_before = client.stats("north").bytes_to_sites
    examples = fenced(ROOT / "docs" / "mesh.md", "python") + [
        block for block in fenced(ROOT / "README.md", "python") if 'site="hub"' in block
    ]
    assert len(examples) == 3
    for block in examples:
        namespace: dict[str, Any] = {}
        exec(compile(block, "docs example", "exec"), namespace)  # noqa: S102 (our own docs, run as a user would)
        flows = [value for value in namespace.values() if hasattr(value, "fn") and hasattr(value, "flow_run_name")]
        (example,) = flows
        result = example()
        assert result  # a lineage line, or the hub's aggregate
    assert client.stats("north").bytes_to_sites > moved_before
    answer = cross_site_pipeline(data="dfm://north/temperature", compute_site="hub", start="2000-01-01", stop="2001-12-31")
    # The site derives in the data's own precision (float32), then sums in float64.
    pooled = (xr.open_zarr(root / "data" / "north.zarr")["temperature"] - 273.15).astype("float64")
    weights = np.cos(np.deg2rad(pooled["lat"])) * pooled.notnull()
    mean = (pooled * weights).groupby("time.year").sum(dim=["time", "lat", "lon"]) / weights.groupby("time.year").sum(dim=["time", "lat", "lon"])
    for year in (2000, 2001):
        assert answer[year]["mean"] == pytest.approx(float(mean.sel(year=year)), rel=1e-9)
    assert set(answer) == {2000, 2001}


def test_federation_status_counts_the_bytes_between_sites(mesh_local):
    fed, _ = mesh_local
    shown = subprocess.run(
        [sys.executable, "-m", "dfm_prefect.cli", "federation", "status", "--federation", str(fed.federation_file)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "to other sites" in shown.stdout and "from other sites" in shown.stdout
    client = get_client(fed.federation_file)
    counters = shown.stdout.split("Bytes that crossed", 1)[1]
    row = next(line for line in counters.splitlines() if line.strip("│ ").startswith("north"))
    assert f"{client.stats('north').bytes_to_sites:,}" in row
