"""The README's main job: the federated demo, checked against direct computation."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dfm_prefect.demo import _max_rel_diff, run_demo
from dfm_prefect.testing.climate import ClimateSpec

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EMBEDDED_PNG = re.compile(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, from its header (fails if it is not one)."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", data[:16]
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def flow_run_pictures(flow_run_id: str) -> list[bytes]:
    """The PNGs embedded in the flow run's markdown artifacts, as the Prefect API returns them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as api:
        artifacts = api.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["markdown"]))
        )
    return [base64.b64decode(found) for artifact in artifacts for found in EMBEDDED_PNG.findall(str(artifact.data))]


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
    # The answer is drawn: a PNG in the work directory and the same kind of picture on the flow run.
    picture = Path(report.picture)
    assert picture.parent == tmp_path.resolve() and picture.suffix == ".png"
    width, height = png_size(picture.read_bytes())
    assert width >= 400 and height >= 200 and 5_000 < picture.stat().st_size <= 200 << 10
    assert report.flow_run_id is not None
    (shown,) = flow_run_pictures(report.flow_run_id)
    assert png_size(shown) == (width, height) and len(shown) <= 200 << 10


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
    png_size((tmp_path / "federated-climate-stats.png").read_bytes())
    assert report["picture"] == str((tmp_path / "federated-climate-stats.png").resolve())
    assert len(flow_run_pictures(report["flow_run_id"])) == 1


def test_the_check_catches_a_wrong_answer():
    right = {2001: {"mean": 287.0, "std": 14.0, "n": 10}}
    off = {2001: {"mean": 287.0 * (1 + 1e-6), "std": 14.0, "n": 10}}
    assert _max_rel_diff(right, right) == 0.0
    assert _max_rel_diff(off, right) > 1e-9
    assert _max_rel_diff({2001: {**right[2001], "n": 9}}, right) == float("inf")


def test_a_picture_is_a_small_png_and_says_how_to_get_matplotlib(monkeypatch):
    from dfm_prefect.pictures import MatplotlibMissingError, markdown_image, yearly_statistics_png

    stats = {year: {"mean": 287.0 + year % 7, "std": 14.0, "n": 1000 + year} for year in range(1990, 2021)}
    png = yearly_statistics_png(stats)
    assert png_size(png)[0] >= 400 and len(png) <= 200 << 10
    assert EMBEDDED_PNG.fullmatch(markdown_image(png, "yearly")), "the markdown must carry the picture itself"
    with pytest.raises(ValueError, match="lower dpi"):
        markdown_image(png * 100, "too big")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(MatplotlibMissingError, match=r"dfm-prefect\[demo\]"):
        yearly_statistics_png(stats)
