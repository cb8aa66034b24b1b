"""Aux message handlers that know who really sent each message, as FLARE authenticated it.

FLARE's own aux handlers get the sender's *peer context*, which the sender's
process writes itself: code running in a site's job process (an operation the
site installed, a compromised library) can put any site's name there. What a
sender cannot choose is the cell message's ``ORIGIN``: the FLARE server's parent
process checks every message from a site against the site's mTLS-registered
token and refuses one whose origin is not that site's cell or one of its
children (``nvflare.private.fed.authenticator.validate_auth_headers``), and a
job process has no listener of its own, so every message reaches it through
that check. So the mesh registers its site-facing topics directly on the job's
cell, for exactly those topics (FLARE's generic aux handler keeps every other
topic), and hands each handler the origin.

Example (in a job process)::

    register(engine, "dfm.hello", lambda origin, request: reply_for(origin, request))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from nvflare.apis.shareable import Shareable

from dfm_prefect.core.errors import FederationError

Handler = Callable[[str, Any], Shareable]
"""``(origin FQCN, request payload) -> reply``; the payload is whatever the sender sent (validate it)."""


def register(engine: Any, topic: str, handler: Handler) -> None:
    """Route aux messages on ``topic`` to ``handler`` with the sender's authenticated origin.

    Raises `FederationError` if the job process has no cell yet (the mesh job
    would otherwise run without knowing who sends what).
    """
    from nvflare.fuel.f3.cellnet.defs import MessageHeaderKey
    from nvflare.fuel.f3.cellnet.defs import ReturnCode as CellReturnCode
    from nvflare.fuel.f3.cellnet.utils import new_cell_message
    from nvflare.private.defs import CellChannel

    cell = engine.get_cell()
    if cell is None:
        raise FederationError(f"the FLARE job process has no cell: cannot authenticate {topic} messages")

    def on_request(request: Any) -> Any:
        origin = str(request.get_header(MessageHeaderKey.ORIGIN) or "")
        message = new_cell_message({}, handler(origin, request.payload))
        message.set_header(MessageHeaderKey.RETURN_CODE, CellReturnCode.OK)
        return message

    # Keyword arguments: FLARE's Cell picks the streaming-aware registration from the channel keyword.
    cell.register_request_cb(channel=CellChannel.AUX_COMMUNICATION, topic=topic, cb=on_request)


def participant_of(origin: str, participants: Iterable[tuple[str, str]]) -> str | None:
    """The participant (name, FQCN) whose cell is ``origin`` or an ancestor of it; None if none is.

    Example: ``participant_of("north.job-1", [("north", "north")]) == "north"``.
    """
    for name, fqcn in participants:
        if origin == fqcn or origin.startswith(fqcn + "."):
            return name
    return None
