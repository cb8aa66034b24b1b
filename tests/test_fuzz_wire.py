"""Hostile frames at the site's decoder and validator: every one is answered, and the site keeps serving.

Two kinds of fuzzing. Hypothesis generates random bytes, random JSON, and
envelopes that follow the wire's shape with hostile values (huge and odd
strings, deep nesting, NaN and infinities, wrong kinds, duplicate ids, forged
references) for ``SiteWorker.handle_frame`` in-process, and hostile app-command
payloads for the FLARE mesh controller itself. And a seeded campaign
(`tests.fuzz_frames`, `tests.fuzz_drive`) sends at least 10,000 structure-aware
hostile frames per transport to a real site process, over the local
transport's authenticated connection and through the FLARE mesh job (routed by
the real controller to a real site), checking after every batch that each
frame was answered validly, the site process did not change and an honest
request works. ``DFM_FUZZ_SEED`` reproduces or varies it, ``DFM_FUZZ_FRAMES``
and ``DFM_FUZZ_CAP_S`` set the frames and the wall-clock cap; run with ``-s``
to see the report line.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfm_prefect.client import get_client
from dfm_prefect.core.wire import ErrorReply, RunResult
from dfm_prefect.transports.local.launcher import LocalFederation
from site_workers.config import parse_site_config
from site_workers.worker import SiteWorker
from tests.conftest import TRANSPORTS
from tests.fuzz_drive import Channel, LocalChannel, MeshChannel, campaign, expected_answers
from tests.fuzz_frames import FRAMES, OPERATIONS, SEED, HostileFrames
from tests.support_sites import (
    Answers,
    FlareSites,
    RawMeshConnection,
    RawSiteConnection,
    private_federation,
    private_flare_federation,
    run_frame,
    site_processes,
)

FUZZ_SETTINGS = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20
)
hostile_text = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["", "x" * 65, "é" * 64, "../../etc/passwd", "dfm://other/t", "${env:HOME}", "__import__('os')", "\x00", "core.echo"]),
    st.integers(min_value=1, max_value=40_000).map(lambda n: "A" * n),
)
forged_ref = st.fixed_dictionaries(
    {
        "site": st.sampled_from(["fuzz", "other"]),
        "uri": st.sampled_from(["file:///etc/passwd", "file:///tmp/../etc/shadow", "memory://x", "s3://b/k"]),
        "kind": st.sampled_from(["value", "dataset", "table", "secret"]),
        "format": st.sampled_from(["json", "netcdf", "pickle"]),
        "size": st.integers(min_value=-1, max_value=1 << 40),
        "sha256": st.sampled_from(["0" * 64, "z" * 64, ""]),
        "op": hostile_text,
    }
)
messages = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["run", "run", "run", "cancel", "describe", "fetch", "stats", "result", "pickle"]) | hostile_text,
        "id": st.one_of(st.sampled_from(["dup", "dup", "a"]), hostile_text, json_values),
    },
    optional={
        "op": st.sampled_from(["core.echo", "core.echo", "core.sleep", "nope.op", "os.system"]) | hostile_text,
        "version": st.sampled_from([None, "1", "99"]) | hostile_text,
        "params": st.one_of(st.dictionaries(st.sampled_from(["value", "seconds", "data", "evil"]), json_values, max_size=3), json_values),
        "attempt": st.integers(min_value=-5, max_value=10**12),
        "timeout_s": st.floats(allow_nan=True, allow_infinity=True),
        "target": hostile_text,
        "ref": forged_ref | json_values,
        "offset": st.integers(min_value=-5, max_value=1 << 50),
        "length": st.integers(min_value=-5, max_value=1 << 40),
    },
)
envelopes = st.fixed_dictionaries({"v": st.sampled_from([1, 1, 1, 2, "1", None]), "messages": st.lists(messages, max_size=4)})


def _deep(depth: int) -> bytes:
    value = "[" * depth + "]" * depth
    return f'{{"v":1,"messages":[{{"kind":"run","id":"deep","op":"core.echo","params":{{"value":{value}}}}}]}}'.encode()


frames = st.one_of(
    st.binary(max_size=400),
    json_values.map(lambda v: json.dumps(v).encode()),
    envelopes.map(lambda e: json.dumps(e).encode()),
    envelopes.map(lambda e: json.dumps(e).encode()),
    st.integers(min_value=1, max_value=100_000).map(_deep),
    st.sampled_from([b'{"v":1,"messages":[{"kind":"run","id":"\\ud800","op":"core.echo"}]}', b'{"v":1,"messages":"' + b"m" * 100_000 + b'"}']),
)


def _still_serves(answers: list) -> None:
    (answer,) = answers
    assert isinstance(answer, RunResult) and answer.ok, answer


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteWorker]:
    store = tmp_path_factory.mktemp("fuzz-store")
    w = SiteWorker(
        parse_site_config({"name": "fuzz", "operations": ["core.echo"], "result_store": {"url": f"file://{store}"}, "limits": {"concurrency": 2}})
    )
    yield w
    w.close()


@settings(FUZZ_SETTINGS, max_examples=400)
@given(frame=frames)
def test_every_hostile_frame_is_answered_in_process(worker, frame):
    expected = expected_answers(frame)
    answers = Answers()
    worker.handle_frame(frame, answers, "fuzzer")
    got = answers.wait(expected)
    if expected == 1 and isinstance(got[0], ErrorReply):
        assert got[0].error.code in {"malformed_request", "unknown_operation", "invalid_parameters", "access_denied", "result_integrity", "export_refused"}
    follow = Answers()
    worker.handle_frame(run_frame("core.echo", {"value": "ok"}, uuid.uuid4().hex), follow, "fuzzer")
    _still_serves(follow.wait(1))


VISITS = "ward,los\na,3\nb,5\na,7\nc,1\nb,2\n"


@pytest.fixture(scope="module", params=TRANSPORTS)
def fuzz_site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation | FlareSites]:
    root: Path = tmp_path_factory.mktemp(f"fuzz-site-{request.param}")
    (root / "data").mkdir()
    (root / "data" / "visits.csv").write_text(VISITS)
    config = {
        "name": "fuzz",
        "operations": OPERATIONS,
        "sources": [{"name": "visits", "url": f"file://{root / 'data' / 'visits.csv'}"}],
        "data_roots": [{"url": f"file://{root / 'data'}"}],
        "result_store": {"url": f"file://{root / 'store'}"},
        "limits": {"concurrency": 2, "queue": 16},
    }
    start = private_federation if request.param == "local" else private_flare_federation
    with start(root, {"fuzz": config}) as fed:
        yield fed


@pytest.fixture(scope="module")
def mesh_connection(fuzz_site: FlareSites) -> Iterator[RawMeshConnection]:
    """One admin session for all examples (a FLARE login takes over a second)."""
    connection = RawMeshConnection(fuzz_site, "fuzz")
    yield connection
    connection.close()


CAP_S = float(os.environ.get("DFM_FUZZ_CAP_S", "240"))
"""Hard wall-clock cap of one transport's campaign; fewer than FRAMES frames sent by then fails the test."""


@pytest.mark.slow
def test_a_real_site_answers_ten_thousand_hostile_frames_and_keeps_serving(fuzz_site, request):
    """FRAMES seeded hostile frames through the real transport, in batches: every one answered validly, no crash, no hang."""
    flare = isinstance(fuzz_site, FlareSites)
    connection = request.getfixturevalue("mesh_connection") if flare else RawSiteConnection(fuzz_site, "fuzz")
    channel: Channel = MeshChannel(connection) if flare else LocalChannel(connection)
    channel.send_many([run_frame("core.echo", {"value": {"fetch": "me"}}, "seed-ref").encode()])
    (stored,) = channel.collect(1, 60.0)
    assert isinstance(stored, RunResult) and stored.ok and stored.ref is not None, stored
    processes = site_processes(fuzz_site, "fuzz")
    incarnation = connection.link.states["fuzz"].incarnation if flare else None

    def alive() -> None:
        assert site_processes(fuzz_site, "fuzz") == processes, "the site's processes changed: it crashed or restarted"
        if flare:
            assert connection.link.states["fuzz"].incarnation == incarnation, "the site's job process restarted"

    # FLARE carries frames as admin-command text at roughly 100 answers/s: pack them densely, keep the bytes down.
    stream = HostileFrames(SEED, stored.ref.model_dump(mode="json"), wide=8 if flare else 64, huge=0.05 if flare else 0.2)
    try:
        tally = campaign(channel, stream, seed=SEED, total=FRAMES, batch=500 if flare else 250, cap_s=CAP_S, alive=alive)
    finally:
        if not flare:
            connection.close()
    print(tally.report("flare" if flare else "local", SEED))
    assert tally.frames >= FRAMES, f"only {tally.frames} of {FRAMES} hostile frames within {CAP_S:.0f}s: {tally.report('?', SEED)}"
    client = get_client(fuzz_site.federation_file)
    assert client.call("fuzz", "core.echo", {"value": "honest"}, timeout=60).fetch(client=client) == "honest"


quick_wait = st.one_of(st.floats(min_value=0, max_value=0.3), st.sampled_from([-1, 1e9, "soon", None, float("nan")]))
mesh_frames = st.lists(
    st.fixed_dictionaries({"id": hostile_text, "site": st.sampled_from(["fuzz", "fuzz", "nowhere", ""]) | hostile_text, "data": frames.map(RawMeshConnection.as_text)}),
    max_size=3,
)
exchange_payloads = st.fixed_dictionaries(
    {},
    optional={
        "mailbox": st.sampled_from(["c", "x" * 32, "x" * 128, "x" * 129, ""]) | hostile_text | json_values,
        "ack": st.integers(min_value=-5, max_value=10**20) | json_values,
        "wait": quick_wait,
        "max_bytes": st.integers(min_value=-1, max_value=1 << 40),
        "frames": mesh_frames | json_values,
        "awaiting": st.integers(min_value=-1, max_value=10**12),
        "closing": st.booleans() | json_values,
        "evil": json_values,
    },
)
status_payloads = st.fixed_dictionaries(
    {}, optional={"wait_ready": st.lists(hostile_text, max_size=5) | json_values, "wait": quick_wait, "evil": json_values}
)
commands = st.one_of(
    st.tuples(st.just("dfm.exchange"), exchange_payloads),
    st.tuples(st.just("dfm.status"), status_payloads),
    st.tuples(st.sampled_from(["dfm.exchange", "dfm.status"]), json_values),
)


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=60)
@given(command=commands)
def test_the_mesh_controller_answers_hostile_commands_and_keeps_serving(fuzz_site, request, command):
    from nvflare.fuel.flare_api import api_spec

    from dfm_prefect.transports.flare.protocol import CommandError, ExchangeReply, StatusReply

    if not isinstance(fuzz_site, FlareSites):
        pytest.skip("app commands exist only on the FLARE transport")
    connection = request.getfixturevalue("mesh_connection")
    topic, data = command
    try:
        answer = connection.session.do_app_command(connection.job_id, topic, data)
    except (api_spec.InternalError, api_spec.InvalidArgumentError) as exc:  # refused before the job: also an error
        answer = {"error": f"FLARE: {exc}"}
    assert isinstance(answer, dict), answer
    if "error" in answer:
        CommandError.model_validate(answer)
    else:
        (ExchangeReply if topic == "dfm.exchange" else StatusReply).model_validate(answer)
    connection.send(run_frame("core.echo", {"value": "ok"}, uuid.uuid4().hex))
    _still_serves(connection.receive(1))
