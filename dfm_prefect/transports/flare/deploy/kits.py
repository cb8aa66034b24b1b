"""Site policy in FLARE startup kits: installed mesh classes only, no bring-your-own-code.

A provisioned participant's kit has ``local/resources.json.default`` and
``local/authorization.json.default``; FLARE reads ``local/resources.json`` and
``local/authorization.json`` in their place when they exist. :func:`harden_kit`
writes those two files so that the participant

* builds only components whose class is in its ``class_allow_list`` (enforced),
  with the mesh job's package ``dfm_prefect.transports.flare.mesh.`` added, and
* refuses every job that brings code (``byoc: none`` for every role; the allow
  list is skipped for such jobs, so both are needed),
* gives the admin roles least privilege for this product: no FLARE shell
  commands (``ls``, ``cat``, ``grep``, ``head``, ``tail``, ``pwd`` read files of
  the site's workspace, its logs included, past the site's export policy) for
  any role, no ``download_job`` and no job log reading (``get_job_log``: only
  rights listed here exist, so it is never granted), job submission and job
  management only for the operator (``project_admin``), and for ``lead`` (who
  runs flows) nothing but ``view`` and app commands,

and lets ``project_admin`` and ``lead`` run app commands on the mesh job (the
way clients talk to it). The kit folder (where FLARE writes its logs and job
folders) and a server's ``storage_root`` become readable by their owner alone.
Rights are only taken away, never widened, except the app command right the
product needs. Shell commands come back only by an
explicit opt-in per role (``shell_roles``), for operators who accept what they
expose. It is idempotent: a site administrator runs it once on their kit
(``dfm-prefect federation join`` does) and can read the result.

Example:

```python
from dfm_prefect.transports.flare.deploy.kits import harden_kit
harden_kit("/srv/flare/north")            # the kit folder that holds startup/ and local/
harden_kit("/srv/flare/north", shell_roles=["project_admin"])   # opt in: the operator may ls/cat/grep here
```
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.transports.flare.deploy.job import ALLOW_PREFIX

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
OPERATOR_ROLE = "project_admin"
NEVER = ("byoc", "server-predeployed-flwr", "download_job")
"""Rights no role keeps: code in jobs, and the job workspaces (site logs included) that download_job hands out."""
OPERATOR_ONLY = ("submit_job", "clone_job", "manage_job")
"""Starting and managing jobs (a second mesh job included): the operator's alone."""
LEAD_KEEPS = ("view", "app_command")
"""What a ``lead`` (a flow author) keeps: see jobs and site states, talk to the mesh job."""


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


def _role_rights(role: str, rights: Any, shell_roles: Sequence[str]) -> dict[str, str]:
    if isinstance(rights, str):  # "any"/"none": the same right for everything
        rights = {right: rights for right in RIGHTS}
    if not isinstance(rights, dict):
        raise ConfigError(f"authorization role {role!r} must be a string or an object")
    rights = {right: value for right, value in rights.items() if right in RIGHTS}
    taken = list(NEVER)
    if role not in shell_roles:
        taken.append("shell_commands")
    if role != OPERATOR_ROLE:
        taken += OPERATOR_ONLY
    if role == "lead":
        taken += [right for right in RIGHTS if right not in LEAD_KEEPS]
    for right in taken:
        rights[right] = "none"
    if role in APP_COMMAND_ROLES:
        rights["app_command"] = "any"
    return rights


def harden_kit(
    kit: str | os.PathLike[str],
    *,
    storage_root: str | os.PathLike[str] | None = None,
    shell_roles: Sequence[str] = (),
) -> list[str]:
    """Apply the mesh's site policy to one participant's kit; return what changed, for the operator's log.

    ``storage_root`` (server kits only) moves FLARE's job store and snapshots
    from the shared ``/tmp/nvflare`` into that folder. ``shell_roles``: roles
    that keep FLARE's shell commands on this participant (an opt-in: they then
    read any file of its workspace, job logs with data values and exception
    text included, whatever the export policy says).
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
    hardened = {role: _role_rights(role, rights, shell_roles) for role, rights in permissions.items()}
    if hardened != permissions:
        shell = f"shell commands only for {', '.join(shell_roles)}" if shell_roles else "no shell commands"
        changes.append(
            f"authorization: byoc, download_job = none for every role; {shell}; job submission only for "
            f"{OPERATOR_ROLE}; lead keeps {', '.join(LEAD_KEEPS)}; app_command for {', '.join(APP_COMMAND_ROLES)}"
        )
    authorization["permissions"] = hardened
    (local / "authorization.json").write_text(json.dumps(authorization, indent=2))
    changes += _owner_only(Path(kit), "kit folder (FLARE writes its logs and job folders there)")
    return changes


def _owner_only(folder: Path, what: str) -> list[str]:
    """Make ``folder`` readable by its owner alone (what is in it: logs, job workspaces, job stores)."""
    mode = folder.stat().st_mode & 0o777
    if not mode & 0o077:
        return []
    folder.chmod(mode & 0o700)
    return [f"{what}: readable by its owner only (was {mode:o})"]


def _private_storage(resources: dict[str, Any], root: Path) -> list[str]:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    changes = _owner_only(root, f"storage root {root}")
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
        granted = {right: rights for right in RIGHTS} if isinstance(rights, str) else rights
        if granted.get("byoc", "none") != "none":
            problems.append(f"role {role!r} may submit jobs with code (byoc={granted['byoc']!r})")
        if granted.get("shell_commands", "none") != "none":
            problems.append(f"role {role!r} may run shell commands (ls, cat, grep) on this participant")
        if role != OPERATOR_ROLE and granted.get("submit_job", "none") != "none":
            problems.append(f"role {role!r} may submit jobs (only {OPERATOR_ROLE} should)")
    return problems
