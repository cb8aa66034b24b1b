"""The site worker answers malformed frames with errors and keeps serving (in-process worker)."""

from __future__ import annotations

import json
import threading

import pytest

from dfm_prefect.core.wire import Envelope, ErrorReply, RunRequest, RunResult
from site_workers.config import parse_site_config
from site_workers.worker import SiteWorker


@pytest.fixture
def worker(tmp_path):
    config = parse_site_config(
        {"name": "w", "operations": ["core.echo"], "result_store": {"url": f"file://{tmp_path / 'store'}"}}
    )
    w = SiteWorker(config)
    yield w
    w.close()


def ask(worker: SiteWorker, frame: bytes | str, expected: int = 1) -> list:
    replies: list = []
    done = threading.Event()

    def reply(message):
        replies.append(message)
        if len(replies) >= expected:
            done.set()

    worker.handle_frame(frame, reply)
    assert done.wait(10), "the worker did not answer"
    return replies


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xff\xfe garbage",
        b"[]",
        b'{"v": 2, "messages": []}',
        b'{"v": 1, "messages": [{"kind": "pickle", "id": "x"}]}',
        json.dumps({"v": 1, "messages": [{"kind": "run", "id": "x", "op": "core.echo", "params": {}, "extra": 1}]}).encode(),
        json.dumps({"v": 1, "messages": [{"kind": "run", "id": "", "op": "core.echo"}]}).encode(),
    ],
)
def test_malformed_frames_get_an_error(worker, frame):
    (reply,) = ask(worker, frame)
    assert isinstance(reply, ErrorReply) and reply.error.code == "malformed_request"


def test_site_keeps_serving_after_bad_input(worker):
    ask(worker, b"not json at all")
    frame = Envelope(messages=[RunRequest(id="ok-1", op="core.echo", params={"value": 5})]).model_dump_json()
    (reply,) = ask(worker, frame)
    assert isinstance(reply, RunResult) and reply.ok and reply.ref is not None


def test_invalid_params_are_refused_without_echoing_them(worker):
    frame = Envelope(messages=[RunRequest(id="p-1", op="core.echo", params={"value": 1, "password": "hunter2"})]).model_dump_json()
    (reply,) = ask(worker, frame)
    assert isinstance(reply, RunResult) and not reply.ok
    assert reply.error.code == "invalid_parameters" and "hunter2" not in reply.error.message


def test_a_result_is_stored_while_another_thread_is_still_importing_xarray(worker, monkeypatch):
    # A site's catalog imports xarray in the background when it starts; a request answered meanwhile
    # saw the half-imported module and failed with "partially initialized module 'xarray'".
    import sys
    import types

    monkeypatch.setitem(sys.modules, "xarray", types.ModuleType("xarray"))  # no classes defined yet
    frame = Envelope(messages=[RunRequest(id="x-1", op="core.echo", params={"value": {"a": 1}})]).model_dump_json()
    (reply,) = ask(worker, frame)
    assert isinstance(reply, RunResult) and reply.ok, reply
    assert reply.ref.summary == {"type": "dict", "keys": ["a"]}
