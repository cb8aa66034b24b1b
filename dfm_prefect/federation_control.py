"""What ``dfm-prefect federation up/down`` do, for every transport.

``up`` starts the federation's processes detached from the command (they keep
running after it exits), waits until every site is ready, and records what it
started in ``WORKDIR/processes.json``; ``down`` stops exactly those.

Example:

```python
from dfm_prefect.federation_control import down, up

started = up(["north.yaml", "south.yaml"], ".dfm", transport="flare")
print(started.federation_file)
down(".dfm")
```
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from dfm_prefect.errors import ConfigError

TransportName = Literal["flare", "local"]


class Started(BaseModel):
    """What ``up`` started (the content of ``processes.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transport: TransportName
    federation_file: str
    sites: list[str]
    pids: dict[str, int] = {}
    owner: int | None = None
    workdir: str


def state_file(workdir: str | os.PathLike[str]) -> Path:
    return Path(workdir) / "processes.json"


def up(configs: Sequence[str | os.PathLike[str]], workdir: str | os.PathLike[str], *, transport: TransportName = "flare") -> Started:
    """Start a federation of the given site configs and wait until every site is ready."""
    workdir = Path(workdir).resolve()
    if state_file(workdir).exists():
        raise ConfigError(f"a federation was already started from {workdir}; run `dfm-prefect federation down --workdir {workdir}` first")
    if transport == "local":
        from dfm_prefect.local_federation import LocalFederation

        local = LocalFederation(configs, workdir=workdir)
        local.start()
        started = Started(
            transport="local", federation_file=str(local.federation_file), sites=list(local.sites), pids=local.pids(), workdir=str(workdir)
        )
    else:
        from dfm_prefect.flare_federation import FlareFederation, launch

        names = FlareFederation(configs, workdir=workdir).sites  # validates the configs before anything starts
        owner = launch(configs, workdir)
        started = Started(
            transport="flare", federation_file=str(workdir / "federation.json"), sites=names, owner=owner, workdir=str(workdir)
        )
    state_file(workdir).write_text(started.model_dump_json(indent=2))
    return started


def read_started(workdir: str | os.PathLike[str]) -> Started:
    path = state_file(workdir)
    try:
        data = json.loads(path.read_text())
    except OSError:
        raise ConfigError(f"no federation was started from {workdir} (no {path})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not JSON: {exc}") from None
    if isinstance(data, dict) and "transport" not in data:  # written by an earlier version: {site: pid}
        data = {"transport": "local", "federation_file": str(Path(workdir) / "federation.json"), "sites": list(data), "pids": data, "workdir": str(workdir)}
    try:
        return Started.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path} is not a federation record: {exc.errors()[0]['msg']}") from None


def down(workdir: str | os.PathLike[str]) -> list[str]:
    """Stop what ``up`` started from ``workdir``; return a line per thing stopped."""
    started = read_started(workdir)
    lines = []
    if started.transport == "local":
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
    else:
        from dfm_prefect.flare_federation import shutdown

        assert started.owner is not None
        forced = shutdown(started.owner, started.workdir)
        lines.append(f"stopped the FLARE federation (server, sites {', '.join(started.sites)}, mesh job)")
        if forced:
            lines.append(f"had to kill {len(forced)} leftover processes: {forced}")
    with contextlib.suppress(FileNotFoundError):
        state_file(workdir).unlink()
    return lines


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
