"""Keep a federation's mesh job running: replace it when it ends or when a live site fell out of it.

FLARE fails the whole job when one site's job process dies, and never deploys a
running job to a site that (re)connects later. So the supervisor, an admin
session on the operator's side, watches the mesh job and submits a new one:

* the job is no longer RUNNING: submit a new one at once;
* a site is dead or missing in the job while its FLARE client is connected
  (it restarted, or only its job process died): blue/green -- submit the new
  job while the old one still serves, wait until the new one is ready, point
  the federation at it, let the old one drain its in-flight work, abort it;
* the FLARE server cannot be reached: wait for it. Once it is back (restarted
  by its operator; the FLARE clients reconnect by themselves) its job store
  may still say RUNNING for the job that died with it, whose controller never
  answers: after ``UNANSWERED_S`` the supervisor aborts that job, waits for the
  sites to reconnect and submits a new one.

Clients follow by themselves: the FLARE transport switches to the newest
running job of the same name. There is no job or client event in FLARE's admin
API, so the supervisor checks every ``interval`` seconds (one or two short admin
commands).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfm_prefect.core.errors import FederationError
from dfm_prefect.transports.flare import admin

log = logging.getLogger("dfm_prefect.transports.flare.deploy.supervisor")

UNANSWERED_S = 10.0
"""A RUNNING mesh job whose controller does not answer for this long is replaced."""
RECONNECT_S = 20.0
"""How long a replacement waits for the federation's sites to be connected (after a server restart)."""
HEAL_S = 8.0
"""A dead site whose FLARE client is heard again gets this long to say hello to the same mesh job
(a stall or a cut link heals by itself) before a new job is submitted for it."""
ALIVE_S = 15.0
"""A FLARE client heard from within this many seconds counts as connected (clients beat every 5 s)."""


class MeshSupervisor:
    """Watches one federation's mesh job from an admin session and replaces it when needed.

    Args:
        session: an admin session used only by this supervisor's thread.
        job_folder: the mesh job folder to submit.
        sites: the federation's sites.
        job_id: the running mesh job.
        on_new_job: called with the new job id after a replacement is ready.
    """

    def __init__(
        self,
        session: Any,
        *,
        job_folder: Path,
        sites: list[str],
        job_id: str,
        on_new_job: Callable[[str], None] = lambda _job: None,
        interval: float = 1.0,
        ready_timeout: float = 45.0,
        drain_timeout: float = 60.0,
    ) -> None:
        self.session = session
        self.job_folder = job_folder
        self.sites = sites
        self.job_id = job_id
        self.on_new_job = on_new_job
        self.interval = interval
        self.ready_timeout = ready_timeout
        self.drain_timeout = drain_timeout
        self.replacements: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._backoff: dict[str, tuple[float, float]] = {}
        self._back_since: dict[str, float] = {}
        """When each site that fell out of the job was first seen connected again."""
        self._silent_since: float | None = None
        self._server_down: str | None = None
        self._drains: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._loop, name="dfm-mesh-supervisor", daemon=True)

    def start(self) -> MeshSupervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.ready_timeout + 10)
        for drain in self._drains:
            drain.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except FederationError as exc:
                log.warning("mesh supervisor: %s", exc)
            except Exception:  # the supervisor must outlive anything FLARE throws at it
                log.exception("mesh supervisor: unexpected error; checking again in %.1fs", self.interval)

    # ------------------------------------------------------------- checks

    def check(self) -> None:
        """One look at the mesh job, replacing it if needed."""
        try:
            status = admin.job_state(self.session, self.job_id)
        except admin.AdminUnreachableError as exc:
            if self._server_down is None:
                log.warning("the FLARE server cannot be reached (%s); waiting for it", exc)
            self._server_down = str(exc)
            return
        if self._server_down is not None:
            log.warning("the FLARE server answers again")
            self._server_down = None
        if status != "RUNNING":
            self._replace(f"mesh job {self.job_id} is {status}", blue_green=False)
            return
        now = time.monotonic()
        try:
            sites = admin.status(self.session, self.job_id).sites
        except admin.MeshJobGoneError as exc:
            self._replace(str(exc), blue_green=False)
            return
        except admin.AdminUnreachableError as exc:
            self._silent_since = self._silent_since or now
            if now - self._silent_since > UNANSWERED_S:
                self._replace(f"mesh job {self.job_id} is RUNNING but has not answered for {now - self._silent_since:.0f}s: {exc}", blue_green=False)
            else:
                log.info("mesh job %s does not answer status: %s", self.job_id, exc)
            return
        self._silent_since = None
        heard = self._last_heard()
        now = time.monotonic()
        lacking = []
        for site in self.sites:
            state = sites.get(site)
            if state is not None and state.state != "dead":
                self._backoff.pop(site, None)
                self._back_since.pop(site, None)
                continue
            # Worth a new job only if the site's FLARE client has been heard from since it fell out of
            # the mesh (it restarted, or only its job process died), and its config loads.
            fell_out = time.time() - (state.seen_s or 0.0) if state is not None else 0.0
            if heard.get(site, 0.0) <= fell_out or (state is not None and (state.reason or "").startswith("could not start")):
                continue
            back = self._back_since.setdefault(site, now)
            if state is not None and now - back < HEAL_S:
                continue  # a stall or a cut link heals by itself: the site says hello to this job again
            retry_at, _ = self._backoff.get(site, (0.0, 0.0))
            if now >= retry_at:
                lacking.append(site)
        if lacking:
            for site in lacking:
                _, delay = self._backoff.get(site, (0.0, 2.5))
                self._backoff[site] = (now + delay * 2, min(delay * 2, 300.0))
            serving = {site for site, state in sites.items() if state.state == "ready"}
            self._replace(
                f"sites {lacking} fell out of mesh job {self.job_id} but are connected",
                blue_green=True,
                wanted=sorted((serving | set(lacking)) & set(self.sites)),
            )

    def _last_heard(self) -> dict[str, float]:
        """When the FLARE server last heard from each client (its clock; clients beat every few seconds)."""
        return {name: when for name, when in admin.connected_sites(self.session).items() if when}

    def _connected(self) -> set[str]:
        now = time.time()
        return {name for name, when in self._last_heard().items() if now - when < ALIVE_S}

    def _wait_connected(self) -> set[str]:
        """The federation's connected sites, after waiting (up to ``RECONNECT_S``) for all of them."""
        deadline = time.monotonic() + RECONNECT_S
        connected = self._connected() & set(self.sites)
        while connected != set(self.sites) and not self._stop.wait(0.5):  # no "client connected" event in the admin API
            if time.monotonic() > deadline:
                log.warning("sites %s are not connected; the new mesh job starts without them", sorted(set(self.sites) - connected))
                break
            connected = self._connected() & set(self.sites)
        return connected

    def _replace(self, reason: str, *, blue_green: bool, wanted: list[str] | None = None) -> None:
        log.warning("replacing the mesh job: %s", reason)
        old = self.job_id
        if not blue_green:
            admin.abort_job(self.session, old)  # gone or dead already: nothing to drain
        wanted = wanted if wanted is not None else sorted(self._wait_connected())
        new = admin.submit_mesh_job(self.session, self.job_folder)
        try:
            admin.wait_ready(self.session, new, wanted, self.ready_timeout)
        except FederationError as exc:
            log.error("the replacement mesh job %s did not become ready: %s", new, exc)
            admin.abort_job(self.session, new)
            return
        self.job_id = new
        self.replacements.append((old, new))
        self.on_new_job(new)
        log.warning("mesh job %s replaces %s", new, old)
        self._silent_since = None
        if blue_green:
            drain = threading.Thread(target=self._drain, args=(old,), name=f"dfm-mesh-drain-{old[:8]}", daemon=True)
            self._drains.append(drain)
            drain.start()

    def _drain(self, job_id: str) -> None:
        """Let the old job finish what its sites are running, then abort it."""
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                state = admin.status(self.session, job_id)
            except FederationError:
                break
            busy = sum(s.load.running + s.load.queued for s in state.sites.values() if s.state == "ready")
            if not busy and not state.buffered_bytes:
                break
            self._stop.wait(self.interval)
        admin.abort_job(self.session, job_id)
