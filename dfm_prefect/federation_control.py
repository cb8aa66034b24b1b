"""What ``dfm-prefect federation up/down`` do, for every installed transport.

``up`` asks the transport's launcher to start the federation's processes
detached from the command (they keep running after it exits), waits until every
site is ready, and records what it started in ``WORKDIR/processes.json``;
``down`` stops exactly those.

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
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.transports import launcher_class
from dfm_prefect.transports.base import Started

__all__ = ["Started", "down", "read_started", "state_file", "up"]


def state_file(workdir: str | os.PathLike[str]) -> Path:
    """Where ``up`` records what it started."""
    return Path(workdir) / "processes.json"


def up(
    configs: Sequence[str | os.PathLike[str]],
    workdir: str | os.PathLike[str],
    *,
    transport: str = "flare",
    progress: Callable[[str], None] | None = None,
) -> Started:
    """Start a federation of the given site configs and wait until every site is ready.

    ``progress`` is called with a line for each stage that is done (provisioning, server, sites, mesh job).
    """
    workdir = Path(workdir).resolve()
    if state_file(workdir).exists():
        raise ConfigError(f"a federation was already started from {workdir}; run `dfm-prefect federation down --workdir {workdir}` first")
    started = launcher_class(transport).up(configs, workdir, progress)
    state_file(workdir).write_text(started.model_dump_json(indent=2))
    return started


def read_started(workdir: str | os.PathLike[str]) -> Started:
    """The record ``up`` wrote in ``workdir``."""
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
    lines = launcher_class(started.transport).down(started)
    with contextlib.suppress(FileNotFoundError):
        state_file(workdir).unlink()
    return lines
