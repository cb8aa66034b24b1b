"""A site runs table operations in several threads at once without its Dask graph building deadlocking.

Found by the wire fuzzing (`test_fuzz_wire.py`): on Python < 3.12 two concurrent
``table.filter``/``table.project`` runs took `functools.cached_property`'s
class-wide locks in opposite orders inside Dask's expression code and hung both
of the site's slots for good (see `site_workers.concurrency`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dfm_prefect.core.wire import RunResult
from site_workers.concurrency import _get_without_lock
from site_workers.config import parse_site_config
from site_workers.worker import SiteWorker
from tests.support_sites import Answers, run_frame

PIPELINES: list[tuple[str, dict[str, Any]]] = [
    ("table.filter", {"data": "visits", "where": [{"column": "ward", "op": "==", "value": "a"}]}),
    ("table.project", {"data": "visits", "columns": ["ward"], "distinct": True}),
    ("table.groupby_aggregate", {"data": "visits", "by": ["ward"], "aggregations": {"n": {"column": "los", "func": "count"}}}),
    ("table.filter", {"data": "visits", "where": [{"column": "los", "op": ">", "value": 2}], "columns": ["los"]}),
]


@pytest.fixture
def table_site(tmp_path: Path) -> Iterator[SiteWorker]:
    (tmp_path / "visits.csv").write_text("ward,los\na,3\nb,5\na,7\nc,1\nb,2\n")
    config = {
        "name": "tables",
        "operations": sorted({op for op, _ in PIPELINES}),
        "sources": [{"name": "visits", "url": f"file://{tmp_path / 'visits.csv'}"}],
        "result_store": {"url": f"file://{tmp_path / 'store'}"},
        "export": {"kinds": ["aggregate", "value", "table"], "disclosure": {"min_group_size": 1, "min_subset_size": 1}},  # about threads
        "limits": {"concurrency": 4},
    }
    worker = SiteWorker(parse_site_config(config))
    yield worker
    worker.close()


def test_a_site_drops_the_class_wide_cached_property_lock_before_python_3_12(table_site: SiteWorker) -> None:
    if sys.version_info >= (3, 12):
        pytest.skip("CPython 3.12 has no such lock")
    assert functools.cached_property.__get__ is _get_without_lock


@pytest.mark.slow
def test_concurrent_table_operations_all_finish(table_site: SiteWorker) -> None:
    """Before the fix, 80 mixed table runs on 4 slots hung within the first few dozen (both threads waiting forever)."""
    answers = Answers()
    runs = 80
    for index in range(runs):
        op, params = PIPELINES[index % len(PIPELINES)]
        table_site.handle_frame(run_frame(op, params, f"run-{index}"), answers, "peer")
    done = answers.wait(runs, timeout=180)
    failed = [m for m in done if not (isinstance(m, RunResult) and m.ok)]
    assert not failed, failed[:3]
