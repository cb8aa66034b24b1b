"""The database benchmark runs end to end on a small table and measures what it claims."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.mark.slow
def test_the_sql_benchmark_agrees_and_moves_fewer_bytes_federated(tmp_path, prefect_api):
    from bench.sql_locality import BASELINE, run

    rows = run(SimpleNamespace(root=tmp_path), rounds=1, rows=5000)
    moved = {row.variant: row.median for row in rows if row.metric == "bytes moved"}
    assert set(moved) == {"federated sql.aggregate (2 sites)", BASELINE}
    assert 0 < moved["federated sql.aggregate (2 sites)"] < moved[BASELINE] / 5
    assert all(row.median > 0 for row in rows if row.metric == "wall time")
