"""Bring a provisioned FLARE federation up across `Internet` hosts with docs/flare.md's own steps.

Used by ``tests/test_multihost.py`` and ``bench/locality_hosts.py``. Hosts:
``hub`` (the FLARE server), one host per site (each joins with
``dfm-prefect federation join``), and ``client`` (``federation mesh`` as the
supervisor, a Prefect server, the flows). The steps are the shell lines of the
docs' "On several machines" section, with their placeholders replaced, so that
the procedure the docs give is the one that runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import yaml

from dfm_prefect.testing.netns import Internet

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "flare.md"
PREFECT_PORT = 4200
DOCS_SERVER = "flare.example.org"


class BringUpError(AssertionError):
    """A step of the procedure failed (with its output)."""


def docs_blocks(heading: str, language: str) -> list[str]:
    """The ``language`` code blocks of docs/flare.md's section ``heading`` (up to the next heading)."""
    text = DOCS.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n#", start + len(heading) + 2)
    section = text[start : end if end != -1 else len(text)]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def shell_lines(block: str, replace: dict[str, str]) -> list[str]:
    """A docs shell block's commands, continuation lines joined, placeholders replaced, comments dropped."""
    joined = block.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        line = line.split("  #", 1)[0].strip()
        for placeholder, value in replace.items():
            line = line.replace(placeholder, value)
        if line:
            lines.append(line)
    return lines


def _bash(net: Internet, host: str, line: str, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    return net.popen(host, ["bash", "-c", line], env=env, cwd=cwd, log=open(log, "ab"))  # noqa: SIM115 - closed with the process



def bring_up(net: Internet, root: Path, configs: Mapping[str, Path], env: Mapping[str, str]) -> SimpleNamespace:
    """Provision, start the server on ``hub``, join each site of ``configs`` from its host, start the mesh job
    and a Prefect server on ``client``; return paths, environments and the seconds it took."""
    env = dict(env)
    sites = list(configs)
    venv_bin = str(Path(sys.executable).parent)
    t0 = time.monotonic()

    # 1. Provision, on a trusted machine: the docs' project.yml, with hub's name for the server.
    project = yaml.safe_load(docs_blocks("### 1. Provision", "yaml")[0])
    for participant in project["participants"]:
        if participant["name"] == DOCS_SERVER:
            participant["name"] = net.name("hub")
    (root / "project.yml").write_text(yaml.safe_dump(project, sort_keys=False))
    replace = {DOCS_SERVER: net.name("hub"), "provision/": str(root / "provision") + "/"}
    for line in shell_lines(docs_blocks("### 1. Provision", "bash")[0], replace):
        if line.startswith("ls "):
            listed = subprocess.run(line, shell=True, cwd=root, capture_output=True, text=True, env=env)
            _check(set(listed.stdout.split()) >= {net.name("hub"), *sites, "admin@example.org", "analyst@example.org"}, line, listed)
            continue
        done = subprocess.run(line, shell=True, cwd=root, capture_output=True, text=True, env=env, timeout=300)
        _check(done.returncode == 0, line, done)
    prod = root / "provision" / project["name"] / "prod_00"

    # 2. The server, on hub (its job store under root, as the docs' storage_root says).
    replace = {DOCS_SERVER: net.name("hub"), "/path/to/venv/bin": venv_bin, "/var/lib/dfm-flare": str(root / "hub-store")}
    for line in shell_lines(docs_blocks("### 2. Server", "bash")[0], replace):
        if line.startswith("pip install"):
            continue  # this environment is the installed one
        if line.endswith("start.sh"):  # it leaves the server running in the background
            _bash(net, "hub", line, env, prod, root / "hub.log")
            continue
        done = net.run("hub", ["bash", "-c", line], env=env, cwd=prod)
        _check(done.returncode == 0, line, done)
    net.wait_port("client", "hub", project["participants"][0]["admin_port"], timeout=120)

    # 3. Each site, on its host: the docs' join line with this site's kit and YAML.
    join = next(line for line in shell_lines(docs_blocks("### 3. Each site", "bash")[0], {}) if "federation join" in line)
    for site, config in configs.items():
        line = join.replace("/srv/flare/north", str(prod / site)).replace("north.yaml", str(config))
        _bash(net, site, line, env, root, root / f"{site}.log")

    # 4. The mesh job, from the client host with the project admin's kit (stays as the supervisor).
    mesh = shell_lines(docs_blocks("### 4. The mesh job", "bash")[0], {"/secure/admin@example.org": str(prod / "admin@example.org")})[0]
    mesh = mesh.replace("--sites north,south", f"--sites {','.join(sites)}")
    federation_file = root / "federation.json"
    supervisor = _bash(net, "client", mesh.replace("--out federation.json", f"--out {federation_file}"), env, root, root / "mesh.log")
    deadline = time.monotonic() + 240
    while not federation_file.exists():
        logs = "".join(f"\n--- {name}.log\n" + (root / f"{name}.log").read_text()[-1500:] for name in ("mesh", *sites))
        if supervisor.poll() is not None:
            raise BringUpError(f"`federation mesh` exited with {supervisor.returncode}:{logs}")
        if time.monotonic() > deadline:
            raise BringUpError(f"no federation file within 240 s:{logs}")
        time.sleep(0.5)
    up_seconds = time.monotonic() - t0

    # 5. Flows: the analyst's federation file from the docs, and a Prefect API on the client host.
    analyst = json.loads(docs_blocks("### 5. Flows", "json")[0])
    analyst["admin_kit"] = str(prod / "analyst@example.org")
    analyst["sites"] = sites
    analyst_file = root / "analyst.json"
    analyst_file.write_text(json.dumps(analyst))
    prefect_home = root / "prefect"
    prefect_home.mkdir(exist_ok=True)
    prefect_env = {**env, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    net.popen(
        "client", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(PREFECT_PORT)],
        env=prefect_env, log=open(root / "prefect.log", "ab"),  # noqa: SIM115
    )  # fmt: skip
    net.wait_port("client", "127.0.0.1", PREFECT_PORT, timeout=120)
    flow_env = {**env, "PREFECT_HOME": str(prefect_home), "PREFECT_API_URL": f"http://127.0.0.1:{PREFECT_PORT}/api", "DFM_FEDERATION": str(analyst_file)}
    return SimpleNamespace(root=root, prod=prod, env=env, flow_env=flow_env, federation_file=federation_file, analyst_file=analyst_file,
                           configs=dict(configs), up_seconds=up_seconds, project=project)  # fmt: skip


def host_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for the hosts' processes: the venv first on PATH, the repository importable."""
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT), "NO_PROXY": "*", "COLUMNS": "250", **(extra or {})}
    env.pop("DFM_FEDERATION", None)
    env.pop("PREFECT_API_URL", None)
    return env


def _check(ok: bool, line: str, done: subprocess.CompletedProcess[str]) -> None:
    if not ok:
        raise BringUpError(f"{line}: {done.stdout[-1500:]}{done.stderr[-1500:]}")
