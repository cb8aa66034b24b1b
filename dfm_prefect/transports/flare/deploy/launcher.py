"""Start and stop a federation over NVIDIA FLARE on this machine (a POC with real mTLS kits).

Example:

```python
from dfm_prefect.transports.flare.deploy.launcher import FlareFederation

with FlareFederation(["north.yaml", "south.yaml"], workdir=".dfm") as fed:
    print(fed.federation_file)        # pass this to FederationTaskRunner
```

`start` provisions kits for a server, one FLARE client per site config and an
admin (``local_provision``, nothing written to ``~/.nvflare``), binds everything
to 127.0.0.1, gives every participant the mesh's site policy (class allow-list,
no bring-your-own-code), starts the server and the clients (each with
``DFM_SITE_CONFIG`` pointing at its own YAML), submits the config-only mesh
job, waits until every site said hello, writes ``federation.json`` and starts a
:class:`~dfm_prefect.transports.flare.deploy.supervisor.MeshSupervisor` that replaces the mesh job
if a site's job process dies. `stop` aborts the jobs, shuts FLARE down and makes
sure no process of the workspace is left.

``python -m dfm_prefect.transports.flare.deploy.launcher serve CONFIG... --workdir DIR`` runs one
in the foreground until SIGTERM (what ``dfm-prefect federation up`` starts).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dfm_prefect.core.errors import ConfigError, FederationError, SiteUnavailableError
from dfm_prefect.transports.base import Launcher, Started, write_spec
from dfm_prefect.transports.flare import admin
from dfm_prefect.transports.flare.client import FlareSpec
from dfm_prefect.transports.flare.deploy.job import MeshJobConfig, write_job
from dfm_prefect.transports.flare.deploy.poc import ADMIN_USER, SERVER, Poc, sweep
from dfm_prefect.transports.flare.deploy.supervisor import MeshSupervisor
from dfm_prefect.transports.flare.protocol import SITE_CONFIG_ENV, StatusReply
from site_workers.identities import AUDIT_DIR_ENV

READY = "DFM-FLARE-READY"
STEP = "DFM-FLARE-STEP "
log = logging.getLogger("dfm_prefect.transports.flare.federation")


class FlareFederation(Launcher):
    """A FLARE server, one FLARE client per site config and the mesh job, all on 127.0.0.1."""

    def __init__(
        self, configs: Sequence[str | os.PathLike[str]], *, job: MeshJobConfig = MeshJobConfig(), supervise: bool = True, **options: Any
    ) -> None:
        """``job`` configures the mesh job, ``supervise`` replaces it when it fails; ``options`` as for `Launcher`."""
        super().__init__(configs, **options)
        self.job = job
        self.supervise = supervise
        self.poc = Poc(self.workdir / "flare", list(self.configs))
        self.job_id: str | None = None
        self.seconds: dict[str, float] = {}
        self.supervisor: MeshSupervisor | None = None
        self._session: admin.LockedSession | None = None
        self._spec_lock = threading.Lock()
        self.on_step: Callable[[str], None] | None = None
        """Called with a line for each stage of `start` that is done (for progress displays)."""

    @property
    def job_folder(self) -> Path:
        return self.workdir / "flare" / "jobs" / self.job.name

    @property
    def spec(self) -> FlareSpec:
        return self.spec_for(ADMIN_USER)

    def spec_for(self, identity: str) -> FlareSpec:
        """A federation spec for one of the POC's people (``admin@nvidia.com``, ``researcher@nvidia.com``): their own admin kit."""
        return FlareSpec(
            admin_kit=str(self.poc.kit(identity)),
            username=identity,
            job_name=self.job.name,
            job_id=self.job_id,
            sites=self.sites,
        )

    # ---------------------------------------------------------------- start

    def _env(self, site: str | None = None) -> dict[str, str]:
        if site is None:
            return self.process_env()
        audit = {AUDIT_DIR_ENV: str(self.workdir / "audit")}
        return self.process_env(**{SITE_CONFIG_ENV: str(self.configs[site]), **audit})  # job processes inherit it from their FLARE client

    def start(self) -> FlareSpec:
        """Provision, start FLARE and the mesh job, wait until every site is ready, write the federation file."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self.spec

    def _step(self, line: str) -> None:
        if self.on_step is not None:
            self.on_step(line)

    def _start(self) -> None:
        t0 = time.perf_counter()
        self.poc.prepare()
        self.seconds["provision"] = time.perf_counter() - t0
        self._step(f"provisioned mTLS startup kits (server, {len(self.sites)} site(s), admin)")
        self.poc.start(SERVER, self._env())
        self.poc.wait_server()
        self._step("FLARE server is up")
        for site in self.sites:
            self.poc.start(site, self._env(site))
        self.seconds["server"] = time.perf_counter() - t0
        self._session = admin.LockedSession(admin.open_session(self.poc.admin_kit, ADMIN_USER))
        self._wait_clients()
        self.seconds["clients"] = time.perf_counter() - t0
        self._step(f"FLARE clients connected: {', '.join(self.sites)}")
        write_job(self.job_folder, self.job)
        self.job_id = admin.submit_mesh_job(self._session, self.job_folder)
        self._step(f"mesh job {self.job_id} submitted; waiting for every site to say it is ready")
        admin.wait_ready(self._session, self.job_id, self.sites, self.ready_timeout)
        self.seconds["ready"] = time.perf_counter() - t0
        self._step("every site is ready")
        write_spec(self.spec, self.federation_file)
        if self.supervise:
            watcher = admin.LockedSession(admin.open_session(self.poc.admin_kit, ADMIN_USER))
            self.supervisor = MeshSupervisor(
                watcher, job_folder=self.job_folder, sites=self.sites, job_id=self.job_id, on_new_job=self._on_new_job
            ).start()

    def _wait_clients(self) -> None:
        assert self._session is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            connected = {c.name for c in self._session.get_system_info().client_info}
            if set(self.sites) <= connected:
                return
            for site in self.sites:
                process = self.poc.processes.get(site)
                if process is not None and process.poll() is not None:
                    raise SiteUnavailableError(
                        f"the FLARE client exited with code {process.returncode}; see {self.poc.log_path(site)}", site=site
                    )
            time.sleep(0.2)  # the admin API has no "client connected" event
        raise SiteUnavailableError(f"FLARE clients did not connect within {self.ready_timeout:.0f}s; see {self.poc.workspace}/logs")

    def _on_new_job(self, job_id: str) -> None:
        with self._spec_lock:
            self.job_id = job_id
            write_spec(self.spec, self.federation_file)

    # ---------------------------------------------------------- site control

    def kill_site_job(self, site: str) -> int:
        """SIGKILL the site's job process (as an OOM kill would); return its pid."""
        pids = self.poc.job_pids(site)
        if not pids:
            raise SiteUnavailableError("no job process is running for this site", site=site)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids[0]

    def stop_site(self, site: str, *, kill: bool = False) -> None:
        """Stop a site: SIGTERM its FLARE client (its job process follows it), or with ``kill=True``
        SIGKILL the client and its job processes at once, as if the site's machine died."""
        if not kill:
            self.poc.stop_participant(site)
            return
        # The client first: a live client would report its job process's death and FLARE would
        # then end the whole mesh job; a dead one reports nothing, as with a machine that died.
        jobs = self.poc.job_pids(site)
        self.poc.stop_participant(site, sig=signal.SIGKILL)
        for pid in jobs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def start_site(self, site: str) -> None:
        """(Re)start a site's FLARE client; the supervisor brings it into a new mesh job."""
        self.poc.start(site, self._env(site))

    def site_pids(self, site: str) -> list[int]:
        """The site's live processes: its FLARE client (first) and its job processes."""
        process = self.poc.processes.get(site)
        client = [process.pid] if process is not None and process.poll() is None else []
        return client + self.poc.job_pids(site)

    def signal_site(self, site: str, sig: int) -> None:
        """Send ``sig`` to every process of the site (SIGSTOP/SIGCONT freeze and thaw it)."""
        for pid in self.site_pids(site):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def server_pids(self) -> list[int]:
        """The FLARE server's processes: the server (first) and its job processes."""
        process = self.poc.processes.get(SERVER)
        server = [process.pid] if process is not None and process.poll() is None else []
        return server + self.poc.job_pids(SERVER)

    def kill_server(self) -> None:
        """SIGKILL the FLARE server and its job processes (the mesh job's controller), as a crash would."""
        jobs = self.poc.job_pids(SERVER)
        self.poc.stop_participant(SERVER, sig=signal.SIGKILL)
        for pid in jobs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def start_server(self) -> None:
        """(Re)start the FLARE server from its kit; clients reconnect, the supervisor starts a new mesh job."""
        self.poc.start(SERVER, self._env())
        self.poc.wait_server()

    def connected_sites(self) -> dict[str, float]:
        """The FLARE clients the server has admitted, with when it last heard from each (its clock)."""
        if self._session is None:
            raise SiteUnavailableError("the federation is not running")
        return admin.connected_sites(self._session)

    def mesh_status(self) -> StatusReply:
        """What the running mesh job reports: site states, client mailboxes, buffered bytes, counters."""
        if self._session is None or self.job_id is None:
            raise SiteUnavailableError("the federation is not running")
        with self._spec_lock:
            job_id = self.job_id
        return admin.status(self._session, job_id)

    # ----------------------------------------------------------------- stop

    def stop(self) -> list[int]:
        """Stop everything this federation started; return pids that did not exit by themselves.

        The sessions are closed first (an open session keeps reconnecting to a
        stopped server), then the FLARE participants get SIGTERM, then every
        process whose command line still names the workspace a second later
        (the job processes, which would take several seconds to notice) gets
        SIGTERM, and SIGKILL if it lingers. Aborting the jobs first would add
        seconds and protect nothing: the POC's state lives in its workspace.
        """
        if self.supervisor is not None:
            self.supervisor.stop()
            admin.close_session(self.supervisor.session)
            self.supervisor = None
        if self._session is not None:
            admin.close_session(self._session)
            self._session = None
        for name in [*self.sites, SERVER]:
            self.poc.stop_participant(name)
        return self.poc.sweep(grace=1.0)

    def __enter__(self) -> FlareFederation:
        self.start()
        return self

    @classmethod
    def up(cls, configs: Sequence[str | os.PathLike[str]], workdir: Path, progress: Callable[[str], None] | None = None) -> Started:
        names = cls(configs, workdir=workdir).sites  # validates the configs before anything starts
        owner = launch(configs, workdir, progress=progress)
        return Started(transport="flare", federation_file=str(workdir / "federation.json"), sites=names, owner=owner, workdir=str(workdir))

    @classmethod
    def down(cls, started: Started) -> list[str]:
        if started.owner is None:
            raise ConfigError(f"{started.workdir}: the record of this FLARE federation names no owner process")
        forced = shutdown(started.owner, started.workdir)
        lines = [f"stopped the FLARE federation (server, sites {', '.join(started.sites)}, mesh job)"]
        if forced:
            lines.append(f"had to kill {len(forced)} leftover processes: {forced}")
        return lines


def launch(
    configs: Sequence[str | os.PathLike[str]],
    workdir: str | os.PathLike[str],
    *,
    timeout: float = 300.0,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Run a federation in a detached process that lives until SIGTERM; return its pid once every site is ready.

    ``progress`` is called with a line for each stage the federation process finishes.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "federation.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dfm_prefect.transports.flare.deploy.launcher", "serve", *map(str, configs), "--workdir", str(workdir)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
    assert process.stdout is not None
    ready = threading.Event()

    def watch() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            if line.startswith(READY):
                ready.set()
                return
            if line.startswith(STEP) and progress is not None:
                progress(line[len(STEP) :].rstrip())

    reader = threading.Thread(target=watch, name="dfm-flare-launch", daemon=True)
    reader.start()
    reader.join(timeout)
    if ready.is_set():
        return process.pid
    code = process.poll()
    if code is None:
        process.terminate()
        code = process.wait(60)
        sweep(workdir / "flare")
    tail = log_path.read_text(errors="replace")[-3000:]
    if code == 2:
        raise ConfigError(f"the federation did not start (exit {code}); {log_path} ends with:\n{tail}")
    raise SiteUnavailableError(f"the federation did not start within {timeout:.0f}s (exit {code}); {log_path} ends with:\n{tail}")


def shutdown(pid: int, workdir: str | os.PathLike[str], *, timeout: float = 60.0) -> list[int]:
    """Stop a federation started by :func:`launch`; return pids that had to be killed."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:  # our own child when launched in this process
                break
        time.sleep(0.1)  # not our child in `federation down`: nothing to wait() on
    return sweep(Path(workdir).resolve() / "flare", grace=5.0)


def main(argv: list[str] | None = None) -> int:
    """Run a FLARE federation in the foreground until SIGTERM (used by ``dfm-prefect federation up``)."""
    parser = argparse.ArgumentParser(description="Run a dfm-prefect federation over a local FLARE POC.")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("DFM_LOG_LEVEL", "WARNING"), format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        federation = FlareFederation(args.configs, workdir=args.workdir)
        federation.on_step = lambda line: print(f"{STEP}{line}", flush=True)
        federation.start()
    except FederationError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2 if isinstance(exc, ConfigError) else 3
    print(f"{READY} {federation.federation_file} {federation.job_id}", flush=True)
    stop.wait()
    federation.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
