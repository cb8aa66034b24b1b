"""The benchmark harness itself: it runs, checks what it measures, and renders BENCHMARKS.md.

The figures are not asserted (timings belong in ``BENCHMARKS.md``, not in
tests); what must hold is that a benchmark round really runs its tasks through
the runners, refuses a round that lost a result, and that the recorded results
render. Runs in a subprocess: ``BenchEnv`` starts its own Prefect API and
federation, as ``python -m bench`` does.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = """
import json
from prefect import task
from prefect.task_runners import ThreadPoolTaskRunner

from bench import dispatch, load
from bench.env import BenchEnv
from dfm_prefect.task_runner import FederationTaskRunner
from adapters.core import echo

with BenchEnv() as env:
    rows = dispatch.run(env, rounds=1, include_dask=False, include_flare=False)
    fed = env.local_federation()
    variant = load._Variant("FederationTaskRunner (local)", FederationTaskRunner(fed.federation_file), echo, fed)
    measured = load._round(variant, 60, measure=True)

    @task
    def off_by_one(value: int) -> int:
        return value + (value == 7)

    try:
        load._round(load._Variant("broken", ThreadPoolTaskRunner(max_workers=4), off_by_one), 20, measure=False)
        lost = "not detected"
    except load.LostResultsError as exc:
        lost = str(exc)

print(json.dumps({
    "rows": [row.as_dict() for row in rows],
    "by_site": measured.by_site,
    "peaks": measured.peaks,
    "lost": lost,
}))
"""


@pytest.mark.slow
def test_a_benchmark_round_runs_through_the_runners_and_refuses_lost_results():
    result = subprocess.run([sys.executable, "-c", SMOKE], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    rows = {(row["variant"], row["metric"]): row for row in report["rows"]}
    base = rows[("ThreadPoolTaskRunner", "per-task overhead")]
    ours = rows[("FederationTaskRunner (local)", "per-task overhead")]
    assert base["median"] > 0 and ours["median"] > 0 and base["unit"] == "ms"
    assert ours["ratio"] == pytest.approx(ours["median"] / base["median"])

    assert sum(report["by_site"].values()) == 60 and all(report["by_site"].values()), report["by_site"]
    assert all(peak > 0 for peak in report["peaks"].values()), report["peaks"]
    assert {"client", "Prefect API server", "site north", "site south"} <= set(report["peaks"])
    assert "1 of 20 results missing or not their own value" in report["lost"]


MOVES_SMOKE = """
import json, tempfile
from pathlib import Path

from bench import moves
from dfm_prefect.client import close_clients
from dfm_prefect.transports.local.launcher import LocalFederation

root = Path(tempfile.mkdtemp(prefix="dfm-bench-moves-"))
moves.make_source(root / "source.zarr", 3)
sources = {"north": [{"name": "moves-source", "url": f"file://{root / 'source.zarr'}"}]}
with LocalFederation(moves.site_configs(root / "local", sources), workdir=root / "local" / "federation") as fed:
    mesh = moves.Mesh("local", fed, root / "local")
    try:
        ref = mesh.stored(3)
        before = mesh.client.stats("hub").bytes_from_sites
        measured = mesh.measured_move(ref)
        arrived = mesh.client.stats("hub").bytes_from_sites - before
        mesh.check(ref, mesh.move(ref))
        held = sorted(p.stat().st_size for p in (root / "local" / "store" / "hub").iterdir() if "-moved." in p.name)
        cert, key = moves.throwaway_cert(root / "tls")
        tls = moves.tls_copy(mesh.stored_path(ref), cert, key, root)
    finally:
        close_clients()
print(json.dumps({"size": ref.size, "arrived": arrived, "held": held, "measured": measured, "tls": tls}))
"""


@pytest.mark.slow
def test_the_moves_benchmark_moves_the_bytes_it_times():
    result = subprocess.run([sys.executable, "-c", MOVES_SMOKE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    size = report["size"]
    assert size > 3_000_000  # three 1,000,000-byte steps, stored as netCDF by xarray.write
    assert report["arrived"] == size  # hub received the whole stored result from north, site to site
    assert report["held"] == [size, size]  # two checked copies in hub's store (the timed move and the checked one)
    measured = report["measured"]
    assert measured["seconds"] > 0 and measured["peak north"] > 0 and measured["peak hub"] > 0
    assert measured["cpu north"] > 0 and measured["cpu hub"] > 0  # each site's processes worked for the move
    assert measured["machine cpu"] >= measured["cpu hub"]
    assert report["tls"] > 0  # the TLS copy checks it received as many bytes as the file holds


@pytest.mark.slow
def test_the_files_benchmark_times_a_pipeline_whose_mean_matches_direct(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from bench import files

    monkeypatch.setenv("DFM_BENCH_FILES", "200")
    rows = files.run(SimpleNamespace(root=str(tmp_path)), rounds=1)  # raises if the site's mean is not xarray's
    by_variant = {row.variant: row for row in rows}
    assert by_variant["site, many-file store"].note == "214 files"  # 200 chunks, 3 coordinate arrays, 11 metadata files
    assert by_variant["site, many-file store"].ratio is not None and by_variant["site, few-file store"].median > 0
    assert by_variant["one look at the many-file store (every file's stamps)"].median > 0


def test_recorded_results_render_as_benchmarks_md():
    from bench.harness import Row
    from bench.report import markdown

    recorded = json.loads((ROOT / "bench" / "results.json").read_text())
    rows = [Row(**row) for row in recorded["rows"]]
    text = markdown(
        rows, machine=recorded["machine"], command=recorded["command"], notes={"n": "note"}, started=dt.datetime.fromisoformat(recorded["date"]), seconds=recorded["seconds"]
    )
    assert text.startswith("# Benchmarks") and f"`{recorded['command']}`" in text
    assert text.count("\n| ") == len(rows) + 1  # the header, then one line per row
