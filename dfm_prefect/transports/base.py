"""The transport contract: the client side (:class:`Transport`) and the launcher (:class:`Launcher`).

A transport is one package under ``dfm_prefect/transports/`` holding all its sides
(client, site endpoint, server side, launcher) and one entry point in the
``dfm_prefect.transports`` group naming that package, whose ``transport_class()`` and
``launcher_class()`` return its :class:`Transport` and :class:`Launcher` classes.
"""

from __future__ import annotations

import json
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.core.identity import Signer
from dfm_prefect.core.wire import ClientMessage, SiteMessage

OnMessage = Callable[[str, SiteMessage], None]
"""Called with (site, message) for every message a site sends back."""

OnSiteLost = Callable[[str, str], None]
"""Called with (site, reason) when a site stops answering; its in-flight requests are lost."""


class Transport(ABC):
    """Delivers batches of client messages to sites and site messages back.

    Implementations call ``on_message`` and ``on_site_lost`` from their own threads
    and never block them on the caller.
    """

    Spec: ClassVar[type[BaseModel]]
    """The federation-spec model this transport is configured with."""

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: Any) -> Transport:
        """Build the transport from its validated spec."""

    @abstractmethod
    def open(self, on_message: OnMessage, on_site_lost: OnSiteLost) -> None:
        """Connect; after this, :meth:`send` may be called."""

    @property
    @abstractmethod
    def sites(self) -> list[str]:
        """The names of the sites this transport can reach."""

    @abstractmethod
    def send(self, site: str, messages: Sequence[ClientMessage]) -> None:
        """Send a batch to one site; raise `SiteUnavailableError` if it cannot be delivered."""

    @abstractmethod
    def close(self) -> None:
        """Disconnect and stop every thread the transport started."""

    def signer(self) -> Signer | None:
        """The user's signing identity from the spec (certificate and key), or None for anonymous requests."""
        return None

    def site_states(self) -> dict[str, str]:
        """What the transport itself knows about each site (for ``federation status``); empty if nothing."""
        return {}

    @classmethod
    def portable_spec(cls, spec: Any) -> dict[str, Any]:
        """The spec as self-contained data (secrets in clear) to keep in a Prefect block."""
        data: dict[str, Any] = reveal(spec.model_dump(mode="python"))
        return data

    @classmethod
    def spec_from_portable(cls, data: dict[str, Any]) -> BaseModel:
        """The spec back from :meth:`portable_spec`'s data (on any machine)."""
        return cls.Spec.model_validate(data)


def site_name(config: Path) -> str:
    """The ``name`` in a site config file (read without validating the rest)."""
    import yaml

    try:
        data = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read site config {config}: {exc}") from None
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str):
        raise ConfigError(f"{config}: missing site name")
    return name


def reveal(value: Any) -> Any:
    """A spec's data with its secrets in clear (for writing spec files and keys)."""
    if hasattr(value, "get_secret_value"):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reveal(v) for v in value]
    return value


def write_spec(spec: BaseModel, path: str | os.PathLike[str]) -> Path:
    """Write a spec file readable only by its owner (it may hold keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(reveal(spec.model_dump(mode="python")), indent=2, default=str)
    return write_private(path, (text + "\n").encode())


def write_private(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write (or replace) a file only its owner can read: the mode is set at creation, never after."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return Path(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for processes a launcher starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Started(BaseModel):
    """What ``dfm-prefect federation up`` started (the content of ``WORKDIR/processes.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transport: str
    federation_file: str
    sites: list[str]
    pids: dict[str, int] = {}
    owner: int | None = None
    workdir: str


class Launcher(ABC):
    """Starts a federation of site configs on this machine and writes the federation file clients use.

    Each transport ships one (its package's ``launcher_class()``): in a ``with`` block for
    tests and the demo, or detached for ``dfm-prefect federation up``/``down``.
    """

    def __init__(
        self,
        configs: Sequence[str | os.PathLike[str]],
        *,
        workdir: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        pythonpath: Sequence[str] = (),
        ready_timeout: float = 120.0,
    ) -> None:
        """Read the site configs; start nothing yet. ``env`` and ``pythonpath`` go to the site processes."""
        self.workdir = Path(workdir).resolve()
        self.env = dict(env or {})
        self.pythonpath = list(pythonpath)
        self.ready_timeout = ready_timeout
        self.configs: dict[str, Path] = {}
        for config in map(Path, configs):
            name = site_name(config)
            if name in self.configs:
                raise ConfigError(f"two site configs are named {name!r}")
            self.configs[name] = config.resolve()

    @property
    def sites(self) -> list[str]:
        """The site names, from the site configs."""
        return list(self.configs)

    @property
    def federation_file(self) -> Path:
        """The federation file to give ``FederationTaskRunner`` (written by :meth:`start`)."""
        return self.workdir / "federation.json"

    def process_env(self, **extra: str) -> dict[str, str]:
        """The environment of a process this launcher starts: ours, ``env``, ``pythonpath`` first on PYTHONPATH."""
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1", **extra}
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    @abstractmethod
    def spec_for(self, identity: str) -> BaseModel:
        """The federation spec for one person: the same sites, reached with that person's own credentials."""

    @abstractmethod
    def start(self) -> BaseModel:
        """Start every site, wait until each serves, write the federation file; return the spec."""

    @abstractmethod
    def stop(self) -> object:
        """Stop everything this launcher started."""

    @abstractmethod
    def start_site(self, site: str) -> None:
        """Start (or restart) one site."""

    @abstractmethod
    def stop_site(self, site: str, *, kill: bool = False) -> None:
        """Stop one site (SIGTERM, or SIGKILL with ``kill=True``)."""

    @abstractmethod
    def site_pids(self, site: str) -> list[int]:
        """The site's live processes, its main process first; empty when it is not running."""

    def pids(self) -> dict[str, list[int]]:
        """Each running site's live processes."""
        return {site: pids for site in self.sites if (pids := self.site_pids(site))}

    @classmethod
    @abstractmethod
    def up(cls, configs: Sequence[str | os.PathLike[str]], workdir: Path, progress: Callable[[str], None] | None = None) -> Started:
        """Start the federation in processes that outlive the caller; return what to stop later.

        ``progress``, when given, is called with a line for each stage that is done.
        """

    @classmethod
    @abstractmethod
    def down(cls, started: Started) -> list[str]:
        """Stop what :meth:`up` started; return a line per thing stopped."""

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
