"""The transport contract shared by the local and FLARE transports."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel

from dfm_prefect.wire import ClientMessage, SiteMessage

OnMessage = Callable[[str, SiteMessage], None]
"""Called with (site, message) for every message a site sends back."""

OnSiteLost = Callable[[str, str], None]
"""Called with (site, reason) when a site stops answering; its in-flight requests are lost."""


class Transport(ABC):
    """Delivers batches of client messages to sites and site messages back.

    Implementations call ``on_message`` and ``on_site_lost`` from their own threads
    and never block them on the caller.
    """

    Spec: ClassVar[type[BaseModel]]
    """The federation-spec model this transport is configured with."""

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: Any) -> Transport:
        """Build the transport from its validated spec."""

    @abstractmethod
    def open(self, on_message: OnMessage, on_site_lost: OnSiteLost) -> None:
        """Connect; after this, :meth:`send` may be called."""

    @property
    @abstractmethod
    def sites(self) -> list[str]:
        """The names of the sites this transport can reach."""

    @abstractmethod
    def send(self, site: str, messages: Sequence[ClientMessage]) -> None:
        """Send a batch to one site; raise `SiteUnavailableError` if it cannot be delivered."""

    @abstractmethod
    def close(self) -> None:
        """Disconnect and stop every thread the transport started."""

    def site_states(self) -> dict[str, str]:
        """What the transport itself knows about each site (for ``federation status``); empty if nothing."""
        return {}
