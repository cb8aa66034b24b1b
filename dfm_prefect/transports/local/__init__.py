"""The local transport: each site an OS process on this machine, reached over loopback TCP.

``client`` is the client side, ``server`` the site endpoint, ``launcher`` starts
and stops the site processes, ``protocol`` holds what both ends agree on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dfm_prefect.transports.base import Launcher, Transport


def transport_class() -> type[Transport]:
    """The client side (imported on first use: sites and servers never need it)."""
    from dfm_prefect.transports.local.client import LocalTransport

    return LocalTransport


def launcher_class() -> type[Launcher]:
    """What starts a federation of this transport on this machine."""
    from dfm_prefect.transports.local.launcher import LocalFederation

    return LocalFederation
