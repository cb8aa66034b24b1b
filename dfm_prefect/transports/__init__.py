"""Transports move wire frames between the client core and sites.

A transport is found by name through the ``dfm_prefect.transports`` entry-point
group, so new ones plug in without touching the core: the entry point names the
transport's package, whose ``transport_class()`` returns its client-side
:class:`~dfm_prefect.transports.base.Transport` class (which declares its
federation spec model as ``Spec``) and ``launcher_class()`` its
:class:`~dfm_prefect.transports.base.Launcher`.

Example (``pyproject.toml`` of a package that adds a transport)::

    [project.entry-points."dfm_prefect.transports"]
    grpc = "my_package.transports.grpc"
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.transports.base import Launcher, Transport

ENTRY_POINT_GROUP = "dfm_prefect.transports"

__all__ = ["ENTRY_POINT_GROUP", "Launcher", "Transport", "launcher_class", "transport_class", "transport_names"]


def _entry(name: str) -> EntryPoint:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        raise ConfigError(f"unknown transport {name!r}; installed transports: {sorted(found)}")
    return found[name]


def transport_class(name: str) -> type[Transport]:
    """The client side of the transport registered under ``name``."""
    cls: Any = _entry(name).load().transport_class()
    return cls


def launcher_class(name: str) -> type[Launcher]:
    """What starts a federation of the transport registered under ``name`` on this machine."""
    cls: Any = _entry(name).load().launcher_class()
    return cls


def transport_names() -> list[str]:
    """The names of the installed transports."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
