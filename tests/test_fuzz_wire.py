"""Hostile frames at the site's decoder and validator: every one is answered, and the site keeps serving.

Hypothesis generates random bytes, random JSON, and envelopes that follow the
wire's shape with hostile values (huge and odd strings, deep nesting, NaN and
infinities, wrong kinds, duplicate ids, forged references). They go to
``SiteWorker.handle_frame`` in-process, and a smaller number through a real
site process: over the local transport's authenticated connection, and through
the FLARE mesh job (routed by the real controller to a real site). Hostile
app-command payloads also go to the mesh controller itself.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dfm_prefect.core.wire import CancelRequest, Envelope, ErrorReply, RunResult
from dfm_prefect.transports.local.launcher import LocalFederation
from site_workers.config import parse_site_config
from site_workers.worker import SiteWorker
from tests.conftest import TRANSPORTS
from tests.support_sites import (
    Answers,
    FlareSites,
    RawMeshConnection,
    RawSiteConnection,
    private_federation,
    private_flare_federation,
    run_frame,
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


def expected_answers(frame: bytes | str) -> int:
    """One error for a frame that does not decode; otherwise one answer per message except cancels."""
    try:
        envelope = Envelope.model_validate_json(frame)
    except ValidationError:
        return 1
    return sum(not isinstance(message, CancelRequest) for message in envelope.messages)


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


@pytest.fixture(scope="module", params=TRANSPORTS)
def fuzz_site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation | FlareSites]:
    root: Path = tmp_path_factory.mktemp(f"fuzz-site-{request.param}")
    config = {"name": "fuzz", "operations": ["core.echo"], "result_store": {"url": f"file://{root / 'store'}"}}
    start = private_federation if request.param == "local" else private_flare_federation
    with start(root, {"fuzz": config}) as fed:
        yield fed


@pytest.fixture(scope="module")
def mesh_connection(fuzz_site: FlareSites) -> Iterator[RawMeshConnection]:
    """One admin session for all examples (a FLARE login takes over a second)."""
    connection = RawMeshConnection(fuzz_site, "fuzz")
    yield connection
    connection.close()


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=40)
@given(frame=frames)
def test_a_real_site_answers_hostile_frames_and_keeps_serving(fuzz_site, request, frame):
    flare = isinstance(fuzz_site, FlareSites)
    connection = request.getfixturevalue("mesh_connection") if flare else RawSiteConnection(fuzz_site, "fuzz")
    try:
        connection.send(frame)
        connection.receive(expected_answers(RawMeshConnection.as_text(frame) if flare else frame))
        connection.send(run_frame("core.echo", {"value": "ok"}, uuid.uuid4().hex).encode())
        _still_serves(connection.receive(1))
    finally:
        if not flare:
            connection.close()
    assert fuzz_site.pids().get("fuzz"), "the site process must still be running"


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
