"""The mesh job: a FLARE job folder made of JSON config only.

The job names installed classes by path; no ``custom/`` folder, so no code is
shipped with it (sites refuse jobs that bring code, see :mod:`dfm_prefect.transports.flare.deploy.kits`).

Example:

```python
from dfm_prefect.transports.flare.deploy.job import MeshJobConfig, write_job

folder = write_job("/tmp/dfm-mesh-job", MeshJobConfig(site_timeout=4.0))
# session.submit_job(str(folder)) with an admin session starts it
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from dfm_prefect.transports.flare.protocol import DEFAULT_JOB_NAME, STAY_TASK

CONTROLLER_CLASS = "dfm_prefect.transports.flare.mesh.controller.MeshController"
EXECUTOR_CLASS = "dfm_prefect.transports.flare.mesh.executor.MeshExecutor"
ALLOW_PREFIX = "dfm_prefect.transports.flare.mesh."
"""The class_allow_list entry that admits exactly the mesh job's components."""


class MeshJobConfig(BaseModel):
    """Settings of the mesh job (they go into its JSON config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(default=DEFAULT_JOB_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    site_timeout: float = Field(default=3.0, gt=0, description="Seconds without a heartbeat before a site is dead.")
    heartbeat_interval: float = Field(default=0.5, gt=0)
    dispatch_timeout: float = Field(default=10.0, gt=0)
    max_buffer_bytes: int = Field(default=256 << 20, gt=0, description="Reply bytes the controller buffers for all clients.")
    max_site_buffer_bytes: int = Field(default=64 << 20, gt=0, description="Reply bytes one site may have buffered.")
    max_client_buffer_bytes: int = Field(default=64 << 20, gt=0, description="Reply bytes one client's mailbox may hold.")
    client_timeout: float = Field(
        default=10.0,
        gt=1.0,
        description="Seconds a client that waits for answers may go without an exchange before it is gone and its "
        "work at the sites is cancelled (clients exchange every fraction of a second while they wait).",
    )
    idle_expiry: float = Field(
        default=600.0,
        gt=0,
        description="Seconds after which the mailbox of a client that waits for nothing is dropped; "
        "the client gets a fresh one with its next exchange.",
    )
    chunk_bytes: int = Field(default=1 << 20, gt=0, description="Largest piece of a reply frame in one message.")
    reply_linger: float = Field(default=0.002, ge=0, le=0.1, description="Seconds a site's reply waits for others to batch with.")


def write_job(folder: str | os.PathLike[str], config: MeshJobConfig = MeshJobConfig()) -> Path:
    """Write the job folder (meta.json and the server and client app configs); return it."""
    folder = Path(folder)
    app = folder / "app" / "config"
    app.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": config.name,
        "resource_spec": {},
        # One live site is enough: a dead site must not make FLARE abort the mesh job.
        "min_clients": 1,
        "deploy_map": {"app": ["@ALL"]},
    }
    server = {
        "format_version": 2,
        "workflows": [
            {
                "id": "dfm_mesh",
                "path": CONTROLLER_CLASS,
                "args": {
                    "site_timeout": config.site_timeout,
                    "dispatch_timeout": config.dispatch_timeout,
                    "max_buffer_bytes": config.max_buffer_bytes,
                    "max_site_buffer_bytes": config.max_site_buffer_bytes,
                    "max_client_buffer_bytes": config.max_client_buffer_bytes,
                    "client_timeout": config.client_timeout,
                    "idle_expiry": config.idle_expiry,
                },
            }
        ],
        "components": [],
    }
    client = {
        "format_version": 2,
        "executors": [
            {
                "tasks": [STAY_TASK],
                "executor": {
                    "path": EXECUTOR_CLASS,
                    "args": {
                        "heartbeat_interval": config.heartbeat_interval,
                        "chunk_bytes": config.chunk_bytes,
                        "frame_bytes": config.chunk_bytes,
                        "reply_linger": config.reply_linger,
                    },
                },
            }
        ],
        "components": [],
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    (app / "config_fed_server.json").write_text(json.dumps(server, indent=2))
    (app / "config_fed_client.json").write_text(json.dumps(client, indent=2))
    return folder
