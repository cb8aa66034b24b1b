"""Start and stop a federation of local site processes (the local transport).

Example:

```python
from dfm_prefect.transports.local.launcher import LocalFederation

with LocalFederation(["north.yaml", "south.yaml"], workdir=".dfm") as fed:
    print(fed.federation_file)        # pass this to FederationTaskRunner
```
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import SecretStr

from dfm_prefect.core.errors import SiteUnavailableError
from dfm_prefect.transports.base import Launcher, Started, free_port, write_spec
from dfm_prefect.transports.local.client import LocalSpec
from dfm_prefect.transports.local.pki import LocalCA
from dfm_prefect.transports.local.protocol import AUTHKEY_ENV, DEFAULT_USER, PEERS_ENV, READY
from site_workers.identities import AUDIT_DIR_ENV, ROOT_CA_ENV


@dataclass
class _Site:
    name: str
    config: Path
    port: int
    process: subprocess.Popen[str] | None = None
    log: IO[str] | None = None


class LocalFederation(Launcher):
    """Site processes on this machine, one per site config, and the federation file to reach them."""

    def __init__(self, configs: Sequence[str | os.PathLike[str]], *, user: str = DEFAULT_USER, **options: Any) -> None:
        """``user`` is whom the federation file signs as; ``options`` as for `Launcher` (workdir, env, ...)."""
        super().__init__(configs, **options)
        self.authkey = secrets.token_hex(32)
        self.user = user
        self._sites = {name: _Site(name=name, config=config, port=free_port()) for name, config in self.configs.items()}
        self.ca: LocalCA | None = None

    @property
    def spec(self) -> LocalSpec:
        """How the launching user reaches the sites (signing as ``user`` once started)."""
        return self.spec_for(self.user) if self.ca is not None else self._spec(None, None)

    def spec_for(self, identity: str) -> LocalSpec:
        """A federation spec for another person: the same sites, their own certificate from this federation's CA."""
        if self.ca is None:
            raise SiteUnavailableError("start the federation before issuing identities")
        cert, key = (self.ca.folder / f"{identity}.crt", self.ca.folder / f"{identity}.key")
        # A federation started again in the same workdir has a new CA: certificates of the last one are issued again.
        if not self.ca.issued(cert):
            cert, key = self.ca.issue(identity)
        return self._spec(cert, key)

    def _spec(self, cert: Path | None, key: Path | None) -> LocalSpec:
        return LocalSpec(
            sites={name: f"127.0.0.1:{site.port}" for name, site in self._sites.items()},
            authkey=SecretStr(self.authkey),
            cert=str(cert) if cert else None,
            key=str(key) if key else None,
        )

    def start(self) -> LocalSpec:
        """Make the federation's CA, start every site, wait until each is serving, write the federation file."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.ca = LocalCA.create(self.workdir / "identities")
        try:
            for name in self._sites:
                self.start_site(name)
        except BaseException:
            self.stop()
            raise
        write_spec(self.spec, self.federation_file)
        return self.spec

    def start_site(self, name: str) -> None:
        """Start (or restart) one site on its fixed port and wait until it serves."""
        site = self._sites[name]
        assert self.ca is not None, "start() makes the CA first"
        env = self.process_env(
            **{
                AUTHKEY_ENV: self.authkey,
                ROOT_CA_ENV: str(self.ca.root_ca),
                AUDIT_DIR_ENV: str(self.workdir / "audit"),
                PEERS_ENV: str(self._peers_file(name)),
            }
        )
        site.log = open(self.workdir / "logs" / f"{name}.log", "a")
        site.process = subprocess.Popen(
            [sys.executable, "-m", "dfm_prefect.transports.local.server", str(site.config), "--port", str(site.port)],
            stdout=subprocess.PIPE,
            stderr=site.log,
            text=True,
            env=env,
            start_new_session=True,
        )
        self._await_ready(site)

    def _peers_file(self, name: str) -> Path:
        """The site's own federation file: the other sites, and a certificate that names this site (for moves)."""
        assert self.ca is not None
        cert, key = self.ca.issue_site(name)
        others = {other: f"127.0.0.1:{site.port}" for other, site in self._sites.items() if other != name}
        spec = LocalSpec(sites=others, authkey=SecretStr(self.authkey), cert=str(cert), key=str(key))
        return write_spec(spec, self.ca.folder / f"site-{name}.json")

    def _await_ready(self, site: _Site) -> None:
        assert site.process is not None and site.process.stdout is not None
        stdout = site.process.stdout
        ready = threading.Event()
        settled = threading.Event()

        def watch() -> None:
            # Keeps draining stdout after the ready line so the site never blocks on it.
            for line in stdout:
                if line.startswith(READY):
                    ready.set()
                    settled.set()
            settled.set()

        threading.Thread(target=watch, name=f"dfm-site-{site.name}-stdout", daemon=True).start()
        settled.wait(self.ready_timeout)
        if ready.is_set():
            return
        code = site.process.poll()
        self.stop_site(site.name)
        log_path = self.workdir / "logs" / f"{site.name}.log"
        tail = log_path.read_text()[-2000:] if log_path.exists() else ""
        cause = f"exited with code {code}" if code is not None else f"was not ready within {self.ready_timeout}s"
        raise SiteUnavailableError(f"the site process {cause}; its log ends with:\n{tail}", site=site.name)

    def stop_site(self, name: str, *, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop one site (SIGTERM, or SIGKILL with ``kill=True``) and wait for it to exit."""
        site = self._sites[name]
        process, site.process = site.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout)
        if process is not None and process.stdout is not None:
            process.stdout.close()
        if site.log is not None:
            site.log.close()
            site.log = None

    def stop(self) -> None:
        """Stop every site process."""
        for name in self._sites:
            self.stop_site(name)

    def site_pids(self, site: str) -> list[int]:
        process = self._sites[site].process
        return [process.pid] if process is not None and process.poll() is None else []

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    @classmethod
    def up(cls, configs: Sequence[str | os.PathLike[str]], workdir: Path, progress: Callable[[str], None] | None = None) -> Started:
        # Each site runs in its own session, so it outlives this process.
        local = cls(configs, workdir=workdir)
        if progress is not None:
            progress(f"starting {len(local.sites)} site process(es): {', '.join(local.sites)}")
        local.start()
        if progress is not None:
            progress("every site is ready")
        pids = {site: pids[0] for site, pids in local.pids().items()}
        return Started(transport="local", federation_file=str(local.federation_file), sites=local.sites, pids=pids, workdir=str(workdir))

    @classmethod
    def down(cls, started: Started) -> list[str]:
        lines = []
        for site, pid in started.pids.items():
            try:
                os.killpg(pid, signal.SIGTERM)
                lines.append(f"stopped {site} (pid {pid})")
            except ProcessLookupError:
                lines.append(f"{site} (pid {pid}) was not running")
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in started.pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)  # not our children: there is nothing to wait() on
        for site, pid in started.pids.items():
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                lines.append(f"killed {site} (pid {pid}): it did not stop within 15s")
        return lines


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
