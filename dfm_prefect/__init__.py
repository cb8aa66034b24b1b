"""dfm-prefect: a data federation mesh with Prefect as its front end.

Operations run at the sites that hold the data; flows are ordinary Prefect flows
whose task runner is :class:`FederationTaskRunner`. Importing this package does
not import Prefect (sites load it without Prefect); the runner is imported on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dfm_prefect.core.errors import FederationError
from dfm_prefect.core.operations import DataInput, OperationParams, operation
from dfm_prefect.core.refs import DataRef

if TYPE_CHECKING:
    from dfm_prefect.client import FederationClient, get_client
    from dfm_prefect.declared import site_operation
    from dfm_prefect.task_runner import FederationTaskRunner

__version__ = "0.1.0"
__all__ = [
    "DataInput",
    "DataRef",
    "FederationClient",
    "FederationError",
    "FederationTaskRunner",
    "OperationParams",
    "get_client",
    "operation",
    "site_operation",
]

_LAZY = {
    "FederationTaskRunner": "dfm_prefect.task_runner",
    "FederationClient": "dfm_prefect.client",
    "get_client": "dfm_prefect.client",
    "site_operation": "dfm_prefect.declared",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dfm_prefect' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
