"""Packing mesh messages into FLARE Shareables and sending aux requests.

A Shareable carries one message as a plain dict under :data:`KEY`; the
receiver validates it with the message's pydantic model. Nothing else is read
from a Shareable.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable, make_reply
from pydantic import BaseModel, ValidationError

from dfm_prefect.transports.flare.protocol import KEY

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("dfm_prefect.transports.flare.aux")


def pack(message: BaseModel) -> Shareable:
    shareable = Shareable()
    shareable[KEY] = message.model_dump(mode="json")
    return shareable


def reply(message: BaseModel) -> Shareable:
    """An OK reply Shareable carrying ``message``."""
    shareable = make_reply(ReturnCode.OK)
    shareable[KEY] = message.model_dump(mode="json")
    return shareable


def bad_request(reason: str) -> Shareable:
    shareable = make_reply(ReturnCode.BAD_REQUEST_DATA)
    shareable[KEY] = {"error": reason[:2000]}
    return shareable


def unpack(shareable: Any, model: type[M]) -> M:
    """The message in a Shareable; raises `ValidationError` if it is not a valid ``model``."""
    data = shareable.get(KEY) if isinstance(shareable, Shareable) else None
    return model.model_validate(data)


def send(engine: Any, targets: list[str] | None, topic: str, message: BaseModel, timeout: float, model: type[M]) -> dict[str, M | str]:
    """Send an aux request and wait for the replies: target -> reply message, or why there is none.

    ``targets=None`` from a site job means the server job (its reply is keyed ``"server"`` here).
    """
    with engine.new_context() as fl_ctx:
        replies = engine.send_aux_request(targets=targets, topic=topic, request=pack(message), timeout=timeout, fl_ctx=fl_ctx)
    replies = dict(replies or {})
    if targets is None:
        replies = {"server": next(iter(replies.values()))} if replies else {}
    return {target: _read(replies.get(target), model) for target in targets or ["server"]}


def _read(answer: Any, model: type[M]) -> M | str:
    if answer is None:
        return "no reply (unreachable or timed out)"
    code = answer.get_return_code()
    if code != ReturnCode.OK:
        return f"return code {code}"
    try:
        return unpack(answer, model)
    except ValidationError as exc:
        return f"unreadable reply: {exc.errors()[0]['msg']}"
