"""Start and stop a federation of local site processes (the local transport).

Example:

```python
from dfm_prefect.local_federation import LocalFederation

with LocalFederation(["north.yaml", "south.yaml"], workdir=".dfm") as fed:
    print(fed.federation_file)        # pass this to FederationTaskRunner
```
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import SecretStr

from dfm_prefect.errors import ConfigError, SiteUnavailableError
from dfm_prefect.federation import write_spec
from dfm_prefect.transports.local import LocalSpec

READY = "DFM-SITE-READY"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _site_name(config: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read site config {config}: {exc}") from None
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str):
        raise ConfigError(f"{config}: missing site name")
    return name


@dataclass
class _Site:
    name: str
    config: Path
    port: int
    process: subprocess.Popen[str] | None = None
    log: IO[str] | None = None


class LocalFederation:
    """Site processes on this machine, one per site config, and the federation file to reach them."""

    def __init__(
        self,
        configs: Sequence[str | os.PathLike[str]],
        *,
        workdir: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        pythonpath: Sequence[str] = (),
        ready_timeout: float = 120.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.env = dict(env or {})
        self.pythonpath = list(pythonpath)
        self.ready_timeout = ready_timeout
        self.authkey = secrets.token_hex(32)
        self.sites: dict[str, _Site] = {}
        for config in map(Path, configs):
            name = _site_name(config)
            if name in self.sites:
                raise ConfigError(f"two site configs are named {name!r}")
            self.sites[name] = _Site(name=name, config=config.resolve(), port=free_port())

    @property
    def federation_file(self) -> Path:
        return self.workdir / "federation.json"

    @property
    def spec(self) -> LocalSpec:
        return LocalSpec(
            sites={name: f"127.0.0.1:{site.port}" for name, site in self.sites.items()},
            authkey=SecretStr(self.authkey),
        )

    def start(self) -> LocalSpec:
        """Start every site, wait until each is serving, write the federation file."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            for name in self.sites:
                self.start_site(name)
        except BaseException:
            self.stop()
            raise
        write_spec(self.spec, self.federation_file)
        return self.spec

    def start_site(self, name: str) -> None:
        """Start (or restart) one site on its fixed port and wait until it serves."""
        site = self.sites[name]
        env = {**os.environ, **self.env, "DFM_AUTHKEY": self.authkey, "PYTHONUNBUFFERED": "1"}
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        site.log = open(self.workdir / "logs" / f"{name}.log", "a")
        site.process = subprocess.Popen(
            [sys.executable, "-m", "site_workers.local_server", str(site.config), "--port", str(site.port)],
            stdout=subprocess.PIPE,
            stderr=site.log,
            text=True,
            env=env,
            start_new_session=True,
        )
        self._await_ready(site)

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
        site = self.sites[name]
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
        for name in self.sites:
            self.stop_site(name)

    def pids(self) -> dict[str, int]:
        return {name: s.process.pid for name, s in self.sites.items() if s.process and s.process.poll() is None}

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
