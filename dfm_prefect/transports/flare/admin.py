"""Talking to a FLARE federation through its admin API: sessions, the mesh job, its app commands.

Every call here goes through one admin session (an mTLS identity from an admin
startup kit). FLARE serializes admin commands in the server, so callers keep
long-polls short and make few calls (see :mod:`dfm_prefect.transports.flare.client`).

Example:

```python
from dfm_prefect.transports.flare import admin

session = admin.open_session("/srv/kits/admin@example.org", "admin@example.org")
try:
    job = admin.find_mesh_job(session, "dfm-mesh")
    print(admin.status(session, job.id).sites)
finally:
    session.close()
```
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from dfm_prefect.core.errors import ConfigError, FederationError, SiteUnavailableError
from dfm_prefect.transports.flare.protocol import CMD_EXCHANGE, CMD_STATUS, ExchangeReply, ExchangeRequest, StatusReply, StatusRequest

M = TypeVar("M", bound=BaseModel)


STARTING = ("SUBMITTED", "DISPATCHED", "RUNNING")


class MeshJobGoneError(SiteUnavailableError):
    """The mesh job is not running any more (finished, failed or aborted)."""


class AdminUnreachableError(SiteUnavailableError):
    """The FLARE server's admin endpoint cannot be reached, or the command got no answer."""


FLARE_ADMIN_LOGGER = "dfm_prefect.flare.admin"


def _log_flare_line(msg: str) -> None:
    logging.getLogger(FLARE_ADMIN_LOGGER).debug("%s", msg)


def quiet_flare() -> None:
    """Keep FLARE's admin-client chatter out of the user's terminal.

    FLARE's admin API prints a line such as "Connecting to FLARE ..." for every
    session it opens or reopens; a flow opens several and the long-poll reopens
    them, so the terminal filled with it. Those lines go to the debug log
    (logger ``dfm_prefect.flare.admin``) instead; errors still raise.
    """
    from nvflare.fuel.hci.client import api as hci_api
    from nvflare.tool.cli_output import set_output_format

    set_output_format("json")  # FLARE's own human-readable output, where it has any, goes to stderr
    hci_api._print_hci_message = _log_flare_line  # the module-level printer every admin session calls


def admin_kit_folder(admin_kit: str | os.PathLike[str]) -> Path:
    """``admin_kit`` as a path, or `ConfigError` if it is not an admin startup kit."""
    kit = Path(admin_kit)
    if not (kit / "startup" / "fed_admin.json").exists():
        raise ConfigError(f"{kit} is not an admin startup kit (no startup/fed_admin.json); point admin_kit at the admin's kit folder")
    return kit


def open_session(admin_kit: str | os.PathLike[str], username: str, *, command_timeout: float = 30.0, connect_timeout: float = 30.0) -> Any:
    """An authenticated admin session (close it when done, or it keeps reconnecting).

    FLARE takes the user's identity from the kit's certificate. A kit that the
    server does not trust (from another provisioning) cannot connect: the error
    then says what the TLS handshake found (see :func:`~dfm_prefect.transports.flare.trust.tls_problem`).
    The session logs in again by itself when the server ends it (see `RenewingSession`).
    """
    return RenewingSession(lambda: _login(admin_kit, username, command_timeout=command_timeout, connect_timeout=connect_timeout))


def _login(admin_kit: str | os.PathLike[str], username: str, *, command_timeout: float, connect_timeout: float) -> Any:
    from nvflare.fuel.flare_api import api_spec
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    from dfm_prefect.transports.flare.trust import admin_address, tls_problem

    kit = admin_kit_folder(admin_kit)
    host, port = admin_address(kit)

    def untrusted(problem: str) -> ConfigError:
        return ConfigError(
            f"the FLARE server at {host}:{port} and the admin kit {kit} do not trust each other ({problem}); "
            "use a startup kit from this federation's provisioning"
        )

    # A kit from another provisioning fails at the server's certificate: say so now, rather than
    # after FLARE has retried for connect_timeout seconds.
    problem = tls_problem(kit, host, port, listen=0)
    if problem is not None:
        raise untrusted(problem)
    quiet_flare()
    try:
        return new_secure_session(username, str(kit), timeout=connect_timeout, command_timeout=command_timeout)
    except (api_spec.AuthenticationError, api_spec.AuthorizationError) as exc:
        raise ConfigError(f"the FLARE server refused admin {username!r} from {kit}: {exc}") from None
    except (api_spec.NoConnection, TimeoutError, ConnectionError) as exc:
        problem = tls_problem(kit, host, port)  # the server may have refused the kit's own certificate
        if problem is not None:
            raise untrusted(problem) from None
        raise AdminUnreachableError(f"cannot reach the FLARE server at {host}:{port} (from {kit}/startup/fed_admin.json): {exc}") from None


@dataclass(frozen=True)
class MeshJob:
    id: str
    name: str
    status: str
    submitted: str


def _unreachable(exc: BaseException) -> bool:
    """Whether a FLARE admin API error means the server cannot be reached (or did not answer)."""
    from nvflare.fuel.flare_api import api_spec

    return isinstance(exc, (api_spec.NoConnection, api_spec.NoReply, api_spec.SessionClosed, TimeoutError, ConnectionError))


def mesh_jobs(session: Any, name: str) -> list[MeshJob]:
    """The running jobs called ``name``, newest first."""
    from nvflare.fuel.flare_api import api_spec

    try:
        listed = session.list_jobs(name_prefix=name)
    except (api_spec.AuthenticationError, api_spec.AuthorizationError) as exc:
        raise ConfigError(f"this admin identity may not list the federation's jobs (its role lacks FLARE's view right): {exc}") from None
    except Exception as exc:
        if _unreachable(exc):
            raise AdminUnreachableError(f"cannot list jobs: {type(exc).__name__}: {exc}") from None
        raise
    jobs = [
        MeshJob(id=j["job_id"], name=j.get("job_name", ""), status=j.get("status", ""), submitted=j.get("submit_time", ""))
        for j in listed
    ]
    running = [j for j in jobs if j.name == name and j.status == "RUNNING"]
    return sorted(running, key=lambda j: j.submitted, reverse=True)


def find_mesh_job(session: Any, name: str, job_id: str | None = None, *, skip: frozenset[str] = frozenset()) -> MeshJob:
    """The mesh job to use: ``job_id`` if it runs, else the newest running job called ``name`` (not in ``skip``)."""
    running = [job for job in mesh_jobs(session, name) if job.id not in skip]
    for job in running:
        if job_id is None or job.id == job_id:
            return job
    if running:
        return running[0]
    raise MeshJobGoneError(
        f"no mesh job named {name!r} is running on this FLARE server; start one with "
        "`dfm-prefect federation up` (POC) or `dfm-prefect federation mesh` (provisioned)"
    )


def job_status(session: Any, job_id: str) -> str | None:
    """The job's status as FLARE reports it, or ``unknown (why)`` if it cannot be read."""
    try:
        return session.get_job_status(job_id)
    except Exception as exc:  # any failure to read the status means we cannot trust the job
        return f"unknown ({type(exc).__name__}: {exc})"


def job_state(session: Any, job_id: str) -> str:
    """Like :func:`job_status`, but raise `AdminUnreachableError` if the server cannot be reached."""
    try:
        return str(session.get_job_status(job_id))
    except Exception as exc:
        if _unreachable(exc):
            raise AdminUnreachableError(f"{type(exc).__name__}: {exc}") from None
        return f"unknown ({type(exc).__name__}: {exc})"


def connected_sites(session: Any) -> dict[str, float]:
    """FLARE clients the server knows, with when it last heard from each (its clock)."""
    try:
        info = session.get_system_info()
    except Exception as exc:
        if _unreachable(exc):
            raise AdminUnreachableError(f"cannot read the system info: {type(exc).__name__}: {exc}") from None
        raise
    return {c.name: float(c.last_connect_time or 0.0) for c in info.client_info}


def command(session: Any, job_id: str, topic: str, request: BaseModel, reply: type[M], *, timeout: float | None = None) -> M:
    """Run one app command of the mesh job; raise specific errors for a gone job or server.

    ``timeout`` (seconds) bounds the wait for the answer; the session's command
    timeout otherwise. Only a session used by one thread may be given one.
    """
    from nvflare.fuel.flare_api import api_spec

    if timeout is not None:
        session.set_timeout(timeout)
    try:
        data = session.do_app_command(job_id, topic, request.model_dump(mode="json"))
    except (api_spec.JobNotRunning, api_spec.JobNotFound) as exc:
        raise MeshJobGoneError(f"FLARE: {exc}") from None
    except (api_spec.NoReply, api_spec.NoConnection, api_spec.SessionClosed, TimeoutError, ConnectionError) as exc:
        raise AdminUnreachableError(f"no answer from mesh job {job_id}: {type(exc).__name__}: {exc}") from None
    except (api_spec.AuthenticationError, api_spec.AuthorizationError) as exc:
        raise ConfigError(f"this admin identity may not run app commands on the mesh job: {exc}") from None
    except api_spec.InternalError as exc:
        raise AdminUnreachableError(f"mesh job {job_id} failed the command {topic}: {exc}") from None
    if isinstance(data, dict) and "error" in data and len(data) == 1:
        raise FederationError(f"mesh job {job_id} refused {topic}: {data['error']}")
    try:
        return reply.model_validate(data)
    except ValidationError as exc:
        raise AdminUnreachableError(f"mesh job {job_id} sent an unreadable {topic} reply: {exc.errors()[0]['msg']}") from None


def exchange(session: Any, job_id: str, request: ExchangeRequest, *, timeout: float | None = None) -> ExchangeReply:
    return command(session, job_id, CMD_EXCHANGE, request, ExchangeReply, timeout=timeout)


def status(session: Any, job_id: str, request: StatusRequest = StatusRequest()) -> StatusReply:
    return command(session, job_id, CMD_STATUS, request, StatusReply)


def wait_ready(session: Any, job_id: str, sites: list[str], timeout: float) -> StatusReply:
    """Wait until every site of ``sites`` said hello to the mesh job (or raise, saying which did not)."""
    deadline = time.monotonic() + timeout
    last: StatusReply | None = None
    problem = "the mesh job's controller has not answered yet"
    while time.monotonic() < deadline:
        try:
            # Blocks in the controller until ready or 0.5 s; short, because admin commands are serialized.
            last = status(session, job_id, StatusRequest(wait_ready=sites, wait=0.5))
        except (MeshJobGoneError, AdminUnreachableError) as exc:
            # A new job is SUBMITTED, then DISPATCHED, then RUNNING; its server process takes
            # commands a moment after that. The admin API has no event for any of it.
            problem = str(exc)
            status_now = job_status(session, job_id)
            if status_now not in STARTING:
                raise MeshJobGoneError(f"mesh job {job_id} ended while starting: {status_now}") from None
            time.sleep(0.2)
            continue
        if all(last.sites.get(s) is not None and last.sites[s].state == "ready" for s in sites):
            return last
        failed = {s: st.reason for s, st in last.sites.items() if s in sites and st.state == "dead"}
        if failed:
            raise SiteUnavailableError(f"sites failed to join mesh job {job_id}: {failed}")
    states = {s: (last.sites[s].state if last and s in last.sites else "absent") for s in sites}
    raise SiteUnavailableError(f"mesh job {job_id} was not ready within {timeout:.0f}s: {states or problem}")


def submit_mesh_job(session: Any, folder: str | os.PathLike[str]) -> str:
    try:
        return str(session.submit_job(str(folder)))
    except Exception as exc:
        if _unreachable(exc):
            raise AdminUnreachableError(f"cannot submit the mesh job: {type(exc).__name__}: {exc}") from None
        raise


def abort_job(session: Any, job_id: str) -> None:
    """Abort a job; a job that already ended is fine."""
    from nvflare.fuel.flare_api import api_spec

    try:
        session.abort_job(job_id)
    except (api_spec.JobNotRunning, api_spec.JobNotFound, api_spec.InternalError):
        pass
    except Exception as exc:
        if _unreachable(exc):
            raise AdminUnreachableError(f"cannot abort job {job_id}: {type(exc).__name__}: {exc}") from None
        raise


def close_session(session: Any) -> None:
    """Close a session, ignoring a server that is already gone."""
    try:
        session.close()
    except Exception:  # closing is best-effort: the server may be down already
        pass


class RenewingSession:
    """An admin session that logs in again when the FLARE server has ended it.

    The server ends an admin session after 30 minutes without a command (and
    when the kit's certificate expires); every later command of that session
    then fails with ``SessionClosed``. A client that waits that long between
    flows (a notebook, a deployment between runs) would otherwise take the
    server for unreachable. A command refused that way was not run, so it is
    sent once more on a fresh session; a session this object closed stays closed.
    """

    def __init__(self, login: Callable[[], Any]) -> None:
        self._login = login
        self._session = login()
        self._lock = threading.Lock()
        self._timeout: float | None = None
        self._closed = False
        self.renewals = 0

    def set_timeout(self, timeout: float) -> None:
        self._timeout = timeout
        self._session.set_timeout(timeout)

    def close(self) -> None:
        self._closed = True
        self._session.close()

    def _renew(self, stale: Any, why: BaseException) -> Any:
        with self._lock:
            if self._session is stale and not self._closed:
                logging.getLogger(FLARE_ADMIN_LOGGER).info("the FLARE server ended the admin session (%s); logging in again", why)
                close_session(stale)
                self._session = self._login()
                if self._timeout is not None:
                    self._session.set_timeout(self._timeout)
                self.renewals += 1
            return self._session

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._session, name)
        if not callable(attribute):
            return attribute

        def renewing(*args: Any, **kwargs: Any) -> Any:
            from nvflare.fuel.flare_api import api_spec

            session = self._session
            try:
                return getattr(session, name)(*args, **kwargs)
            except api_spec.SessionClosed as exc:  # SessionExpired included
                if self._closed:
                    raise
                return getattr(self._renew(session, exc), name)(*args, **kwargs)

        return renewing


class LockedSession:
    """An admin session shared by several threads of one process, one command at a time."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._session, name)
        if not callable(attribute):
            return attribute

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attribute(*args, **kwargs)

        return locked
