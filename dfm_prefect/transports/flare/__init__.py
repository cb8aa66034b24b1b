"""The FLARE transport: every side of it in one package.

``client`` (the `Transport`, with ``pump``, ``link`` and ``admin`` for the admin
API), ``protocol`` and ``chunks`` (what every side agrees on), ``mesh`` (the
long-lived mesh job: ``controller``, ``router`` and ``mailbox`` run in the FLARE
server, ``executor`` and ``replies`` at each site) and ``deploy`` (POC, kits,
job folder, participants, supervisor, launcher).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dfm_prefect.transports.base import Launcher, Transport


def transport_class() -> type[Transport]:
    """The client side (imported on first use: sites and servers never need it)."""
    from dfm_prefect.transports.flare.client import FlareTransport

    return FlareTransport


def launcher_class() -> type[Launcher]:
    """What starts a federation of this transport on this machine."""
    from dfm_prefect.transports.flare.deploy.launcher import FlareFederation

    return FlareFederation
