"""One pass per site: requests on the same inputs that run at the same time compute together and read each chunk once.

The group logic is tested on its own (pure logic); the read counts with an
in-process site worker whose threaded Dask scheduler runs in this process, so a
Dask callback sees every task it runs.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from dfm_prefect.core.wire import Envelope, RunRequest, RunResult
from dfm_prefect.testing.climate import ClimateSpec, make_region, write_zarr
from site_workers import confine, fusion
from site_workers.config import parse_site_config
from site_workers.fusion import FusedGroup
from site_workers.worker import SiteWorker
from tests.support_sites import Answers

SPEC = ClimateSpec(years=1, resolution=4.0, chunk_days=61)
CHUNKS = 6  # 365 days in 61-day chunks, one variable


# ------------------------------------------------------------------ the group on its own


def test_members_that_ask_together_get_one_computation_split_back():
    group, calls = FusedGroup(), []

    def compute(collections):
        calls.append(collections)
        return tuple(f"value of {c}" for c in collections)

    a, b, c = group.member(), group.member(), group.member()
    results: dict[str, Any] = {}
    threads = [
        threading.Thread(target=lambda: results.__setitem__("a", a.compute(("x", "y"), compute))),
        threading.Thread(target=lambda: results.__setitem__("b", b.compute(("z",), compute))),
    ]
    for thread in threads:
        thread.start()
    c.leave()  # the third computed nothing (a view, a cached answer)
    for thread in threads:
        thread.join(10)
    assert calls == [("x", "y", "z")] or calls == [("z", "x", "y")]
    assert results == {"a": ("value of x", "value of y"), "b": ("value of z",)}
    assert group.shared == 2
    assert a.compute(("later",), compute) is None  # only the first computation is shared
    assert group.member() is None  # a group that ran takes no one


def test_requests_on_other_inputs_are_not_grouped():
    fusions = fusion.Fusions()
    a, b, c = fusions.join(frozenset({"field"})), fusions.join(frozenset({"field"})), fusions.join(frozenset({"other"}))
    assert a is not None and b is not None and c is not None
    assert a.group is b.group and c.group is not a.group
    assert fusions.join(frozenset()) is None


def test_a_failed_shared_computation_leaves_each_member_to_compute_alone():
    group = FusedGroup()

    def compute(collections):
        raise ValueError("one of them is broken")

    a, b = group.member(), group.member()
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(a.compute(("x",), compute)))
    thread.start()
    out.append(b.compute(("y",), compute))
    thread.join(10)
    assert out == [None, None]


def test_a_member_that_never_comes_holds_the_others_only_so_long(monkeypatch):
    monkeypatch.setattr(fusion, "WAIT_S", 0.2)
    group = FusedGroup()
    lone = group.member()
    group.member()  # accepted, then never computes nor leaves
    assert lone.compute(("x",), lambda c: ("shared",)) is None  # alone after the wait
    assert group.shared == 0


# ------------------------------------------------------------------ a real worker


class ChunkReads:
    """Counts the temperature chunk files the site opens (through its confined filesystem, in this process)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count, self._lock = 0, threading.Lock()
        original = confine.ConfinedFileSystem._open

        def counting(fs: Any, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
            if "/temperature/" in path and not path.rsplit("/", 1)[-1].startswith("."):
                with self._lock:
                    self.count += 1
            return original(fs, path, mode, *args, **kwargs)

        monkeypatch.setattr(confine.ConfinedFileSystem, "_open", counting)

    def taken(self) -> int:
        with self._lock:
            count, self.count = self.count, 0
        return count


@pytest.fixture
def worker(tmp_path: Path):
    write_zarr(make_region(SPEC, -90.0, 90.0), str(tmp_path / "field.zarr"))
    config = parse_site_config(
        {
            "name": "lab",
            "operations": ["xarray.moments", "xarray.histogram", "xarray.subset"],
            "sources": [{"name": "field", "url": f"file://{tmp_path / 'field.zarr'}"}],
            "result_store": {"url": f"file://{tmp_path / 'store'}"},
            "export": {"kinds": ["aggregate"], "max_bytes": 1 << 20},
            "compute": {"kind": "threads"},
        }
    )
    w = SiteWorker(config)
    yield w
    w.close()


MOMENTS = {"data": "field", "dims": ["time", "lat", "lon"]}
HISTOGRAM = {"data": "field", "bins": {"start": 200.0, "stop": 330.0, "count": 26}}


def send(worker: SiteWorker, *requests: RunRequest) -> list[RunResult]:
    answers = Answers()
    worker.handle_frame(Envelope(messages=list(requests)).model_dump_json(), answers, "test-peer")
    replies = [m for m in answers.wait(len(requests), timeout=120) if isinstance(m, RunResult)]
    assert all(reply.ok for reply in replies), [reply.error for reply in replies]
    return sorted(replies, key=lambda reply: reply.id)


def values(worker: SiteWorker, reply: RunResult) -> Any:
    assert reply.ref is not None
    return worker.store.open_value(reply.ref)


def test_two_statistics_asked_together_read_each_chunk_once(worker, monkeypatch):
    reads = ChunkReads(monkeypatch)
    separate = [
        send(worker, RunRequest(id="1-moments", op="xarray.moments", params=MOMENTS))[0],
        send(worker, RunRequest(id="2-histogram", op="xarray.histogram", params=HISTOGRAM))[0],
    ]
    assert reads.taken() == 2 * CHUNKS
    fused = send(
        worker,
        RunRequest(id="1-moments", op="xarray.moments", params=MOMENTS),
        RunRequest(id="2-histogram", op="xarray.histogram", params=HISTOGRAM),
    )
    assert reads.taken() == CHUNKS  # each chunk read once for both
    for alone, shared in zip(separate, fused):
        xr.testing.assert_equal(values(worker, alone), values(worker, shared))


def test_requests_in_separate_frames_that_meet_at_the_site_share_the_reads(worker, monkeypatch):
    reads = ChunkReads(monkeypatch)
    answers = Answers()
    for request in (
        RunRequest(id="1-moments", op="xarray.moments", params=MOMENTS),
        RunRequest(id="2-histogram", op="xarray.histogram", params=HISTOGRAM),
    ):
        worker.handle_frame(Envelope(messages=[request]).model_dump_json(), answers, "test-peer")
    replies = [m for m in answers.wait(2, timeout=120) if isinstance(m, RunResult)]
    assert all(reply.ok for reply in replies)
    assert reads.taken() == CHUNKS


def test_views_asked_with_their_statistics_still_fuse_and_agree(worker, monkeypatch):
    box = send(worker, RunRequest(id="box", op="xarray.subset", params={"data": "field", "ranges": {"lat": {"start": 0, "stop": 60}}}))[0]
    assert box.ref is not None and box.ref.is_view
    on_box = {"data": box.ref.model_dump(mode="json")}
    reads = ChunkReads(monkeypatch)
    fused = send(
        worker,
        RunRequest(id="1", op="xarray.moments", params={**MOMENTS, **on_box}),
        RunRequest(id="2", op="xarray.histogram", params={**HISTOGRAM, **on_box}),
    )
    assert reads.taken() == CHUNKS
    moments = values(worker, fused[0])
    expected = xr.open_zarr(str(Path(worker.config.sources[0].url[len("file://") :]))).sel(lat=slice(0, 60))["temperature"]
    np.testing.assert_allclose(float(moments["temperature__wx"]), float(expected.astype("float64").sum()), rtol=1e-9)
