"""Retention of a site's result store: the rule, the store under it, and views whose copies were collected.

`plan` is checked as pure logic; the store is a real `ResultStore` on disk whose
collector clock the test sets; several OS processes share one store; a view's
collected copy is materialized again by a real `SiteWorker` (in this process).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import xarray as xr

from dfm_prefect.core.errors import ConfigError, ResultExpiredError, ResultIntegrityError, StoreFullError
from site_workers.config import parse_site_config
from site_workers.ledger import Entry
from site_workers.retention import UNRECORDED, plan
from site_workers.retention_config import RetentionPolicy
from site_workers.store import ResultStore
from tests.test_adapters_support import InProcessSite, small_climate


class Clock:
    """A collector clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make_store(root: Path, clock: Clock | None = None, **retention: object) -> ResultStore:
    config = parse_site_config({"name": "north", "operations": [], "result_store": {"url": f"file://{root}", "retention": retention}})
    store = ResultStore("north", config.result_store)
    if clock is not None:
        assert store.retention is not None
        store.retention.clock = clock
    return store


def put(store: ResultStore, chars: int, owner: str | None = None):
    ref, _ = store.put("x" * (chars - 2), op="core.echo", kind="value", summary={}, owner=owner)  # JSON adds two quotes
    assert ref.size == chars
    return ref


# -- the rule -----------------------------------------------------------------------


def test_plan_removes_the_expired_then_the_oldest_over_quota_and_spares_the_young():
    entries = [Entry(f"r{i}", "alice" if i % 2 else "bob", at=100.0 + i, size=10) for i in range(6)]
    policy = RetentionPolicy(max_age_s=50, max_bytes=30, min_age_s=2)
    removed, fits = plan(entries, policy, now=151.5)  # r0 and r1 are older than 50 s
    assert [(r.name, r.why) for r in removed] == [("r0", "max_age_s"), ("r1", "max_age_s"), ("r2", "max_bytes")]
    assert fits
    # Room for 25 more bytes: only r3 is old enough to go; r4 and r5 are younger than min_age_s.
    removed, fits = plan(entries[3:], RetentionPolicy(max_bytes=30, min_age_s=2), now=105.5, incoming=("bob", 25))
    assert [r.name for r in removed] == ["r3"] and not fits


def test_plan_holds_each_client_to_its_share():
    entries = [Entry("a1", "alice", 1.0, 40), Entry("b1", "bob", 2.0, 40), Entry("a2", "alice", 3.0, 40)]
    policy = RetentionPolicy(max_bytes_per_client=50, min_age_s=0)
    removed, fits = plan(entries, policy, now=10.0, incoming=("bob", 20))
    assert [(r.name, r.why) for r in removed] == [("a1", "max_bytes_per_client"), ("b1", "max_bytes_per_client")] and fits
    removed, fits = plan(entries, policy, now=10.0, incoming=("carol", 60))  # larger than any one share
    assert not fits and [r.name for r in removed] == ["a1"]


@pytest.mark.parametrize(
    ("retention", "says"),
    [
        ({"max_age_s": 0}, "max_age_s: Input should be greater than 0"),
        ({"max_bytes": -5}, "max_bytes: Input should be greater than 0"),
        ({"max_bytes": 100, "max_bytes_per_client": 200}, "max_bytes_per_client (200) is larger than max_bytes (100)"),
        ({"max_files": 3}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_limits_are_refused_with_the_field_and_why(tmp_path, retention, says):
    with pytest.raises(ConfigError, match="result_store.retention") as raised:
        make_store(tmp_path / "s", **retention)
    assert says in str(raised.value)


def test_retention_needs_a_local_store():
    config = parse_site_config({"name": "north", "operations": [], "result_store": {"url": "memory://north/results", "retention": {"max_bytes": 10}}})
    with pytest.raises(ConfigError, match="needs a local result store"):
        ResultStore("north", config.result_store)


# -- the store ----------------------------------------------------------------------


def test_an_expired_result_is_collected_and_its_reference_says_so(tmp_path):
    clock = Clock()
    store = make_store(tmp_path / "s", clock, max_age_s=60)
    old = put(store, 100, owner="alice")
    clock.now += 30
    young = put(store, 100)
    clock.now += 31  # old is 61 s old, young 31 s
    assert [(r.name, r.owner, r.why) for r in store.retention.collect(dry_run=True).removed] == [(Path(old.uri).name, "alice", "max_age_s")]
    store.verify(old)  # a dry run removes nothing
    report = store.retention.collect()
    assert [r.name for r in report.removed] == [Path(old.uri).name]
    assert (report.usage.bytes, report.usage.results, report.usage.per_client) == (100, 1, {"anonymous": 100})
    with pytest.raises(ResultExpiredError, match=r"removed from the store by the site's retention \(result_store.retention.max_age_s\); run the operation"):
        store.verify(old)
    store.verify(young)
    # Another process of the site (a second store over the same folder) tells the same story.
    with pytest.raises(ResultExpiredError):
        make_store(tmp_path / "s").read_bytes(old)


def test_storing_collects_the_oldest_first_to_stay_under_the_total(tmp_path):
    clock = Clock()
    store = make_store(tmp_path / "s", clock, max_bytes=300, min_age_s=5)
    refs = []
    for _ in range(3):
        refs.append(put(store, 100))
        clock.now += 10
    refs.append(put(store, 150))  # needs 150 bytes: the two oldest go
    for gone in refs[:2]:
        with pytest.raises(ResultExpiredError, match="retention.max_bytes"):
            store.verify(gone)
    for kept in refs[2:]:
        store.verify(kept)
    assert store.usage().bytes == 250 and store.usage().results == 2


def test_one_client_over_its_share_loses_its_own_oldest_not_others(tmp_path):
    clock = Clock()
    store = make_store(tmp_path / "s", clock, max_bytes_per_client=200, min_age_s=0)
    alice = [put(store, 100, "alice"), put(store, 100, "alice")]
    bob = put(store, 100, "bob")
    clock.now += 1
    put(store, 100, "alice")
    with pytest.raises(ResultExpiredError, match="max_bytes_per_client"):
        store.verify(alice[0])
    store.verify(alice[1])
    store.verify(bob)
    assert store.retention.usage().per_client == {"alice": 200, "bob": 100}


def test_a_full_store_refuses_a_new_result_and_writes_nothing(tmp_path):
    clock = Clock()
    store = make_store(tmp_path / "s", clock, max_bytes=250, min_age_s=60)
    first = put(store, 200)
    before = sorted(os.listdir(tmp_path / "s"))
    with pytest.raises(StoreFullError, match=r"the result store is full: a new result of 100 bytes .* \(result_store.retention.max_bytes: 250 bytes\).*min_age_s = 60 s") as refused:
        put(store, 100)
    assert refused.value.site == "north" and "raise result_store.retention" in str(refused.value)
    assert sorted(os.listdir(tmp_path / "s")) == before  # nothing written
    store.verify(first)
    # A lazy result (written to scratch first) is refused before it enters, and its scratch goes.
    with pytest.raises(StoreFullError):
        store.put(small_climate(seed=1).chunk({"time": 50}), op="xarray.subset", kind="dataset", summary={})
    assert sorted(os.listdir(tmp_path / "s")) == before
    clock.now += 61  # now the first result may make room
    put(store, 100)
    with pytest.raises(ResultExpiredError):
        store.verify(first)


def test_results_from_before_the_ledger_are_adopted_by_their_file_time_and_the_key_stays(tmp_path):
    root = tmp_path / "s"
    store = make_store(root)
    legacy = put(store, 50)
    os.remove(root / ".retention" / "ledger.jsonl")  # as if stored by a site without a ledger
    os.utime(root / Path(legacy.uri).name, (1000.0, 1000.0))
    (root / ".incoming").mkdir()
    (root / ".incoming" / "part").write_bytes(b"scratch")
    clock = Clock()
    aged = make_store(root, clock, max_age_s=3600)
    report = aged.retention.collect()
    assert [(r.name, r.owner, r.at) for r in report.removed] == [(Path(legacy.uri).name, UNRECORDED, 1000.0)]
    assert (root / ".digest-key").exists() and (root / ".incoming" / "part").exists()
    assert oct((root / ".retention" / "ledger.jsonl").stat().st_mode & 0o777) == "0o600"


def test_a_result_deleted_by_the_site_is_missing_not_expired(tmp_path):
    store = make_store(tmp_path / "s", max_bytes=1000)
    ref = put(store, 10)
    store.delete(ref)
    with pytest.raises(ResultIntegrityError) as missing:
        store.verify(ref)
    assert type(missing.value) is ResultIntegrityError and store.usage().bytes == 0


def _fill(root: str, owner: str, count: int) -> None:
    store = make_store(Path(root), max_bytes=1000, min_age_s=0)
    for _ in range(count):
        put(store, 100, owner)


def test_processes_sharing_a_store_keep_it_under_its_limit(tmp_path):
    root = tmp_path / "s"
    make_store(root, max_bytes=1000, min_age_s=0)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_fill, args=(str(root), f"p{i}", 15)) for i in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    held = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert sum(p.stat().st_size for p in held) == 1000 and len(held) == 10
    usage = make_store(root).usage()
    assert (usage.bytes, usage.results) == (1000, 10)


# -- views ----------------------------------------------------------------------------


def test_a_view_whose_copy_was_collected_is_materialized_again(tmp_path):
    data = small_climate(seed=3).load()
    data.chunk({"time": 50}).to_zarr(tmp_path / "t.zarr", zarr_format=2, consolidated=True)
    store_config = {"url": f"file://{tmp_path / 'store'}", "retention": {"max_age_s": 60}}
    with InProcessSite(tmp_path / "store", [{"name": "zarr", "url": f"file://{tmp_path / 't.zarr'}"}], result_store=store_config) as site:
        clock = Clock()
        site.worker.store.retention.clock = clock
        box = site.ref("xarray.subset", data="zarr", variables=["temperature"], ranges={"lat": {"start": 0, "stop": 60}})
        first = site.call_fetch(box)
        copy = site.worker.views.materialized(box)
        assert copy is not None
        clock.now += 61
        assert [r.name for r in site.worker.store.retention.collect().removed] == [Path(copy.uri).name]
        assert site.worker.views.materialized(box) is None  # the collected copy is forgotten, not served
        xr.testing.assert_equal(site.call_fetch(box), first)
        again = site.worker.views.materialized(box)
        assert again is not None and again.uri != copy.uri


def test_the_clock_is_wall_time_by_default(tmp_path):
    store = make_store(tmp_path / "s", max_age_s=1)
    assert abs(store.retention.clock() - time.time()) < 5


def test_a_record_cut_short_by_a_crash_does_not_stop_the_ledger(tmp_path):
    store = make_store(tmp_path / "s", max_bytes=1000, min_age_s=0)
    put(store, 100)
    with open(tmp_path / "s" / ".retention" / "ledger.jsonl", "ab") as ledger:
        ledger.write(b'{"put":"0123abc')  # a process died mid-write
    other = make_store(tmp_path / "s", max_bytes=1000, min_age_s=0)
    later = put(other, 100)
    assert other.usage().bytes == 200 and make_store(tmp_path / "s").usage().results == 2
    other.verify(later)


def test_stats_of_a_site_without_a_ledger_still_validate():
    from dfm_prefect.core.wire import SiteStats

    old = SiteStats.model_validate_json('{"requests": 3, "completed": 3, "load": {"running": 0, "queued": 0, "capacity": 4}}')
    assert old.store is None and old.requests == 3


def test_the_ledger_is_rewritten_once_it_is_mostly_history_and_other_processes_follow(tmp_path, monkeypatch):
    import site_workers.ledger

    clock = Clock()
    store = make_store(tmp_path / "s", clock, max_age_s=10)
    other = make_store(tmp_path / "s")  # another process of the site, which has read the ledger before
    refs = [put(store, 10) for _ in range(5)]
    assert other.usage().results == 5
    ledger = tmp_path / "s" / ".retention" / "ledger.jsonl"
    before = ledger.stat().st_ino
    monkeypatch.setattr(site_workers.ledger, "COMPACT_SLACK", -15)  # 10 records > 4 * (0 held + 5 removed) - 15
    clock.now += 11
    refs.append(put(store, 10))  # the five expire; the ledger is rewritten
    assert ledger.stat().st_ino != before
    assert len(ledger.read_text().splitlines()) == 7  # its mark, five removals remembered, one result held
    assert (other.usage().bytes, other.usage().results) == (10, 1)
    with pytest.raises(ResultExpiredError):
        other.verify(refs[0])
    other.verify(refs[-1])


def test_plan_makes_room_from_the_clients_own_results_first():
    entries = [Entry("b1", "bob", 1.0, 50), Entry("a1", "alice", 2.0, 30)]
    policy = RetentionPolicy(max_bytes=100, max_bytes_per_client=60, min_age_s=0)
    removed, fits = plan(entries, policy, now=30.0, incoming=("alice", 30))  # inside alice's share, over the total
    assert [(r.name, r.why) for r in removed] == [("a1", "max_bytes")] and fits  # not bob's older one


def test_a_result_handed_out_again_is_as_young_as_a_new_one(tmp_path):
    clock = Clock()
    store = make_store(tmp_path / "s", clock, max_bytes=100, min_age_s=300)
    old = put(store, 60, owner="alice")
    clock.now += 3600
    assert store.renew(old)  # a cache hit an hour later
    clock.now += 1
    with pytest.raises(StoreFullError):  # it may not be removed to make room for a minute
        put(store, 60, owner="carol")
    store.verify(old)
    clock.now += 300
    put(store, 60, owner="carol")
    with pytest.raises(ResultExpiredError):
        store.verify(old)
    assert not store.renew(old)


@pytest.mark.parametrize("damage", [b'{"put":"x","at":1.0}', b"[1,2]", b"null", b'{"gone":"b","why":"max_age_s"}'])
def test_a_damaged_record_is_skipped_not_fatal(tmp_path, damage):
    store = make_store(tmp_path / "s", max_bytes=1000, min_age_s=0)
    put(store, 100)
    with open(tmp_path / "s" / ".retention" / "ledger.jsonl", "ab") as ledger:
        ledger.write(damage + b"\n")
    fresh = make_store(tmp_path / "s", max_bytes=1000, min_age_s=0)
    later = put(fresh, 100)
    fresh.verify(later)
    assert fresh.usage().results == 2


def test_a_ledger_rewritten_in_place_is_read_again(tmp_path):
    store = make_store(tmp_path / "s", max_bytes=1000, min_age_s=0)
    put(store, 100, owner="alice")
    other = make_store(tmp_path / "s", max_bytes=1000, min_age_s=0)
    assert other.usage().bytes == 100
    ledger = tmp_path / "s" / ".retention" / "ledger.jsonl"
    inode = ledger.stat().st_ino
    # Same inode, longer content, another first line: what an inode reused at once by a rewrite looks like.
    text = '{"rewritten":"0000"}\n' + '{"put":"%s.value.json","owner":"bob","at":1.0,"size":300}\n' % ("0" * 32)
    with open(ledger, "r+") as handle:
        handle.write(text + " " * max(0, ledger.stat().st_size - len(text)) + "\n")
    assert ledger.stat().st_ino == inode
    assert other.usage().bytes == 300
