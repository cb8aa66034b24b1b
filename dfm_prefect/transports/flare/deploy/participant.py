"""A provisioned (multi-machine) FLARE federation: run a site from its kit, start the mesh job.

Site administrator, on the site's machine (docs/flare.md)::

    dfm-prefect federation join /srv/flare/north north.yaml

Project admin, anywhere the admin kit is::

    dfm-prefect federation mesh --admin-kit /srv/flare/admin@example.org \\
        --username admin@example.org --sites north,south --out federation.json
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from dfm_prefect.core.errors import ConfigError, SiteUnavailableError
from dfm_prefect.transports.base import write_spec
from dfm_prefect.transports.flare import admin
from dfm_prefect.transports.flare.client import FlareSpec
from dfm_prefect.transports.flare.deploy.job import MeshJobConfig, write_job
from dfm_prefect.transports.flare.deploy.kits import harden_kit
from dfm_prefect.transports.flare.deploy.poc import participant_command, sweep
from dfm_prefect.transports.flare.deploy.supervisor import MeshSupervisor
from dfm_prefect.transports.flare.protocol import SITE_CONFIG_ENV

Log = Callable[[str], None]


def kit_client_name(kit: Path) -> str:
    try:
        config = json.loads((kit / "startup" / "fed_client.json").read_text())
        return str(config["client"]["fqsn"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{kit} is not a FLARE client startup kit (startup/fed_client.json: {exc})") from None


def run_site(
    kit: str | os.PathLike[str], config: str | os.PathLike[str], *, log: Log = print, shell_roles: Sequence[str] = ()
) -> int:
    """Check the site config against the kit, apply the site policy to the kit, run its FLARE client until it exits.

    ``shell_roles``: admin roles that may run FLARE's shell commands on this site (see `harden_kit`).
    """
    from site_workers.config import load_site_config

    kit, config = Path(kit).resolve(), Path(config).resolve()
    site = load_site_config(config)  # refuse a broken config before FLARE starts
    name = kit_client_name(kit)
    if site.name != name:
        raise ConfigError(f"{config} configures site {site.name!r} but the kit {kit} is FLARE client {name!r}")
    for change in harden_kit(kit, shell_roles=shell_roles):
        log(f"kit policy: {change}")
    env = {**os.environ, SITE_CONFIG_ENV: str(config)}
    # FLARE's logs and job folders hold what the export policy held back (values in exception
    # text): whatever the client writes is for the site's account alone.
    os.umask(0o077)
    log(f"starting FLARE client {name} (site config {config}); stop it with Ctrl-C or SIGTERM")
    process = subprocess.Popen(participant_command(kit, "client"), cwd=kit, env=env)
    try:
        with _stop_signals(signal.SIGTERM, signal.SIGINT):
            return process.wait()
    except (KeyboardInterrupt, _Stop):
        pass
    log(f"stopping FLARE client {name} and its job processes")
    with _stop_signals():  # a second signal does not cut the stop short (it takes at most ~25 s)
        return _stop_client(process, kit)


class _Stop(Exception):
    """SIGTERM (a service manager, `kill`) or SIGINT reached `federation join`."""


@contextmanager
def _stop_signals(*stopping: signal.Signals) -> Iterator[None]:
    """Turn ``stopping`` signals into `_Stop` (SIGINT too where a background shell ignores it); ignore the others."""

    def stop(signum: int, frame: object) -> None:
        raise _Stop(signum)

    previous = {sig: signal.signal(sig, stop if sig in stopping else signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_client(process: subprocess.Popen[bytes], kit: Path, grace: float = 15.0) -> int:
    """End the FLARE client, then any job process it leaves (they run in sessions of their own)."""
    with suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    sweep(kit, grace=5.0)
    return code


def run_mesh(
    admin_kit: str | os.PathLike[str],
    username: str,
    sites: list[str],
    out: str | os.PathLike[str],
    *,
    supervise: bool = True,
    job: MeshJobConfig = MeshJobConfig(),
    ready_timeout: float = 120.0,
    log: Log = print,
) -> FlareSpec:
    """Make sure the mesh job runs with every site ready, write the federation file, optionally supervise."""
    if not sites:
        raise ConfigError("name the federation's sites (--sites north,south)")
    out = Path(out).resolve()
    folder = out.parent / f"{job.name}-job"  # FLARE takes letters, digits, dots, underscores and hyphens, not a leading dot
    session = admin.LockedSession(admin.open_session(admin_kit, username))
    try:
        running = admin.mesh_jobs(session, job.name)
        if running:
            job_id = running[0].id
            log(f"mesh job {job.name!r} is already running: {job_id}")
        else:
            # FLARE deploys a job to the clients connected when it is submitted: a site that joins later
            # would never be part of it. So wait for every named site first.
            _wait_connected(session, sites, ready_timeout, log)
            job_id = admin.submit_mesh_job(session, write_job(folder, job))
            log(f"submitted mesh job {job_id}")
        admin.wait_ready(session, job_id, sites, ready_timeout)
        spec = FlareSpec(admin_kit=str(Path(admin_kit).resolve()), username=username, job_name=job.name, job_id=job_id, sites=sites)
        write_spec(spec, out)
        log(
            f"every site is ready; wrote {out} (it names {username}'s kit: flow authors use a federation file "
            "naming their own kit, as docs/flare.md's step 5 shows)"
        )
        if supervise:
            _supervise(session, folder if folder.exists() else write_job(folder, job), spec, out, log)
        return spec
    finally:
        admin.close_session(session)


def _wait_connected(session: admin.LockedSession, sites: list[str], timeout: float, log: Log) -> None:
    deadline = time.monotonic() + timeout
    said = False
    while True:
        missing = sorted(set(sites) - set(admin.connected_sites(session)))
        if not missing:
            return
        if time.monotonic() > deadline:
            raise SiteUnavailableError(
                f"sites {', '.join(missing)} did not connect to the FLARE server within {timeout:.0f}s; "
                "start each with `dfm-prefect federation join KIT site.yaml` on its host"
            )
        if not said:
            log(f"waiting for {', '.join(missing)} to connect to the FLARE server")
            said = True
        time.sleep(0.5)  # the admin API has no "client connected" event


def _supervise(session: admin.LockedSession, folder: Path, spec: FlareSpec, out: Path, log: Log) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def moved(job_id: str) -> None:
        write_spec(spec.model_copy(update={"job_id": job_id}), out)
        log(f"mesh job replaced: now {job_id}")

    supervisor = MeshSupervisor(session, job_folder=folder, sites=list(spec.sites), job_id=str(spec.job_id), on_new_job=moved)
    supervisor.start()
    log("supervising the mesh job (Ctrl-C to stop supervising; the job keeps running)")
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.stop()
