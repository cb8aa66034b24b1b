"""A FLARE proof-of-concept deployment on this machine: provision, start, stop, leave nothing behind.

Provisioning uses FLARE's side-effect-free ``local_provision`` (``nvflare poc
prepare`` would write ``~/.nvflare``), on free loopback ports. The kits are then
patched so that everything binds and connects to 127.0.0.1 only, the server's
job store and snapshots live inside the workspace (not the shared
``/tmp/nvflare``), and every participant gets the mesh's site policy
(:func:`~dfm_prefect.transports.flare.deploy.kits.harden_kit`). The kits are real mTLS startup
kits, the same shape ``nvflare provision`` makes for a multi-machine federation.

FLARE starts each job in a new session (``setsid``), outside the parent's
process group, so :meth:`Poc.pids` finds processes by the workspace path in
their command line, and :meth:`Poc.sweep` ends them by pid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dfm_prefect.core.errors import ConfigError, SiteUnavailableError
from dfm_prefect.transports.base import free_port
from dfm_prefect.transports.flare.deploy.kits import harden_kit

log = logging.getLogger("dfm_prefect.transports.flare.deploy.poc")
ADMIN_USER = "admin@nvidia.com"
RESEARCHER = "researcher@nvidia.com"
"""A second person of the POC (role ``lead``: runs flows, administers nothing), with an admin kit of their own."""
SERVER = "server"
PROJECT = "dfm"


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def participant_command(kit: Path, role: str, *, extra: Sequence[str] = ()) -> list[str]:
    """The command ``startup/sub_start.sh --once`` would run, with this interpreter (no watchdog loop)."""
    script = (kit / "startup" / "sub_start.sh").read_text()
    found = re.search(r"-m nvflare\.private\.fed\.app\.(server|client)\.\w+ .*?--set (.+)$", script, re.MULTILINE)
    if found is None:
        raise ConfigError(f"{kit}/startup/sub_start.sh does not start a FLARE participant; is this a startup kit?")
    module = "server.server_train" if role == "server" else "client.client_train"
    settings = found.group(2).replace('"', "").split()
    return [
        sys.executable, "-u", "-m", f"nvflare.private.fed.app.{module}", "-m", str(kit),
        "-s", "fed_server.json" if role == "server" else "fed_client.json",
        "--set", *settings, *extra,
    ]  # fmt: skip


class Poc:
    """A provisioned POC: one server, one FLARE client per site, one project admin."""

    def __init__(self, workspace: str | os.PathLike[str], sites: Sequence[str]) -> None:
        self.workspace = Path(workspace).resolve()
        self.sites = list(sites)
        self.fl_port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.fl_port:
            self.admin_port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def prod(self) -> Path:
        return self.workspace / PROJECT / "prod_00"

    def kit(self, name: str) -> Path:
        return self.prod / name

    @property
    def admin_kit(self) -> Path:
        return self.kit(ADMIN_USER)

    # ------------------------------------------------------------ provision

    def prepare(self) -> None:
        """Provision mTLS kits for the server, each site and the admin; patch them for loopback and policy."""
        from nvflare.lighter.provision import gen_default_project_config
        from nvflare.tool.poc.poc_commands import local_provision

        from dfm_prefect.transports.flare.admin import quiet_flare

        if workspace_pids(self.workspace):
            raise ConfigError(f"a FLARE deployment from {self.workspace} is still running; stop it before provisioning anew")
        # Provisioning again into an old workspace would add prod_01 next to stale kits: start clean.
        for old in (PROJECT, "server-storage", "logs"):
            shutil.rmtree(self.workspace / old, ignore_errors=True)
        self.workspace.mkdir(parents=True, exist_ok=True)
        source = self.workspace / "project.src.yml"
        gen_default_project_config("dummy_project.yml", str(source))
        project = yaml.safe_load(source.read_text())
        project["name"] = PROJECT
        participants: list[dict[str, Any]] = []
        for participant in project["participants"]:
            if participant["type"] == "server":
                participants.append({**participant, "name": SERVER, "fed_learn_port": self.fl_port, "admin_port": self.admin_port})
            elif participant["type"] == "admin" and participant.get("role") == "project_admin":
                participants.append(participant)
        participants.append({"name": RESEARCHER, "type": "admin", "org": "nvidia", "role": "lead"})
        participants += [{"name": site, "type": "client", "org": "nvidia"} for site in self.sites]
        project["participants"] = participants
        source.write_text(yaml.safe_dump(project))
        quiet_flare()
        with open(self.workspace / "provision.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            local_provision([], len(self.sites), str(self.workspace), None, False, str(source))
        self._patch()

    def _patch(self) -> None:
        target = f"127.0.0.1:{self.fl_port}"
        server_json = self.kit(SERVER) / "startup" / "fed_server.json"
        config = json.loads(server_json.read_text())
        for server in config["servers"]:
            # A loopback target makes FLARE bind 127.0.0.1 instead of 0.0.0.0.
            server["service"]["target"] = target
            server["admin_host"] = "127.0.0.1"
        server_json.write_text(json.dumps(config, indent=2))
        for site in self.sites:
            client_json = self.kit(site) / "startup" / "fed_client.json"
            config = json.loads(client_json.read_text())
            for server in config["servers"]:
                server["service"]["target"] = target
            client_json.write_text(json.dumps(config, indent=2))
        for user in (ADMIN_USER, RESEARCHER):
            admin_json = self.kit(user) / "startup" / "fed_admin.json"
            config = json.loads(admin_json.read_text())
            config["admin"]["host"] = "127.0.0.1"
            admin_json.write_text(json.dumps(config, indent=2))

        harden_kit(self.kit(SERVER), storage_root=self.workspace / "server-storage")
        resources_json = self.kit(SERVER) / "local" / "resources.json"
        resources = json.loads(resources_json.read_text())
        for server in resources.get("servers", []):
            server["heart_beat_timeout"] = 30  # POC default 600 s: a dead client would look alive for 10 min
        resources_json.write_text(json.dumps(resources, indent=2))
        for site in self.sites:
            harden_kit(self.kit(site))

    # --------------------------------------------------------------- start

    def start(self, name: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start one participant (``server`` or a site) with ``env``; logs go to ``logs/<name>.log``."""
        kit = self.kit(name)
        for marker in ("pid.fl", "shutdown.fl", "restart.fl", "daemon_pid.fl"):
            (kit / marker).unlink(missing_ok=True)
        (kit / "transfer").mkdir(exist_ok=True)
        role = "server" if name == SERVER else "client"
        # The client's FLARE heartbeat every 5 s (default 10) keeps the server's view of it current.
        extra = [] if role == "server" else ["heart_beat_interval=5.0"]
        (self.workspace / "logs").mkdir(exist_ok=True)
        with open(self.workspace / "logs" / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                participant_command(kit, role, extra=extra),
                cwd=kit,
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes[name] = process
        # Reap it the moment it exits: FLARE's job processes stop only when their parent's pid is
        # gone, and an unreaped (zombie) parent still has one.
        threading.Thread(target=self._reap, args=(name, process), name=f"dfm-flare-reap-{name}", daemon=True).start()
        return process

    def _reap(self, name: str, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        log.info("FLARE participant %s exited with code %s", name, code)

    def wait_server(self, timeout: float = 60.0) -> None:
        """Wait until the server accepts connections on both of its ports."""
        deadline = time.monotonic() + timeout
        server = self.processes[SERVER]
        while not (port_open(self.fl_port) and port_open(self.admin_port)):
            if server.poll() is not None:
                raise SiteUnavailableError(f"the FLARE server exited with code {server.returncode}; see {self.log_path(SERVER)}")
            if time.monotonic() > deadline:
                raise SiteUnavailableError(f"the FLARE server did not open its ports within {timeout:.0f}s; see {self.log_path(SERVER)}")
            time.sleep(0.05)  # nothing to wait on: a port opening has no event

    def log_path(self, name: str) -> Path:
        return self.workspace / "logs" / f"{name}.log"

    # ---------------------------------------------------------------- stop

    def pids(self) -> list[int]:
        """Live processes started from this workspace: participants and the job processes they spawned."""
        return workspace_pids(self.workspace)

    def job_pids(self, site: str) -> list[int]:
        """The job processes a site's FLARE client runs."""
        return job_pids(self.kit(site))

    def stop_participant(self, name: str, *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def sweep(self, grace: float = 20.0) -> list[int]:
        """Wait up to ``grace`` for every process of this workspace to exit, then end the rest by pid."""
        forced = sweep(self.workspace, grace)
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        self.processes.clear()
        return forced


def _cmdline(pid: int) -> bytes | None:
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return None
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return None


def workspace_pids(workspace: str | os.PathLike[str]) -> list[int]:
    """Live processes whose command line names ``workspace`` (FLARE participants and their job processes)."""
    marker = str(Path(workspace).resolve()).encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            cmdline = _cmdline(int(entry))
            if cmdline is not None and marker in cmdline:
                found.append(int(entry))
    return found


def job_pids(kit: str | os.PathLike[str]) -> list[int]:
    """The job processes (a site's ``worker_process``, the server's ``runner_process``) running from a kit."""
    marker = str(Path(kit).resolve()).encode()
    found = []
    for pid in workspace_pids(kit):
        cmdline = _cmdline(pid) or b""
        if marker in cmdline and (b"worker_process" in cmdline or b"runner_process" in cmdline):
            found.append(pid)
    return found


def sweep(workspace: str | os.PathLike[str], grace: float = 20.0) -> list[int]:
    """Wait up to ``grace`` for the workspace's processes to exit, then SIGTERM/SIGKILL the rest; return those."""
    deadline = time.monotonic() + grace
    while workspace_pids(workspace) and time.monotonic() < deadline:
        time.sleep(0.2)  # they run in other sessions: there is nothing to wait() on
    forced = workspace_pids(workspace)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in workspace_pids(workspace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while workspace_pids(workspace) and time.monotonic() < deadline:
            time.sleep(0.1)
    return forced
