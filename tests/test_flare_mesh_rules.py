"""The trust rules of the FLARE mesh without FLARE: who may say what to the router, reply quotas,
mailbox secrets, the client's check on who answered, and the admin roles in hardened kits.

The same attacks on a real FLARE POC are in ``test_flare_mesh_trust.py``.
"""

from __future__ import annotations

import json
import threading

from dfm_prefect.core.wire import CancelRequest, ErrorInfo, ErrorReply, ReplyEnvelope, RunRequest
from dfm_prefect.transports.flare.deploy.kits import harden_kit, kit_policy_problems
from dfm_prefect.transports.flare.link import JobLink
from dfm_prefect.transports.flare.mesh.mailbox import Delivery, Mailboxes
from dfm_prefect.transports.flare.mesh.router import Router
from dfm_prefect.transports.flare.protocol import (
    ExchangeReply,
    ExchangeRequest,
    Heartbeat,
    Hello,
    Piece,
    ReplyChunk,
    SiteState,
    StatusRequest,
)
from tests.test_flare_units import _frame, _kit, _peer, _secret


def test_hardened_kits_give_no_shell_and_let_only_the_operator_submit_jobs(tmp_path):
    defaults = {  # FLARE 2.9's provisioned defaults (lighter/templates/master_template.yml)
        "project_admin": "any",
        "org_admin": {"submit_job": "none", "view": "any", "operate": "o:site", "shell_commands": "o:site", "byoc": "none"},
        "lead": {"submit_job": "any", "clone_job": "n:submitter", "manage_job": "n:submitter", "download_job": "n:submitter",
                 "view": "any", "operate": "o:site", "shell_commands": "o:site", "byoc": "any"},
        "member": {"view": "any"},
    }  # fmt: skip
    kit = _kit(tmp_path / "north", defaults)
    problems = kit_policy_problems(kit)
    assert "role 'lead' may submit jobs (only project_admin should)" in problems
    assert "role 'lead' may run shell commands (ls, cat, grep) on this participant" in problems
    harden_kit(kit)
    assert kit_policy_problems(kit) == []
    permissions = json.loads((kit / "local" / "authorization.json").read_text())["permissions"]
    assert {role: rights["shell_commands"] for role, rights in permissions.items()} == dict.fromkeys(defaults, "none")
    assert {role: rights["download_job"] for role, rights in permissions.items()} == dict.fromkeys(defaults, "none")
    assert {right for right, value in permissions["lead"].items() if value != "none"} == {"view", "app_command"}
    assert permissions["project_admin"]["submit_job"] == permissions["project_admin"]["operate"] == "any"
    assert permissions["org_admin"]["operate"] == "o:site" and permissions["member"] == {"view": "any", **permissions["member"]}
    assert "get_job_log" not in permissions["project_admin"]  # "any" no longer grants rights this list does not name
    opted = _kit(tmp_path / "south", defaults)
    harden_kit(opted, shell_roles=["project_admin"])
    permissions = json.loads((opted / "local" / "authorization.json").read_text())["permissions"]
    assert permissions["project_admin"]["shell_commands"] == "any" and permissions["lead"]["shell_commands"] == "none"


def _ready_router() -> Router:
    router = Router(["north", "south"], mailboxes=Mailboxes(max_bytes=100, max_site_bytes=10, max_client_bytes=30))
    router.hello(Hello(site="north", incarnation="n1", pid=1), "north")
    router.hello(Hello(site="south", incarnation="s1", pid=2), "south")
    for site in ("north", "south"):
        router.exchange(ExchangeRequest(mailbox=_secret("c"), frames=[_frame(site, f"to-{site}")], awaiting=1))
        router.next_batch(site, threading.Event())
    return router


def _chunk(site: str, incarnation: str, peer: str, data: str = "x") -> ReplyChunk:
    return ReplyChunk(site=site, incarnation=incarnation, peer=peer, frame="r", index=0, count=1, data=data)


def test_a_site_speaks_only_as_itself_from_its_current_process_and_only_to_its_clients():
    router = _ready_router()
    before = router.states()["south"]
    assert router.hello(Hello(site="south", incarnation="forged", pid=66), "north") == "spoke for another site"
    assert router.heartbeat(Heartbeat(site="south", incarnation="s1"), "north") == "spoke for another site"
    refused = router.reply(_chunk("south", "s1", _peer("c")), "north")
    assert not refused.accepted and not refused.retry and refused.reason == "spoke for another site"
    assert router.reply(_chunk("north", "n0", _peer("c")), "north").reason == "not its current job process"
    assert router.reply(_chunk("north", "n1", _peer("stranger")), "north").reason == "reply to a client that sent it nothing"
    assert router.hello(Hello(site="mars", incarnation="m", pid=3), "mars") == "not a site of this mesh job"
    assert router.hello(Hello(site="mars", incarnation="m", pid=3), None) == "not a site of this mesh job"
    states = router.states()
    assert set(states) == {"north", "south"}  # nothing was created for mars
    after = states["south"]  # south untouched: same process, same state (its age in the mesh aside)
    assert (after.state, after.incarnation, after.reason, after.rejected) == (before.state, before.incarnation, before.reason, before.rejected)
    assert states["north"].rejected == {
        "spoke for another site": 3, "not its current job process": 1, "reply to a client that sent it nothing": 1,
    }  # fmt: skip
    assert states["south"].rejected == {}
    assert router.status(StatusRequest()).rejected_senders == {"not a site of this mesh job": 2}
    assert router.reply(_chunk("north", "n1", _peer("c")), "north").accepted


def test_a_client_that_idled_past_its_expiry_gets_answers_to_what_it_sends_next():
    clock = [0.0]
    router = Router(["north"], mailboxes=Mailboxes(idle_expiry=600.0, clock=lambda: clock[0]))
    router.hello(Hello(site="north", incarnation="n1", pid=1), "north")
    router.exchange(ExchangeRequest(mailbox=_secret("c"), frames=[_frame("north", "first")], awaiting=1))
    router.next_batch("north", threading.Event())
    assert router.reply(_chunk("north", "n1", _peer("c"), "one"), "north").accepted
    assert [p.data for p in router.exchange(ExchangeRequest(mailbox=_secret("c"))).pieces] == ["one"]
    clock[0] = 601.0  # a notebook left alone for ten minutes: its mailbox is dropped, the site told
    assert [client for client, _ in router.expire_clients()] == [_peer("c")]
    back = router.exchange(ExchangeRequest(mailbox=_secret("c"), ack=1, frames=[_frame("north", "second")], awaiting=1))
    assert back.expired is not None and "idle_expiry" in back.expired
    batch = router.next_batch("north", threading.Event())
    assert batch.closed_peers == [_peer("c")] and [f.peer for f in batch.frames] == [_peer("c")]
    # The site answers the new frame; the answer must reach the client, not be dropped as for a departed one.
    assert router.reply(_chunk("north", "n1", _peer("c"), "two"), "north").accepted
    assert [p.data for p in router.exchange(ExchangeRequest(mailbox=_secret("c"), ack=1, awaiting=1)).pieces] == ["two"]


def test_reply_quotas_per_site_and_per_client_keep_one_party_from_starving_the_rest():
    router = _ready_router()  # quotas: 10 bytes per site, 30 per client, 100 in all
    assert router.reply(_chunk("north", "n1", _peer("c"), "x" * 8), "north").accepted
    full = router.reply(_chunk("north", "n1", _peer("c"), "x" * 8), "north")
    assert not full.accepted and full.retry  # north's share is full: it resends later
    assert router.reply(_chunk("south", "s1", _peer("c"), "y" * 8), "south").accepted  # south is not held up by north
    assert router.states()["north"].rejected == {"reply over its buffer quota (resent later)": 1}
    boxes = Mailboxes(max_site_bytes=100, max_client_bytes=10)
    boxes.begin("victim", ack=0, watched=True)
    assert boxes.deliver("victim", "north", "f", 0, 1, "x" * 10) is Delivery.QUEUED
    assert boxes.deliver("victim", "north", "g", 0, 1, "x") is Delivery.FULL  # the victim's mailbox is full of north
    assert boxes.deliver("victim", "south", "h", 0, 1, "y") is Delivery.QUEUED  # yet south still gets through
    assert boxes.deliver("nobody", "north", "i", 0, 1, "z") is Delivery.DROPPED  # no such mailbox: dropped


def test_a_mailbox_opens_only_with_its_secret_not_with_the_id_sites_see():
    router = _ready_router()
    assert router.reply(_chunk("north", "n1", _peer("c"), "private"), "north").accepted
    thief = router.exchange(ExchangeRequest(mailbox=_peer("c")))  # what a site knows about c
    assert thief.pieces == []
    router.exchange(ExchangeRequest(mailbox=_peer("c"), closing=True))  # a goodbye in c's name cancels nothing
    assert _peer("c") not in router.next_batch("north", threading.Event()).closed_peers
    assert [p.data for p in router.exchange(ExchangeRequest(mailbox=_secret("c"))).pieces] == ["private"]


def test_the_client_takes_an_answer_only_from_the_site_its_request_went_to():
    link = JobLink("job-1")
    link.set_states({site: SiteState(state="ready", incarnation="i") for site in ("north", "south")})
    link.expect("south", [RunRequest(id="r1", op="core.echo", params={})])
    forged = ReplyEnvelope(messages=[ErrorReply(id="r1", error=ErrorInfo(code="internal", message="alpha says so"))])
    piece = Piece(seq=1, site="north", frame="f", index=0, count=1, data=forged.model_dump_json())
    digest = link.absorb(ExchangeReply(pieces=[piece], sites=link.states))
    assert digest.messages == [] and link.awaiting == {"r1": "south"}
    assert link.dropped["north"] == {"about a request sent to another site": 1}
    honest = piece.model_copy(update={"seq": 2, "site": "south"})
    assert [m.id for _, m in link.absorb(ExchangeReply(pieces=[honest], sites=link.states)).messages] == ["r1"]
    link.expect("south", [CancelRequest(id="c1", target="r1")])  # a refused cancel is answered, an accepted one is not
    refusal = ReplyEnvelope(messages=[ErrorReply(id="c1", error=ErrorInfo(code="access_denied", message="not yours"))])
    pieces = [Piece(seq=seq, site=site, frame="g", index=0, count=1, data=refusal.model_dump_json()) for seq, site in ((3, "north"), (4, "south"))]
    assert [(site, m.id) for site, m in link.absorb(ExchangeReply(pieces=pieces, sites=link.states)).messages] == [("south", "c1")]
    assert link.dropped["north"] == {"about a request sent to another site": 2}
