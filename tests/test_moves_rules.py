"""The rules of moves between sites, without processes: the mesh controller's routing, identities and the sites' rules.

The workers here are real `SiteWorker`s in this process, wired to each other
by `Peers` that hand each frame to the other worker as its transport would
(saying which site sent it); the transports themselves are covered by
``test_moves.py``.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from dfm_prefect.core.errors import AccessDeniedError, AuthenticationError, ConfigError, DisclosureRefusedError, ExportRefusedError
from dfm_prefect.core.identity import Signer
from dfm_prefect.core.wire import ErrorReply, FetchRequest, RunRequest, RunResult
from dfm_prefect.transports.flare.mesh.mailbox import Mailboxes
from dfm_prefect.transports.flare.mesh.router import Router
from dfm_prefect.transports.flare.protocol import Hello, ReplyChunk, SiteFrame
from dfm_prefect.transports.local.pki import LocalCA
from site_workers.config import parse_site_config
from site_workers.peers import Peers
from site_workers.worker import SiteWorker
from tests.test_adapters_support import small_climate

# ------------------------------------------------------------------ the mesh controller


def _router() -> Router:
    router = Router(["north", "hub", "south"], mailboxes=Mailboxes())
    for site, incarnation in (("north", "n1"), ("hub", "h1"), ("south", "s1")):
        router.hello(Hello(site=site, incarnation=incarnation, pid=1), site)
    return router


def _frame(site: str, incarnation: str, target: str) -> SiteFrame:
    return SiteFrame(site=site, incarnation=incarnation, target=target, id=uuid.uuid4().hex, data="{}")


def test_the_controller_marks_a_site_frame_with_its_real_sender_and_routes_answers_only_back_to_it():
    router = _router()
    assert router.site_frame(_frame("hub", "h1", "north"), "hub").accepted
    (frame,) = router.next_batch("north", threading.Event()).frames
    assert (frame.peer, frame.from_site) == ("site:hub", "hub")  # set by the controller, from FLARE's sender
    # A site cannot send as another site, from an old process, to itself, or to a site that is not in the job.
    assert router.site_frame(_frame("hub", "h1", "north"), "south").reason == "spoke for another site"
    assert router.site_frame(_frame("hub", "h0", "north"), "hub").reason == "not its current job process"
    assert router.site_frame(_frame("hub", "h1", "hub"), "hub").reason == "a site does not send frames to itself"
    assert "not part of this mesh job" in (router.site_frame(_frame("hub", "h1", "mars"), "hub").reason or "")
    assert router.site_frame(_frame("hub", "h1", "north"), None).reason == "not a site of this mesh job"

    # north answers hub (it was dispatched hub's frame); the pieces go to hub in its next dispatch.
    answer = ReplyChunk(site="north", incarnation="n1", peer="site:hub", frame="f", index=0, count=1, data="answer")
    assert router.reply(answer, "north").accepted
    batch = router.next_batch("hub", threading.Event())
    assert [(piece.site, piece.data) for piece in batch.replies] == [("north", "answer")]
    # south never got a frame from hub: it cannot push "answers" into hub.
    pushed = ReplyChunk(site="south", incarnation="s1", peer="site:hub", frame="g", index=0, count=1, data="junk")
    refused = router.reply(pushed, "south")
    assert not refused.accepted and refused.reason == "reply to a client that sent it nothing"
    # Dead sites are announced (a move waiting for one fails at once).
    router.mark_dead("north", "gone")
    assert router.dead_sites() == ["north"]
    assert not router.site_frame(_frame("hub", "h1", "north"), "hub").accepted


# ---------------------------------------------------------------------- sites in process


class Mesh:
    """Site workers in this process, each reaching the others through `Peers` as a transport would."""

    def __init__(self, configs: dict[str, dict[str, Any]], ca: LocalCA) -> None:
        self.workers: dict[str, SiteWorker] = {}
        self.peers: dict[str, Peers] = {}
        self.person = Signer.from_files(*ca.issue("alice"))
        for name, config in configs.items():
            self.peers[name] = Peers(name, self._sender(name))
            self.workers[name] = SiteWorker(parse_site_config(config), root_ca=str(ca.root_ca), peers=self.peers[name])

    def _sender(self, name: str):
        def send(site: str, messages: list[Any]) -> None:
            for message in messages:
                self.workers[site].handle_message(message, lambda answer, to=name, frm=site: self.peers[to].on_message(frm, answer), from_site=name)

        return send

    def run(self, site: str, op: str, params: dict[str, Any], signed: bool = True) -> RunResult:
        done, replies = threading.Event(), []

        def reply(message: Any) -> None:
            if isinstance(message, (RunResult, ErrorReply)):
                replies.append(message)
                done.set()

        request = RunRequest(id=uuid.uuid4().hex, op=op, params=params)
        self.workers[site].handle_message(self.person.sign(request, site) if signed else request, reply)
        assert done.wait(120)
        return replies[0]

    def ref(self, site: str, op: str, **params: Any) -> Any:
        result = self.run(site, op, params)
        assert result.ok, result.error
        return result.ref

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()


@pytest.fixture
def mesh(tmp_path: Path):
    small_climate(seed=3).load().chunk({"time": 50}).to_zarr(tmp_path / "t.zarr", zarr_format=2, consolidated=True)
    source = [{"name": "temperature", "url": f"file://{tmp_path / 't.zarr'}"}]
    ops = ["xarray.subset", "xarray.moments", "xarray.write"]
    export = {"kinds": ["aggregate", "value", "dataset"], "sites": {"hub": {"kinds": ["dataset", "aggregate"]}}}
    configs = {
        "north": {"name": "north", "operations": ops, "sources": source, "result_store": {"url": f"file://{tmp_path / 'north'}"}, "export": export},
        "hub": {
            "name": "hub", "operations": ops, "result_store": {"url": f"file://{tmp_path / 'hub'}"},
            "export": {"kinds": ["aggregate", "value"]},
            "imports": {"sites": {"north": {"kinds": ["dataset", "aggregate"]}}, "quota_bytes": 1_500_000},
        },
    }  # fmt: skip
    mesh = Mesh(configs, LocalCA.create(tmp_path / "ca"))
    yield mesh
    mesh.close()


def move(mesh: Mesh, ref: Any, site: str = "hub", signed: bool = True) -> RunResult:
    return mesh.run(site, "dfm.move", {"ref": ref.model_dump(mode="json")}, signed=signed)


def test_the_receivers_quota_holds_across_moves(mesh):
    small = mesh.ref("north", "xarray.write", data="temperature", variables=["temperature"])  # ~1 MB stored: one fits the quota, two do not
    assert move(mesh, small).ok
    second = move(mesh, small)
    assert not second.ok and second.error.code == ExportRefusedError.code
    assert "imports.quota_bytes" in second.error.message


def test_a_moved_aggregate_is_not_released_where_it_cannot_be_counted(mesh):
    agg = mesh.ref("north", "xarray.moments", data="temperature", dims=["lat", "lon"])
    moved = move(mesh, agg)
    assert moved.ok and moved.ref.site == "hub" and moved.payload is None
    # hub counted nothing itself, so its disclosure rules keep the aggregate in.
    fetched: list[Any] = []
    mesh.workers["hub"].handle_message(mesh.person.sign(FetchRequest(id="f1", ref=moved.ref), "hub"), fetched.append)
    assert isinstance(fetched[0], ErrorReply) and fetched[0].error.code == DisclosureRefusedError.code


def test_a_site_must_present_a_grant_for_itself_and_that_result(mesh):
    box = mesh.ref("north", "xarray.subset", data="temperature", ranges={"lat": {"start": 0, "stop": 40}})
    hub = mesh.peers["hub"]
    with pytest.raises(AccessDeniedError, match="without a move request signed for it"):
        hub.request("north", FetchRequest(id="x1", ref=box), 30)
    other = mesh.ref("north", "xarray.subset", data="temperature", ranges={"lat": {"start": 0, "stop": 20}})
    grant = mesh.person.sign(RunRequest(id="g1", op="dfm.move", params={"ref": other.model_dump(mode="json")}), "hub")
    with pytest.raises(AccessDeniedError, match="but its move request names"):
        hub.request("north", FetchRequest(id="x2", ref=box, grant=grant), 30)
    # A grant nobody signed is no grant, whatever identities.require says.
    unsigned = RunRequest(id="g0", op="dfm.move", params={"ref": box.model_dump(mode="json")})
    with pytest.raises(AuthenticationError, match="is not signed by anyone"):
        hub.request("north", FetchRequest(id="x4", ref=box, grant=unsigned), 30)
    # A site that may receive nothing from north is refused by north's own rules, grant or not.
    stranger = mesh.peers["south"] = Peers("south", mesh._sender("south"))
    good = mesh.person.sign(RunRequest(id="g2", op="dfm.move", params={"ref": box.model_dump(mode="json")}), "south")
    with pytest.raises(ExportRefusedError, match="this site sends no results to site 'south'"):
        stranger.request("north", FetchRequest(id="x3", ref=box, grant=good), 30)


def test_only_a_site_certificate_speaks_for_a_site_and_only_where_sites_sign(tmp_path):
    ca = LocalCA.create(tmp_path / "ca")
    with pytest.raises(ConfigError):
        ca.issue("site:hub")  # a person's name cannot say "site:"
    cert, key = ca.issue_site("hub")
    signer = Signer.from_files(cert, key)
    assert signer.identity == "site:hub"
    config = parse_site_config({"name": "north", "operations": ["core.echo"], "result_store": {"url": f"file://{tmp_path / 's'}"}})
    answers: list[Any] = []
    # Where the transport says who a site is (FLARE), a certificate naming a site is refused.
    flare_like = SiteWorker(config, root_ca=str(ca.root_ca), site_certificates=False)
    flare_like.handle_message(signer.sign(FetchRequest(id="a1", ref=_fake_ref()), "north"), answers.append)
    assert isinstance(answers[-1], ErrorReply) and answers[-1].error.code == AuthenticationError.code
    assert "a certificate cannot speak for one" in answers[-1].error.message
    flare_like.close()
    # Where sites sign (the local transport), it is that site, which may only fetch: a run from it is refused.
    local = SiteWorker(config, root_ca=str(ca.root_ca), site_certificates=True)
    local.handle_message(signer.sign(RunRequest(id="r1", op="core.echo", params={"value": 1}), "north"), answers.append)
    assert isinstance(answers[-1], ErrorReply) and "another site may only fetch results it moves" in answers[-1].error.message
    local.close()


def _fake_ref() -> Any:
    from dfm_prefect.core.refs import DataRef

    return DataRef(site="north", uri="file:///nowhere/" + "0" * 32 + ".dataset.netcdf", kind="dataset", format="netcdf", size=1, sha256="0" * 64, op="x.y")


def test_a_move_needs_a_signed_request_and_another_site(mesh):
    box = mesh.ref("north", "xarray.subset", data="temperature", ranges={"lat": {"start": 0, "stop": 40}})
    unsigned = move(mesh, box, signed=False)
    assert not unsigned.ok and unsigned.error.code == AuthenticationError.code and "signed request" in unsigned.error.message
    # A "move" to the site that holds the result would hand back the client's own reference: refused.
    agg = mesh.ref("north", "xarray.moments", data="temperature", dims=["lat", "lon"], groupby="time.dayofyear")
    forged = agg.model_copy(update={"contributors": 1000})
    to_itself = move(mesh, forged, site="north")
    assert not to_itself.ok and "already held by site 'north'" in to_itself.error.message and to_itself.payload is None


def test_the_export_gate_decides_on_the_stores_count_not_the_references(tmp_path):
    from site_workers.config import ExportPolicy
    from site_workers.policy import ExportGate
    from site_workers.store import ResultStore

    store = ResultStore("north", parse_site_config({"name": "north", "operations": [], "result_store": {"url": f"file://{tmp_path}"}}).result_store)
    ref, payload = store.put({"a": 1}, op="x.y", kind="aggregate", summary={}, contributors=1)
    gate = ExportGate("north", ExportPolicy(kinds=["aggregate"]))
    assert gate.inline(ref, payload, store) is None
    assert gate.inline(ref.model_copy(update={"contributors": 1000}), payload, store) is None  # the stored name says 1


def test_a_view_whose_size_was_lowered_is_refused_before_anything_is_computed(mesh):
    box = mesh.ref("north", "xarray.subset", data="temperature", ranges={"lat": {"start": 0, "stop": 40}})
    lowered = box.model_copy(update={"size": 0})
    answers: list[Any] = []
    mesh.workers["north"].handle_message(mesh.person.sign(FetchRequest(id="s0", ref=lowered), "north"), answers.append)
    assert isinstance(answers[0], ErrorReply) and answers[0].error.code == AccessDeniedError.code
    assert not any(p.name.endswith(".netcdf") for p in Path(mesh.workers["north"].store.root).iterdir())


def test_a_move_may_outlast_the_freshness_of_its_grant(tmp_path):
    """The holder checks a grant in full on the first piece; later pieces of the same move are taken on that check."""
    import time as clock

    small_climate(seed=4).load().chunk({"time": 50}).to_zarr(tmp_path / "t.zarr", zarr_format=2, consolidated=True)
    north = {
        "name": "north", "operations": ["xarray.subset"], "identities": {"max_age_s": 1.0},
        "sources": [{"name": "temperature", "url": f"file://{tmp_path / 't.zarr'}"}],
        "result_store": {"url": f"file://{tmp_path / 'north'}"},
        "export": {"kinds": ["aggregate"], "sites": {"hub": {"kinds": ["dataset"]}}},
    }  # fmt: skip
    hub = {"name": "hub", "operations": [], "result_store": {"url": f"file://{tmp_path / 'hub'}"}}
    mesh = Mesh({"north": north, "hub": hub}, LocalCA.create(tmp_path / "ca"))
    try:
        box = mesh.ref("north", "xarray.subset", data="temperature")
        grant = mesh.person.sign(RunRequest(id="g", op="dfm.move", params={"ref": box.model_dump(mode="json")}), "hub")
        first = mesh.peers["hub"].request("north", FetchRequest(id="p1", ref=box, grant=grant, length=1 << 16), 60)
        clock.sleep(1.5)  # the grant's signature is now older than north accepts
        later = mesh.peers["hub"].request("north", FetchRequest(id="p2", ref=first.materialized, grant=grant, offset=1 << 16, length=1 << 16), 60)
        assert later.offset == 1 << 16
        stale = mesh.person.sign(RunRequest(id="g2", op="dfm.move", params={"ref": box.model_dump(mode="json")}), "hub")
        clock.sleep(1.5)
        with pytest.raises(AuthenticationError, match="signed"):
            mesh.peers["hub"].request("north", FetchRequest(id="p3", ref=box, grant=stale), 60)
    finally:
        mesh.close()
