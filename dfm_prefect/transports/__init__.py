"""Transports move wire frames between the client core and sites.

A transport is found by name through the ``dfm_prefect.transports`` entry-point
group, so new ones plug in without touching the core. Each transport class
declares the pydantic model of its federation spec as ``Spec``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from dfm_prefect.errors import ConfigError
from dfm_prefect.transports.base import Transport

ENTRY_POINT_GROUP = "dfm_prefect.transports"

__all__ = ["Transport", "transport_class", "ENTRY_POINT_GROUP"]


def transport_class(name: str) -> type[Transport]:
    """The transport registered under ``name``."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        raise ConfigError(f"unknown transport {name!r}; installed transports: {sorted(found)}")
    cls: Any = found[name].load()
    return cls
