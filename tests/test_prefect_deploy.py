"""The whole Prefect path: blocks, prefect.yaml deployments, a process worker, a live federation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for_task_runs

pytestmark = pytest.mark.slow

PREFECT = [sys.executable, "-m", "prefect"]


def run(args: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def deployed(prefect_api, federation, repo_root):
    """Blocks registered, the Federation block saved, the work pool created, prefect.yaml deployed."""
    setup = run(
        [sys.executable, "-m", "dfm_prefect.cli", "prefect", "setup", "--federation", str(federation.federation_file), "--block", "dfm-test", "--pool", "dfm-test-pool"],
        repo_root,
    )
    run(PREFECT + ["block", "register", "-m", "dfm_prefect.blocks"], repo_root)
    # Point the deployments at this test's block and pool without editing prefect.yaml.
    config = (repo_root / "prefect.yaml").read_text().replace('"block:dfm"', '"block:dfm-test"').replace("name: dfm-pool", "name: dfm-test-pool")
    deploy_file = repo_root / ".prefect-test-deploy.yaml"
    deploy_file.write_text(config)
    try:
        run(PREFECT + ["--no-prompt", "deploy", "--all", "--prefect-file", str(deploy_file)], repo_root)
    finally:
        deploy_file.unlink()
    return setup


def test_deployment_runs_on_a_worker_against_the_federation(deployed, federation, repo_root, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    flow_run = run_deployment("federated-climate-stats/climate-yearly", timeout=0)
    worker = subprocess.run(
        PREFECT + ["worker", "start", "--pool", "dfm-test-pool", "--run-once", "--type", "process"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert worker.returncode == 0, worker.stderr[-3000:]
    with get_client(sync_client=True) as api:
        finished = api.read_flow_run(flow_run.id)
        assert finished.state is not None and finished.state.is_completed(), (finished.state, worker.stdout[-3000:], worker.stderr[-3000:])
        result = finished.state.result()
        assert list(result) == [2001] and result[2001]["n"] > 0 and 250 < result[2001]["mean"] < 320
        runs = wait_for_task_runs(str(flow_run.id), 5, lambda r: r.state_name == "Completed")
        sites = {tag for run in runs for tag in run.tags if tag.startswith("site:")}
        assert sites == {"site:north", "site:south"}
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        artifacts = api.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
        table = next(a for a in artifacts if a.type == "table")
        assert {row["site"] for row in json.loads(table.data)} == {"north", "south"}
        logs = api.read_logs()
    secret = json.loads(federation.federation_file.read_text())["authkey"]
    assert all(secret not in (log.message or "") for log in logs)
    assert secret not in worker.stdout + worker.stderr
    assert all(secret not in str(a.data) for a in artifacts)


def test_federation_block_keeps_its_secret(deployed, federation, prefect_api):
    from dfm_prefect.blocks import Federation

    secret = json.loads(federation.federation_file.read_text())["authkey"]
    assert secret not in deployed.stdout + deployed.stderr
    block = Federation.load("dfm-test")
    assert secret not in repr(block) and secret not in str(block.model_dump())
    assert block.federation_spec().authkey.get_secret_value() == secret
    inspect = subprocess.run(
        PREFECT + ["block", "inspect", "dfm-federation/dfm-test"], capture_output=True, text=True, timeout=120
    )
    assert inspect.returncode == 0, inspect.stderr
    assert secret not in inspect.stdout + inspect.stderr
    status = subprocess.run(
        [sys.executable, "-m", "dfm_prefect.cli", "federation", "status", "--federation", str(federation.federation_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert secret not in status.stdout + status.stderr
