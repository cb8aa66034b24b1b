"""The README's main job: the federated demo, checked against direct computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dfm_prefect.demo import _max_rel_diff, run_demo
from dfm_prefect.testing.climate import ClimateSpec

pytestmark = pytest.mark.slow


def test_demo_agrees_with_direct_computation(tmp_path, prefect_api):
    # The command's default, FLARE, is covered below; the same demo on the local transport here.
    report = run_demo(tmp_path, ClimateSpec(years=3, resolution=4.0), log=lambda _: None, transport="local")
    assert report.ok, report.to_json()
    assert sorted(report.answer) == [2001, 2002]
    # Trend in the synthetic data: the later year is warmer.
    assert report.answer[2002]["mean"] > report.answer[2001]["mean"]
    sites = {step.site for step in report.steps}
    assert {"north", "south", "client"} <= sites
    for site in ("north", "south"):
        assert 0 < report.bytes_out[site] < report.raw_bytes[site] / 20
        # The subset is a view: the run wrote only the small aggregates, no copy of the data.
        assert set(report.stored[site]) == {"aggregate"}, report.stored
        assert report.stored[site]["aggregate"] < 64 << 10


def test_demo_command_prints_a_checked_report(tmp_path, prefect_api):
    result = subprocess.run(
        [sys.executable, "-m", "dfm_prefect.cli", "demo", "--workdir", str(tmp_path), "--years", "2", "--resolution", "6", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["max_rel_diff"] <= 1e-9
    assert report["transport"] == "flare"  # the README's `./dev demo` runs over FLARE
    for site in ("north", "south"):
        assert set(report["stored"][site]) == {"aggregate"}, report["stored"]


def test_the_check_catches_a_wrong_answer():
    right = {2001: {"mean": 287.0, "std": 14.0, "n": 10}}
    off = {2001: {"mean": 287.0 * (1 + 1e-6), "std": 14.0, "n": 10}}
    assert _max_rel_diff(right, right) == 0.0
    assert _max_rel_diff(off, right) > 1e-9
    assert _max_rel_diff({2001: {**right[2001], "n": 9}}, right) == float("inf")
