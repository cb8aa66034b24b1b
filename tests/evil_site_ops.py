"""A malicious site module: installed at one site (its ``operation_modules``), it forges mesh messages.

What a compromised or careless site administrator can run in the site's own
job process: it takes the FLARE engine of the site's mesh executor and sends
hellos, heartbeats, reply chunks and dispatches the honest executor would
never send: naming another site, for made-up sites or clients, in floods. It
can also write another site's name into the FLARE peer context the messages
carry. The tests in ``test_flare_mesh_trust.py`` call its operations through
the mesh like any client would and check that every forgery fails.
"""

from __future__ import annotations

import gc
import threading
import uuid
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, Field

from dfm_prefect.core.operations import OperationParams, operation
from dfm_prefect.transports.flare.mesh import aux
from dfm_prefect.transports.flare.mesh.executor import MeshExecutor
from dfm_prefect.transports.flare.protocol import (
    TOPIC_DISPATCH,
    TOPIC_HEARTBEAT,
    TOPIC_HELLO,
    TOPIC_REPLY,
    DispatchAck,
    DispatchBatch,
    Heartbeat,
    HeartbeatAck,
    Hello,
    ReplyAck,
    ReplyChunk,
)

TOPICS: dict[str, tuple[str, type[BaseModel], type[BaseModel]]] = {
    "hello": (TOPIC_HELLO, Hello, HeartbeatAck),
    "heartbeat": (TOPIC_HEARTBEAT, Heartbeat, HeartbeatAck),
    "reply": (TOPIC_REPLY, ReplyChunk, ReplyAck),
    "dispatch": (TOPIC_DISPATCH, DispatchBatch, DispatchAck),
}
_forging = threading.Lock()


def _executor() -> MeshExecutor:
    """This site's mesh executor (the attacker finds it in its own process)."""
    for candidate in gc.get_objects():
        if isinstance(candidate, MeshExecutor) and candidate._engine is not None:
            return candidate
    raise RuntimeError("no mesh executor in this process")


class ForgeParams(OperationParams):
    topic: Literal["hello", "heartbeat", "reply", "dispatch"]
    message: dict[str, Any]
    repeat: int = Field(default=1, ge=1, le=2000)
    fill: int = Field(default=0, ge=0, le=4 << 20, description="Reply chunks: this many characters of junk data.")
    made_up: bool = Field(default=False, description="A new made-up site (hello) or client (reply) for every message.")
    claim_identity: str | None = Field(default=None, description="Also write this name into the FLARE peer context.")
    target: str | None = Field(default=None, description="Send to this site instead of the server.")


@operation("evil.forge", version="1", result="value")
def forge(params: ForgeParams, ctx: Any) -> dict[str, int]:
    """Send forged aux messages; return how the receiver answered, counted by answer."""
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.shareable import Shareable

    engine = _executor()._engine
    topic, model, answer_model = TOPICS[params.topic]
    answers: Counter[str] = Counter()
    original = Shareable.set_peer_props

    def forged_props(shareable: Shareable, props: dict[str, Any]) -> None:
        original(shareable, {**(props or {}), ReservedKey.IDENTITY_NAME: params.claim_identity})

    with _forging:
        if params.claim_identity is not None:
            Shareable.set_peer_props = forged_props  # type: ignore[method-assign]
        try:
            for _ in range(params.repeat):
                fields = dict(params.message)
                if params.made_up:
                    fields["site" if params.topic == "hello" else "peer"] = uuid.uuid4().hex
                if params.fill:
                    fields["data"] = "j" * params.fill
                targets = [params.target] if params.target else None
                answer = aux.send(engine, targets, topic, model.model_validate(fields), 10.0, answer_model)
                for value in answer.values():
                    answers[value if isinstance(value, str) else value.model_dump_json(exclude_defaults=True)] += 1
        finally:
            Shareable.set_peer_props = original  # type: ignore[method-assign]
    return dict(answers)


class PeersParams(OperationParams):
    pass


@operation("evil.peers", version="1", result="value")
def peers(params: PeersParams, ctx: Any) -> list[str]:
    """The client ids this site has seen (what any site learns about the clients that use it)."""
    sender = _executor().sender
    return sorted(sender.peers) if sender is not None else []
