"""What leaves a site, decided in the site core (in-process workers; the same core runs behind every transport).

Covers the parts of the export policy that need a client identity (which the
local transport does not authenticate), credentials in answers and results,
and the error-detail rule. The same rules over real site processes are in
``test_security.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.core.refs import DataRef
from dfm_prefect.core.wire import Envelope, ErrorInfo, ErrorReply, FetchChunk, FetchRequest, LogLine, ReplyEnvelope, RunResult, b64decode
from site_workers.config import parse_site_config
from site_workers.redaction import MASK, Redactor, config_secrets
from site_workers.worker import SiteWorker
from tests.support_sites import ask, run_frame

SECRET = "tok-Qx7!Vm2/Lp9"
SECRET_VAR = "DFM_TEST_POLICY_TOKEN"


@pytest.fixture
def make_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv(SECRET_VAR, SECRET)
    workers: list[SiteWorker] = []

    def make(export: dict[str, Any] | None = None) -> SiteWorker:
        config = parse_site_config(
            {
                "name": "policy",
                "operations": ["core.echo", "testing.leak"],
                "operation_modules": ["tests.site_ops"],
                "data_roots": [{"url": f"file://{tmp_path}", "storage_options": {"token": f"${{env:{SECRET_VAR}}}"}}],
                "result_store": {"url": f"file://{tmp_path / f'store{len(workers)}'}"},
                "export": export or {},
            }
        )
        workers.append(SiteWorker(config))
        return workers[-1]

    yield make
    for worker in workers:
        worker.close()


def run(worker: SiteWorker, op: str, params: dict[str, Any], identity: str | None = None) -> RunResult:
    (answer,) = ask(worker, run_frame(op, params), identity=identity)
    assert isinstance(answer, RunResult)
    return answer


def fetch(worker: SiteWorker, ref: DataRef, identity: str | None = None, offset: int = 0, length: int = 1 << 20) -> Any:
    frame = Envelope(messages=[FetchRequest(id="f-1", ref=ref, offset=offset, length=length)]).model_dump_json()
    (answer,) = ask(worker, frame, identity=identity)
    return answer


def test_a_kind_with_recipients_leaves_only_for_those_identities(make_worker):
    worker = make_worker({"kinds": ["value"], "recipients": {"value": ["alice"]}})

    for_alice = run(worker, "core.echo", {"value": {"rows": [1, 2]}}, identity="alice")
    assert for_alice.ok and json.loads(b64decode(for_alice.payload)) == {"rows": [1, 2]}
    chunk = fetch(worker, for_alice.ref, identity="alice")
    assert isinstance(chunk, FetchChunk) and json.loads(b64decode(chunk.data)) == {"rows": [1, 2]}

    for_mallory = run(worker, "core.echo", {"value": {"rows": [3]}}, identity="mallory")
    assert for_mallory.ok and for_mallory.payload is None  # the result exists, but it stays here
    refused = fetch(worker, for_mallory.ref, identity="mallory")
    assert isinstance(refused, ErrorReply) and refused.error.code == "export_refused"
    assert "'mallory' is not among the clients" in refused.error.message

    anonymous = fetch(worker, for_alice.ref, identity=None)
    assert isinstance(anonymous, ErrorReply) and anonymous.error.code == "export_refused"
    assert "no authenticated client identity" in anonymous.error.message
    assert worker.stats().bytes_out == len(b64decode(for_alice.payload)) + len(b64decode(chunk.data))


def test_kinds_without_recipients_leave_for_any_client(make_worker):
    worker = make_worker({"kinds": ["value", "dataset"], "recipients": {"dataset": ["alice"]}})
    answer = run(worker, "core.echo", {"value": 5}, identity="mallory")
    assert answer.payload is not None and json.loads(b64decode(answer.payload)) == 5


def test_a_relabelled_reference_is_refused(make_worker):
    worker = make_worker({"kinds": ["value"]})
    stored, _ = worker.store.put([1, 2, 3], op="xarray.subset", kind="dataset", summary={})
    relabelled = stored.model_copy(update={"kind": "value"})
    answer = fetch(worker, relabelled)
    assert isinstance(answer, ErrorReply) and answer.error.code == "access_denied"
    assert "the reference was altered" in answer.error.message
    assert worker.stats().bytes_out == 0


def test_a_result_holding_a_credential_does_not_leave(make_worker):
    worker = make_worker({"kinds": ["value"]})
    answer = run(worker, "testing.leak", {"variable": SECRET_VAR, "mode": "return"})
    assert answer.ok and answer.payload is None
    whole = fetch(worker, answer.ref)
    assert isinstance(whole, ErrorReply) and "contains one of this site's credentials" in whole.error.message
    # A chunk that starts inside the credential is refused too (the site reads a little before it).
    start = b'{"token":"'
    split = fetch(worker, answer.ref, offset=len(start) + 3, length=4)
    assert isinstance(split, ErrorReply) and split.error.code == "export_refused"
    assert worker.stats().bytes_out == 0


@pytest.mark.parametrize("detail", ["message", "type"])
def test_failures_never_carry_the_credential_and_type_detail_keeps_data_at_the_site(make_worker, detail, caplog):
    worker = make_worker({"error_detail": detail})
    answer = run(worker, "testing.leak", {"variable": SECRET_VAR, "mode": "raise"})
    wire = ReplyEnvelope(messages=[answer]).model_dump_json()
    assert not answer.ok and SECRET not in wire
    assert answer.logs and all(SECRET not in line.message for line in answer.logs)
    assert MASK in answer.logs[0].message
    if detail == "message":
        assert MASK in answer.error.message and "patient_weight=81.4" in answer.error.message
    else:
        assert "patient_weight" not in answer.error.message and "RuntimeError" in answer.error.message
        incident = answer.error.message.rsplit("incident ", 1)[1]
        site_log = "\n".join(record.getMessage() for record in caplog.records)
        assert f"incident {incident}" in site_log and "patient_weight=81.4" in site_log
    assert all(SECRET not in record.getMessage() for record in caplog.records)


def test_progress_messages_are_redacted(make_worker):
    worker = make_worker()
    seen: list[str] = []

    def reply(message: Any) -> None:
        if message.kind == "progress":
            seen.append(message.message)

    from tests.support_sites import Answers

    answers = Answers()
    worker.handle_frame(run_frame("testing.leak", {"variable": SECRET_VAR, "mode": "progress"}), lambda m: (reply(m), answers(m)))
    answers.wait(1)
    assert seen and all(SECRET not in text for text in seen) and MASK in seen[-1]


def test_secrets_come_from_env_references_and_credential_keys(monkeypatch):
    monkeypatch.setenv("DFM_TEST_ENDPOINT", "http://10.1.2.3:9000")
    monkeypatch.setenv("DFM_TEST_BUCKET", "public-bucket-name")
    config = parse_site_config(
        {
            "name": "s",
            "operations": [],
            "sources": [
                {
                    "name": "t",
                    "url": "s3://${env:DFM_TEST_BUCKET}/t.zarr",
                    "storage_options": {
                        "key": "AKIALITERALKEY",
                        "client_kwargs": {"endpoint_url": "${env:DFM_TEST_ENDPOINT}"},
                        "config_kwargs": {"session_token": "literal-session-token"},
                        "anon": False,
                        "region": "us",
                    },
                }
            ],
            "result_store": {"url": "file:///tmp/dfm-policy-store"},
        }
    )
    assert config_secrets(config) == {"http://10.1.2.3:9000", "AKIALITERALKEY", "literal-session-token"}
    redactor = Redactor.for_config(config)
    text = redactor.text("GET http%3A%2F%2F10.1.2.3%3A9000 with AKIALITERALKEY from public-bucket-name in us")
    assert text == f"GET {MASK} with {MASK} from public-bucket-name in us"


def test_short_values_are_not_treated_as_secrets():
    assert Redactor(["abc", "12345"]).text("abc 12345") == "abc 12345"


def test_redacted_answers_stay_within_the_wire_limits():
    redactor = Redactor(["abcdef"])
    error = ErrorInfo(code="operation_failed", message=("abcdef " * 1200)[:8192])
    logs = [LogLine(level=20, message="abcdef " * 1170, time=0.0)]
    answer = RunResult(id="r", site="s", ok=False, error=error, logs=logs)
    cleaned = redactor.message(answer)
    # The client validates every frame: an over-long text would lose the whole frame.
    ReplyEnvelope.model_validate_json(ReplyEnvelope(messages=[cleaned]).model_dump_json())
    assert "abcdef" not in cleaned.error.message and len(cleaned.error.message) <= 8192
    assert len(cleaned.logs[0].message) <= 8192
    # A lone surrogate (a file name that is not UTF-8) becomes sendable text.
    assert redactor.text("\udcff abcdef").encode("utf-8") == b"? [redacted]"


def test_config_refuses_passwords_in_urls():
    with pytest.raises(ConfigError, match="must not carry a password"):
        parse_site_config(
            {"name": "s", "operations": [], "result_store": {"url": "file:///tmp/x"}, "sources": [{"name": "t", "url": "s3://AKIA:pw@bucket/t.zarr"}]}
        )
