"""Site policy in FLARE startup kits: installed mesh classes only, no bring-your-own-code.

A provisioned participant's kit has ``local/resources.json.default`` and
``local/authorization.json.default``; FLARE reads ``local/resources.json`` and
``local/authorization.json`` in their place when they exist. :func:`harden_kit`
writes those two files so that the participant

* builds only components whose class is in its ``class_allow_list`` (enforced),
  with the mesh job's package ``site_workers.flare.`` added, and
* refuses every job that brings code (``byoc: none`` for every role; the allow
  list is skipped for such jobs, so both are needed),

and lets ``project_admin`` and ``lead`` run app commands on the mesh job (the
way clients talk to it). It is idempotent: a site administrator runs it once on
their kit (``dfm-prefect federation join`` does) and can read the result.

Example:

```python
from dfm_prefect.flare.kits import harden_kit
harden_kit("/srv/flare/north")            # the kit folder that holds startup/ and local/
```
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from pathlib import Path
from typing import Any

from dfm_prefect.errors import ConfigError
from dfm_prefect.flare.job import ALLOW_PREFIX

RIGHTS = (
    "submit_job",
    "clone_job",
    "manage_job",
    "download_job",
    "view",
    "operate",
    "shell_commands",
    "app_command",
    "byoc",
    "server-predeployed-flwr",
)
APP_COMMAND_ROLES = ("project_admin", "lead")


def _read(local: Path, name: str) -> dict[str, Any]:
    for candidate in (local / name, local / f"{name}.default"):
        if candidate.exists():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"cannot read {candidate}: {exc}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{candidate} is not a JSON object")
            return data
    raise ConfigError(f"{local} has neither {name} nor {name}.default; is this a FLARE startup kit?")


def _role_rights(role: str, rights: Any) -> dict[str, str]:
    if isinstance(rights, str):  # "any"/"none": the same right for everything
        rights = {right: rights for right in RIGHTS}
    if not isinstance(rights, dict):
        raise ConfigError(f"authorization role {role!r} must be a string or an object")
    rights = dict(rights)
    rights["byoc"] = "none"
    rights["server-predeployed-flwr"] = "none"
    if role in APP_COMMAND_ROLES:
        rights["app_command"] = "any"
    return rights


def harden_kit(kit: str | os.PathLike[str], *, storage_root: str | os.PathLike[str] | None = None) -> list[str]:
    """Apply the mesh's site policy to one participant's kit; return what changed, for the operator's log.

    ``storage_root`` (server kits only) moves FLARE's job store and snapshots
    from the shared ``/tmp/nvflare`` into that folder.
    """
    local = Path(kit) / "local"
    if not local.is_dir():
        raise ConfigError(f"{kit} has no local/ folder; pass the participant's startup kit folder")
    changes: list[str] = []

    resources = _read(local, "resources.json")
    allow = list(resources.get("class_allow_list") or [])
    if ALLOW_PREFIX not in allow and "*" not in allow:
        allow.append(ALLOW_PREFIX)
        changes.append(f"class_allow_list += {ALLOW_PREFIX}")
    if "*" in allow:
        allow.remove("*")
        changes.append("class_allow_list: removed '*' (allows every class)")
    resources["class_allow_list"] = allow
    if resources.get("class_list_enforcement_mode") != "enforce":
        resources["class_list_enforcement_mode"] = "enforce"
        changes.append("class_list_enforcement_mode = enforce")
    if storage_root is not None:
        changes += _private_storage(resources, Path(storage_root))
    (local / "resources.json").write_text(json.dumps(resources, indent=2))

    authorization = _read(local, "authorization.json")
    permissions = authorization.get("permissions")
    if not isinstance(permissions, dict):
        raise ConfigError(f"{local}/authorization.json has no permissions object")
    hardened = {role: _role_rights(role, rights) for role, rights in permissions.items()}
    if hardened != permissions:
        changes.append("authorization: byoc = none for every role; app_command for " + ", ".join(APP_COMMAND_ROLES))
    authorization["permissions"] = hardened
    (local / "authorization.json").write_text(json.dumps(authorization, indent=2))
    return changes


def _private_storage(resources: dict[str, Any], root: Path) -> list[str]:
    changes = []
    snapshot = resources.get("snapshot_persistor", {}).get("args", {}).get("storage", {}).get("args")
    if isinstance(snapshot, dict):
        snapshot["root_dir"] = str(root / "snapshot-storage")
        changes.append(f"snapshots in {root / 'snapshot-storage'}")
    for component in resources.get("components", []):
        if component.get("id") == "job_manager":
            component.setdefault("args", {})["uri_root"] = str(root / "jobs-storage")
            changes.append(f"job store in {root / 'jobs-storage'}")
    return changes


def kit_policy_problems(kit: str | os.PathLike[str]) -> list[str]:
    """What in a kit's effective policy would let code in or keep the mesh out (empty: fine)."""
    local = Path(kit) / "local"
    problems = []
    resources = _read(local, "resources.json")
    allow = resources.get("class_allow_list") or []
    if resources.get("class_list_enforcement_mode", "enforce") != "enforce":
        problems.append("class_list_enforcement_mode is not 'enforce'")
    if "*" in allow:
        problems.append("class_allow_list contains '*'")
    if ALLOW_PREFIX not in allow:
        problems.append(f"class_allow_list lacks {ALLOW_PREFIX!r} (the mesh job could not start here)")
    permissions = _read(local, "authorization.json").get("permissions", {})
    for role, rights in permissions.items():
        byoc = rights if isinstance(rights, str) else rights.get("byoc", "none")
        if byoc != "none":
            problems.append(f"role {role!r} may submit jobs with code (byoc={byoc!r})")
    return problems


def admin_address(kit: str | os.PathLike[str]) -> tuple[str, int]:
    """The FLARE server's admin host and port that an admin kit connects to."""
    path = Path(kit) / "startup" / "fed_admin.json"
    try:
        admin = json.loads(path.read_text())["admin"]
        return str(admin["host"]), int(admin["port"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the server address from {path}: {exc}") from None


def tls_problem(kit: str | os.PathLike[str], host: str, port: int, *, timeout: float = 3.0, listen: float = 1.0) -> str | None:
    """Why the server at ``host:port`` and this kit's mTLS identity do not trust each other, or None.

    One handshake with the kit's root CA and certificate: the server's
    certificate must be signed by the kit's root CA, and the server must keep
    the connection once it has seen the kit's certificate (with TLS 1.3 a
    server that refuses a client certificate closes the connection right after
    the handshake; ``listen`` is how long to watch for that, 0 to check only the
    server's certificate). None also when the port cannot be reached at all:
    that is not a question of trust.
    """
    startup = Path(kit) / "startup"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # FLARE certificates name participants, not hosts
    try:
        context.load_verify_locations(str(startup / "rootCA.pem"))
        context.load_cert_chain(str(startup / "client.crt"), str(startup / "client.key"))
    except (OSError, ssl.SSLError) as exc:
        return f"the kit's certificate files cannot be used: {exc}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    try:
        with context.wrap_socket(sock) as tls:
            if listen <= 0:
                return None
            tls.settimeout(listen)
            try:
                closed = tls.recv(1) == b""
            except TimeoutError:
                return None  # the server kept the connection: it accepted the certificate
            except ssl.SSLError as exc:
                return f"the server refused the kit's certificate: {exc.reason or exc}"
            if closed:
                return "the server closed the connection after seeing the kit's certificate"
            return None
    except ssl.SSLCertVerificationError as exc:
        return f"the server's certificate is not signed by the kit's root CA: {exc.verify_message}"
    except (ssl.SSLError, OSError) as exc:
        return f"the TLS handshake failed: {exc}"
    finally:
        sock.close()
