"""The FLARE transport's parts that do not need FLARE: chunks, mailboxes, the router, reply sending,
the client's job link, kit hardening and the job folder."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from dfm_prefect.core.errors import MalformedRequestError
from dfm_prefect.core.wire import DescribeRequest, ErrorInfo, ErrorReply, ProgressUpdate, ReplyEnvelope, RunRequest, SiteLoad
from dfm_prefect.transports.flare.chunks import Reassembler, split
from dfm_prefect.transports.flare.deploy.job import ALLOW_PREFIX, MeshJobConfig, write_job
from dfm_prefect.transports.flare.deploy.kits import harden_kit, kit_policy_problems
from dfm_prefect.transports.flare.link import JobLink
from dfm_prefect.transports.flare.mesh.mailbox import Delivery, Mailboxes
from dfm_prefect.transports.flare.mesh.replies import ReplySender
from dfm_prefect.transports.flare.mesh.router import Router
from dfm_prefect.transports.flare.protocol import (
    ClientFrame,
    ExchangeReply,
    ExchangeRequest,
    Heartbeat,
    Hello,
    Piece,
    ReplyAck,
    ReplyChunk,
    SiteState,
    StatusRequest,
    peer_of,
)


def test_chunks_split_and_rejoin_interleaved_frames():
    joiner = Reassembler()
    a, b = split("a" * 10, 4), split("b" * 5, 4)
    assert [len(p) for p in a] == [4, 4, 2]
    assert joiner.add(("north", "A"), 0, 3, a[0]) is None
    assert joiner.add(("south", "B"), 0, 2, b[0]) is None
    assert joiner.add(("north", "A"), 1, 3, a[1]) is None
    assert joiner.add(("south", "B"), 1, 2, b[1]) == "b" * 5
    assert joiner.add(("north", "A"), 2, 3, a[2]) == "a" * 10
    assert joiner.pending_bytes == 0
    with pytest.raises(MalformedRequestError, match="piece 2 of 3"):
        joiner.add(("north", "C"), 2, 3, "x")


def test_chunks_resent_after_a_lost_acknowledgement_are_ignored_and_other_frames_kept():
    joiner = Reassembler()
    a, b = split("a" * 10, 4), split("b" * 9, 4)
    assert joiner.add("A", 0, 3, a[0]) is None
    assert joiner.add("B", 0, 3, b[0]) is None
    assert joiner.add("A", 0, 3, a[0]) is None  # resent while A is being joined
    assert joiner.add("A", 1, 3, a[1]) is None
    assert joiner.add("A", 2, 3, a[2]) == "a" * 10
    assert joiner.add("A", 2, 3, a[2]) is None  # resent after A was whole: A is not whole twice
    assert joiner.add("S", 0, 1, "single") == "single"
    assert joiner.add("S", 0, 1, "single") is None
    assert joiner.add("B", 1, 3, b[1]) is None and joiner.add("B", 2, 3, b[2]) == "b" * 9  # B was kept throughout
    with pytest.raises(MalformedRequestError, match="piece 0 of 3 arrived after 1"):
        joiner.add("C", 0, 3, "x") or joiner.add("C", 0, 3, "y")  # the same index with other data is no resend
    assert joiner.pending_bytes == 0


def test_mailboxes_redeliver_until_acknowledged_and_keep_clients_apart():
    boxes = Mailboxes()
    for client in ("c1", "c2"):
        boxes.begin(client, ack=0, watched=True)
    boxes.deliver("c1", "north", "f1", 0, 1, "one")
    boxes.deliver("c2", "north", "f2", 0, 1, "other client")
    first, _ = boxes.collect("c1", ack=0, wait=0, max_bytes=1 << 20)
    again, _ = boxes.collect("c1", ack=0, wait=0, max_bytes=1 << 20)
    assert [p.data for p in first] == [p.data for p in again] == ["one"]
    boxes.deliver("c1", "north", "f3", 0, 1, "two")
    after_ack, _ = boxes.collect("c1", ack=first[-1].seq, wait=0, max_bytes=1 << 20)
    assert [p.data for p in after_ack] == ["two"]
    assert [p.data for p in boxes.collect("c2", ack=0, wait=0, max_bytes=1 << 20)[0]] == ["other client"]


def test_mailbox_long_poll_returns_when_a_reply_arrives_and_limits_bytes():
    from dfm_prefect.transports.flare.protocol import piece_cost

    boxes = Mailboxes(max_bytes=piece_cost("f", "12345") + piece_cost("g", "67890"))  # each piece costs its overhead too
    boxes.begin("c", ack=0, watched=True)
    threading.Timer(0.1, lambda: boxes.deliver("c", "north", "f", 0, 1, "12345")).start()
    started = time.monotonic()
    pieces, more = boxes.collect("c", ack=0, wait=5.0, max_bytes=1 << 20)
    assert [p.data for p in pieces] == ["12345"] and not more
    assert time.monotonic() - started < 2.0
    assert boxes.deliver("c", "north", "g", 0, 1, "67890") is Delivery.QUEUED
    assert boxes.deliver("c", "north", "h", 0, 1, "x") is Delivery.FULL  # over budget: the site resends later
    pieces, more = boxes.collect("c", ack=0, wait=0, max_bytes=6)
    assert len(pieces) == 1 and more


def _secret(name: str) -> str:
    """A mailbox secret for a named test client (its peer id, what sites see, is peer_of(it))."""
    return f"{name}-secret".ljust(32, "x")


def _peer(name: str) -> str:
    return peer_of(_secret(name))


def _router(clock: list[float]) -> Router:
    return Router(["north", "south"], site_timeout=3.0, clock=lambda: clock[0])


def _frame(site: str, frame_id: str = "f1") -> ClientFrame:
    return ClientFrame(id=frame_id, site=site, data="{}")


def test_router_refuses_frames_until_a_site_said_hello_and_drops_them_when_it_dies():
    clock = [100.0]
    router = _router(clock)
    reply = router.exchange(ExchangeRequest(mailbox=_secret("c"), frames=[_frame("north")]))
    assert "has not said hello" in reply.rejected["north"] and reply.sites["north"].state == "starting"
    router.hello(Hello(site="north", incarnation="i1", pid=7, capacity=4), "north")
    reply = router.exchange(ExchangeRequest(mailbox=_secret("c"), frames=[_frame("north", "f2"), _frame("mars", "f3")]))
    assert reply.sites["north"].state == "ready" and "not part of this mesh job" in reply.rejected["mars"]
    stop = threading.Event()
    batch = router.next_batch("north", stop)
    assert batch is not None and [f.peer for f in batch.frames] == [_peer("c")]
    router.exchange(ExchangeRequest(mailbox=_secret("c"), frames=[_frame("north", "f4")]))
    clock[0] += 3.5
    assert router.check_liveness() == ["north"]
    reply = router.exchange(ExchangeRequest(mailbox=_secret("c"), frames=[_frame("north", "f5")]))
    assert reply.sites["north"].reason.startswith("no heartbeat") and "is dead" in reply.rejected["north"]
    stop.set()
    assert router.next_batch("north", stop) is None  # f4 was dropped with the dead site


def test_router_ignores_resent_frames_and_tracks_heartbeats_and_incarnations():
    clock = [0.0]
    router = _router(clock)
    router.hello(Hello(site="south", incarnation="a", pid=1), "south")
    router.exchange(ExchangeRequest(mailbox=_secret("c"), frames=[_frame("south", "same")]))
    router.exchange(ExchangeRequest(mailbox=_secret("c"), frames=[_frame("south", "same")]))
    assert len(router.next_batch("south", threading.Event()).frames) == 1
    assert router.heartbeat(Heartbeat(site="south", incarnation="a", load=SiteLoad(running=2, capacity=4)), "south") is True
    assert router.states()["south"].load.running == 2
    assert router.heartbeat(Heartbeat(site="south", incarnation="old"), "south") == "not its current job process"
    router.hello(Hello(site="south", incarnation="b", pid=2), "south")
    assert router.states()["south"].incarnation == "b"
    router.hello(Hello(site="north", incarnation="x", pid=3, error="config names 'mars'"), "north")
    assert router.status(StatusRequest()).sites["north"].reason == "could not start: config names 'mars'"


def test_router_status_waits_for_readiness_and_replies_reach_the_right_mailbox():
    router = _router([0.0])
    threading.Timer(0.1, lambda: router.hello(Hello(site="north", incarnation="i", pid=1), "north")).start()
    started = time.monotonic()
    status = router.status(StatusRequest(wait_ready=["north"], wait=5.0))
    assert status.sites["north"].state == "ready" and time.monotonic() - started < 2.0
    router.exchange(ExchangeRequest(mailbox=_secret("c9"), frames=[_frame("north")]))
    router.next_batch("north", threading.Event())
    ack = router.reply(ReplyChunk(site="north", incarnation="i", peer=_peer("c9"), frame="r", index=0, count=1, data="hi"), "north")
    assert ack.accepted
    assert [p.data for p in router.exchange(ExchangeRequest(mailbox=_secret("c9"))).pieces] == ["hi"]
    assert router.exchange(ExchangeRequest(mailbox=_secret("other"))).pieces == []


def test_reply_sender_batches_into_bounded_frames_and_resends_refused_chunks():
    sent: list[ReplyChunk] = []
    refusals = [True]

    def send(chunk: ReplyChunk) -> ReplyAck:
        if refusals and chunk.index == 1:
            refusals.pop()
            return ReplyAck(accepted=False, reason="full")
        sent.append(chunk)
        return ReplyAck(accepted=True)

    stop = threading.Event()
    sender = ReplySender("north", "inc", send, stop=stop, chunk_bytes=100, frame_bytes=300)
    messages = [ErrorReply(id=f"r{i}", error=ErrorInfo(code="x", message="m" * 50)) for i in range(6)]
    frames = sender.frames(messages)
    assert len(frames) > 1 and all(len(f) < 300 + 200 for f in frames)
    reply = sender.reply_for("client-1")
    for message in messages:
        reply(message)
    sender.close()
    joiner = Reassembler()
    got = []
    for chunk in sent:
        assert len(chunk.data) <= 100 and chunk.peer == "client-1"
        whole = joiner.add(chunk.frame, chunk.index, chunk.count, chunk.data)
        if whole is not None:
            got += [m.id for m in ReplyEnvelope.model_validate_json(whole).messages]
    assert got == [f"r{i}" for i in range(6)]
    assert sender.counters.resends == 1


def _pieces(frame: str, site: str = "north", start: int = 1, size: int = 10) -> list[Piece]:
    """The pieces of one frame, with its own frame id (as a site's sender gives each frame)."""
    parts, frame_id = split(frame, size), uuid.uuid4().hex
    return [Piece(seq=start + i, site=site, frame=frame_id, index=i, count=len(parts), data=p) for i, p in enumerate(parts)]


def test_job_link_reassembles_skips_duplicates_and_waits_past_progress():
    link = JobLink("job-1")
    ready = {"north": SiteState(state="ready", incarnation="i")}
    link.set_states(ready)
    link.expect("north", [RunRequest(id="r1", op="core.echo"), DescribeRequest(id="d1")])
    progress = ReplyEnvelope(messages=[ProgressUpdate(id="r1", fraction=0.5)]).model_dump_json()
    digest = link.absorb(ExchangeReply(pieces=_pieces(progress), sites=ready))
    assert [m.kind for _, m in digest.messages] == ["progress"] and "r1" in link.awaiting
    done = ReplyEnvelope(messages=[ErrorReply(id="r1", error=ErrorInfo(code="x", message="y"))]).model_dump_json()
    pieces = _pieces(done, start=link.ack + 1)
    assert [m.id for _, m in link.absorb(ExchangeReply(pieces=pieces, sites=ready)).messages] == ["r1"]
    assert link.absorb(ExchangeReply(pieces=pieces, sites=ready)).messages == []  # already acknowledged
    assert list(link.awaiting) == ["d1"]


def test_job_link_reports_sites_lost_by_death_restart_or_refusal():
    link = JobLink("job-1")
    link.set_states({"north": SiteState(state="ready", incarnation="a"), "south": SiteState(state="ready", incarnation="b")})
    link.expect("south", [RunRequest(id="s1", op="core.echo")])
    digest = link.absorb(
        ExchangeReply(
            sites={"north": SiteState(state="dead", reason="no heartbeat for 3.1s"), "south": SiteState(state="ready", incarnation="b2")},
        )
    )
    assert "no heartbeat" in digest.lost["north"] and "restarted" in digest.lost["south"]
    assert link.awaiting == {} and link.last_dead == "north: no heartbeat for 3.1s"
    link.expect("south", [RunRequest(id="s2", op="core.echo")])
    digest = link.absorb(ExchangeReply(sites=link.states, rejected={"south": "queue refused"}))
    assert digest.lost == {"south": "queue refused"}


def _kit(root: Path, role_rights: dict) -> Path:
    local = root / "local"
    local.mkdir(parents=True)
    (local / "resources.json.default").write_text(json.dumps({"class_allow_list": ["nvflare.app_common."], "components": []}))
    (local / "authorization.json.default").write_text(json.dumps({"format_version": "1.0", "permissions": role_rights}))
    return root


def test_hardened_kits_refuse_code_for_every_role_and_allow_only_the_mesh(tmp_path):
    kit = _kit(tmp_path / "north", {"project_admin": "any", "lead": {"submit_job": "any", "byoc": "any"}, "member": {"view": "any"}})
    assert "role 'project_admin' may submit jobs with code (byoc='any')" in kit_policy_problems(kit)
    changes = harden_kit(kit)
    assert any(ALLOW_PREFIX in c for c in changes)
    assert kit_policy_problems(kit) == []
    permissions = json.loads((kit / "local" / "authorization.json").read_text())["permissions"]
    assert {role: rights["byoc"] for role, rights in permissions.items()} == {"project_admin": "none", "lead": "none", "member": "none"}
    assert permissions["project_admin"]["submit_job"] == "any" and permissions["lead"]["app_command"] == "any"
    assert harden_kit(kit) == []  # idempotent


def test_hardened_kits_and_storage_roots_are_readable_by_their_owner_only(tmp_path):
    kit = _kit(tmp_path / "server", {"project_admin": "any"})
    kit.chmod(0o755)
    resources = json.loads((kit / "local" / "resources.json.default").read_text())
    resources["components"] = [{"id": "job_manager", "args": {}}]
    (kit / "local" / "resources.json.default").write_text(json.dumps(resources))
    changes = harden_kit(kit, storage_root=tmp_path / "store")
    assert "kit folder (FLARE writes its logs and job folders there): readable by its owner only (was 755)" in changes
    assert kit.stat().st_mode & 0o777 == 0o700 and (tmp_path / "store").stat().st_mode & 0o777 == 0o700
    assert harden_kit(kit, storage_root=tmp_path / "store") == [f"job store in {tmp_path / 'store' / 'jobs-storage'}"]


def test_the_mesh_job_is_config_only_and_names_allowed_classes(tmp_path):
    folder = write_job(tmp_path / "job", MeshJobConfig(site_timeout=2.5))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["app/config/config_fed_client.json", "app/config/config_fed_server.json", "meta.json"]
    server = json.loads((folder / "app/config/config_fed_server.json").read_text())
    client = json.loads((folder / "app/config/config_fed_client.json").read_text())
    paths = [server["workflows"][0]["path"], client["executors"][0]["executor"]["path"]]
    assert all(path.startswith(ALLOW_PREFIX) for path in paths)
    assert server["workflows"][0]["args"]["site_timeout"] == 2.5
    assert json.loads((folder / "meta.json").read_text())["min_clients"] == 1


def test_a_lingering_writer_sends_replies_that_arrive_together_as_one_batch():
    from dfm_prefect.core.framing import BatchingWriter

    batches: list[list[int]] = []
    writer: BatchingWriter[int] = BatchingWriter(batches.append, name="test-linger", linger=0.5)
    writer.put(1)
    threading.Timer(0.05, writer.put, args=(2,)).start()
    time.sleep(0.2)  # inside the linger window
    writer.put(3)
    writer.close()
    assert batches == [[1, 2, 3]]


def test_a_client_that_waits_for_answers_but_stops_exchanging_is_gone_and_told_when_it_returns():
    now = [0.0]
    boxes = Mailboxes(client_timeout=5.0, idle_expiry=60.0, clock=lambda: now[0])
    assert boxes.begin("busy", ack=0, watched=True) is None
    assert boxes.begin("idle", ack=0, watched=False) is None
    boxes.deliver("busy", "north", "f1", 0, 1, "one")
    boxes.collect("busy", ack=0, wait=0, max_bytes=1 << 20)
    now[0] = 4.0
    assert boxes.expire() == []  # within client_timeout
    now[0] = 5.5
    (gone,) = boxes.expire()
    assert gone[0] == "busy" and "client_timeout 5s" in gone[1]
    assert boxes.deliver("busy", "north", "f2", 0, 1, "late") is Delivery.DROPPED and boxes.buffered_bytes == 0
    now[0] = 59.0
    assert boxes.expire() == []  # the idle client waits for nothing: never gone for that
    assert "client_timeout" in (boxes.begin("busy", ack=7, watched=True) or "")  # it returns, and is told
    boxes.deliver("busy", "north", "f3", 0, 1, "new")
    pieces, _ = boxes.collect("busy", ack=7, wait=0, max_bytes=1 << 20)
    assert [(p.seq, p.data) for p in pieces] == [(8, "new")]  # the sequence continues after its cursor
    now[0] = 200.0
    assert [client for client, _ in boxes.expire()] == ["idle", "busy"]  # idle_expiry frees the memory


def test_a_client_in_a_long_poll_is_never_declared_gone():
    boxes = Mailboxes(client_timeout=0.05)
    boxes.begin("c", ack=0, watched=True)
    expired: list[list] = []

    def meanwhile() -> None:  # well past client_timeout, while the client waits in collect
        expired.append(boxes.expire())
        boxes.deliver("c", "north", "f", 0, 1, "x")

    threading.Timer(0.3, meanwhile).start()
    pieces, _ = boxes.collect("c", ack=0, wait=5.0, max_bytes=1 << 20)
    assert [p.data for p in pieces] == ["x"] and expired == [[]]


def test_router_cancels_a_leaving_clients_work_before_frames_it_sends_later():
    router = Router(["north"], site_timeout=3.0)
    router.hello(Hello(site="north", incarnation="i", pid=1), "north")
    stop = threading.Event()
    router.exchange(ExchangeRequest(mailbox=_secret("old"), frames=[_frame("north", "a")], awaiting=1))
    router.exchange(ExchangeRequest(mailbox=_secret("keep"), frames=[_frame("north", "b")], awaiting=1))
    router.exchange(ExchangeRequest(mailbox=_secret("old"), closing=True))
    batch = router.next_batch("north", stop)
    assert [f.peer for f in batch.frames] == [_peer("keep")] and batch.closed_peers == [_peer("old")]  # its queued frame was dropped
    router.exchange(ExchangeRequest(mailbox=_secret("gone"), frames=[_frame("north", "c")], awaiting=1))
    router.exchange(ExchangeRequest(mailbox=_secret("keep"), awaiting=0))  # answered: it waits for nothing now
    router.next_batch("north", stop)
    router.mailboxes.client_timeout = 0.0  # declare it gone at once
    time.sleep(0.01)
    assert [client for client, _ in router.expire_clients()] == [_peer("gone")]
    reply = router.exchange(ExchangeRequest(mailbox=_secret("gone"), frames=[_frame("north", "d")], awaiting=2))
    assert reply.expired is not None and "client_timeout" in reply.expired
    batch = router.next_batch("north", stop)
    assert batch.closed_peers == [_peer("gone")] and [f.peer for f in batch.frames] == [_peer("gone")]  # the executor cancels first
    assert router.status(StatusRequest()).counters["clients_expired"] == 1


def test_reply_chunks_are_bounded_in_frame_id_count_and_emptiness():
    from pydantic import ValidationError

    from dfm_prefect.transports.flare.protocol import MAX_FRAME_PIECES

    ok = {"site": "north", "incarnation": "i", "peer": "c", "frame": "f" * 32, "index": 0, "count": 2, "data": "x"}
    assert ReplyChunk(**ok).count == 2
    assert ReplyChunk(**{**ok, "count": 1, "data": ""}).data == ""  # an empty reply is one empty piece
    for bad in ({"frame": "f" * 65}, {"frame": ""}, {"count": MAX_FRAME_PIECES + 1}, {"index": 2}, {"data": ""}):
        with pytest.raises(ValidationError):
            ReplyChunk(**{**ok, **bad})


def test_empty_pieces_are_charged_against_the_quotas():
    """Pieces cost their frame id and an overhead too: a site cannot queue unbounded empty pieces."""
    boxes = Mailboxes(max_site_bytes=64 << 10, max_client_bytes=64 << 10, max_bytes=1 << 20)
    boxes.begin("c1", ack=0, watched=True)
    outcomes = [boxes.deliver("c1", "evil", f"{i:032x}", 0, 1, "") for i in range(2000)]
    queued = outcomes.count(Delivery.QUEUED)
    assert 100 < queued < 300 and outcomes[-1] == Delivery.FULL
    pieces, more = boxes.collect("c1", ack=0, wait=0, max_bytes=16 << 10)
    assert more and len(pieces) < 60


def test_one_sites_bad_pieces_spoil_neither_another_sites_frames_nor_its_budget():
    link = JobLink("job-1")
    ready = {"north": SiteState(state="ready", incarnation="i"), "evil": SiteState(state="ready", incarnation="e")}
    link.set_states(ready)
    link.expect("north", [RunRequest(id="r1", op="core.echo")])
    done = ReplyEnvelope(messages=[ErrorReply(id="r1", error=ErrorInfo(code="x", message="y" * 40))]).model_dump_json()
    honest = _pieces(done, site="north", start=3)
    junk = [
        Piece(seq=1, site="evil", frame="E", index=0, count=3, data="a" * 10),
        Piece(seq=2, site="evil", frame="E", index=2, count=3, data="b"),  # out of order: not a frame
    ]
    digest = link.absorb(ExchangeReply(pieces=[*junk, *honest], sites=ready))
    assert [m.id for _, m in digest.messages] == ["r1"]
    assert any("site evil sent pieces that do not make a frame" in problem for problem in digest.unreadable)
    # A site that fills its own budget with frames it never finishes holds up only itself.
    from dfm_prefect.transports.flare.link import SITE_PENDING_BYTES

    big = "z" * (SITE_PENDING_BYTES // 4)
    hoard = [Piece(seq=link.ack + 1 + i, site="evil", frame=f"H{i}", index=0, count=2, data=big) for i in range(4)]
    link.expect("north", [RunRequest(id="r2", op="core.echo")])
    again = ReplyEnvelope(messages=[ErrorReply(id="r2", error=ErrorInfo(code="x", message="y" * 40))]).model_dump_json()
    digest = link.absorb(ExchangeReply(pieces=[*hoard, *_pieces(again, site="north", start=link.ack + 5)], sites=ready))
    assert [m.id for _, m in digest.messages] == ["r2"]
    assert any("unfinished frames" in problem for problem in digest.unreadable)
