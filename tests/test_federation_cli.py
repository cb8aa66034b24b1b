"""`dfm-prefect federation up/status/down` with the local transport (FLARE's are in test_flare_mesh.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, site_config

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "dfm_prefect.cli", *args], capture_output=True, text=True, timeout=180, env=env)


def test_local_up_status_down_round_trip(tmp_path: Path):
    configs = []
    for name in ("north", "south"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(site_config(name, tmp_path / "store" / name, [], operations=["core.echo"], operation_modules=[])))
        configs.append(str(path))
    workdir = tmp_path / "fed"
    up = cli("federation", "up", *configs, "--workdir", str(workdir), "--transport", "local")
    assert up.returncode == 0, up.stderr[-2000:]
    assert "✓ starting 2 site process(es): north, south" in up.stdout and up.stdout.count("✓ every site is ready") == 1, up.stdout
    started = json.loads((workdir / "processes.json").read_text())
    assert started["transport"] == "local" and set(started["pids"]) == {"north", "south"}
    again = cli("federation", "up", *configs, "--workdir", str(workdir), "--transport", "local")
    assert again.returncode == 2 and "already started" in again.stderr
    status = cli("federation", "status", "--federation", str(workdir / "federation.json"))
    assert status.returncode == 0 and status.stdout.count("ready") == 2
    issued = cli("federation", "issue", "alice@lab.example", "--workdir", str(workdir))
    assert issued.returncode == 0, issued.stderr[-2000:]
    from dfm_prefect.client import get_client

    alice = get_client(workdir / "alice@lab.example.json")
    assert alice.identity == "alice@lab.example" and get_client(workdir / "federation.json").identity == "admin@local"
    assert alice.call("north", "core.echo", {"value": 7}).fetch(client=alice) == 7
    alice.close()
    audit = (workdir / "audit" / "north.audit.jsonl").read_text()
    assert '"identity": "alice@lab.example"' in audit and oct((workdir / "identities" / "rootCA.key").stat().st_mode & 0o777) == "0o600"
    down = cli("federation", "down", "--workdir", str(workdir))
    assert down.returncode == 0 and "stopped north" in down.stdout
    for pid in started["pids"].values():
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert cli("federation", "down", "--workdir", str(workdir)).returncode == 2  # nothing left to stop
