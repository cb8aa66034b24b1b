"""The mesh job's server side: a FLARE Controller that routes frames between clients and sites.

Configured only by the job's JSON (no code travels with the job)::

    {"workflows": [{"id": "dfm_mesh",
                    "path": "dfm_prefect.transports.flare.mesh.controller.MeshController",
                    "args": {"site_timeout": 4.0}}]}

Outside clients reach it with admin app commands (JSON only):
``dfm.exchange`` (send frames, acknowledge and long-poll replies, learn site
states) and ``dfm.status``. Frames go to sites with server -> site aux messages
from one dispatcher thread per site; replies, hellos and heartbeats come back
as site -> server aux messages, each handed to the router with the site FLARE
authenticated as its sender (:mod:`~dfm_prefect.transports.flare.mesh.senders`). FLARE's task channel carries only one
never-ending task that keeps the site job processes alive. All routing logic
lives in :class:`~dfm_prefect.transports.flare.mesh.router.Router`; this class is the FLARE
shell around it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import Task
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from pydantic import BaseModel, ValidationError

from dfm_prefect.transports.flare.mesh import aux, senders
from dfm_prefect.transports.flare.mesh.mailbox import Mailboxes
from dfm_prefect.transports.flare.mesh.router import Router
from dfm_prefect.transports.flare.protocol import (
    CMD_EXCHANGE,
    CMD_STATUS,
    STAY_TASK,
    TOPIC_DISPATCH,
    TOPIC_HEARTBEAT,
    TOPIC_HELLO,
    TOPIC_PEER,
    TOPIC_REPLY,
    CommandError,
    DispatchAck,
    ExchangeRequest,
    Heartbeat,
    HeartbeatAck,
    Hello,
    ReplyChunk,
    SiteFrame,
    StatusRequest,
)

log = logging.getLogger("dfm_prefect.transports.flare.controller")


class MeshController(Controller):
    """Routes client frames to site executors and their replies back.

    Args:
        site_timeout: a site not heard from for this long is dead.
        dispatch_timeout: how long a site may take to acknowledge a dispatch.
        liveness_interval: how often heartbeats are checked.
        max_buffer_bytes: reply bytes buffered for all clients before sites are told to wait.
        max_site_buffer_bytes: reply bytes one site may have buffered (over all clients).
        max_client_buffer_bytes: reply bytes one client's mailbox may hold.
        max_dispatch_frames: most frames in one dispatch message.
        client_timeout: a client that waits for answers and has not exchanged for this
            long is gone: its work at the sites is cancelled (see `Mailboxes`).
        idle_expiry: the mailbox of a client that waits for nothing is dropped after this long
            without an exchange (it gets a fresh one when it comes back).
    """

    def __init__(
        self,
        site_timeout: float = 3.0,
        dispatch_timeout: float = 10.0,
        liveness_interval: float = 0.5,
        max_buffer_bytes: int = 256 << 20,
        max_site_buffer_bytes: int = 64 << 20,
        max_client_buffer_bytes: int = 64 << 20,
        max_dispatch_frames: int = 500,
        client_timeout: float = 10.0,
        idle_expiry: float = 600.0,
    ) -> None:
        super().__init__()
        self.idle_expiry = idle_expiry
        self.max_site_buffer_bytes = max_site_buffer_bytes
        self.max_client_buffer_bytes = max_client_buffer_bytes
        self.client_timeout = client_timeout
        self.site_timeout = site_timeout
        self.dispatch_timeout = dispatch_timeout
        self.liveness_interval = liveness_interval
        self.max_buffer_bytes = max_buffer_bytes
        self.max_dispatch_frames = max_dispatch_frames
        self.router: Router | None = None
        self._cells: list[tuple[str, str]] = []
        self._engine: Any = None
        self._stop = threading.Event()
        self._dispatchers: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------- controller

    def start_controller(self, fl_ctx: FLContext) -> None:
        self._engine = fl_ctx.get_engine()
        clients = self._engine.get_clients()
        # Each site's FLARE cell: messages from it, or from its job process beneath it, are that site's.
        self._cells = [(client.name, client.get_fqcn() or client.name) for client in clients]
        mailboxes = Mailboxes(
            max_bytes=self.max_buffer_bytes,
            max_site_bytes=self.max_site_buffer_bytes,
            max_client_bytes=self.max_client_buffer_bytes,
            client_timeout=self.client_timeout,
            idle_expiry=self.idle_expiry,
        )
        self.router = Router(
            [client.name for client in clients],
            site_timeout=self.site_timeout,
            mailboxes=mailboxes,
            max_dispatch_frames=self.max_dispatch_frames,
        )
        engine = self._engine
        senders.register(engine, TOPIC_HELLO, self._on_hello)
        senders.register(engine, TOPIC_HEARTBEAT, self._on_heartbeat)
        senders.register(engine, TOPIC_REPLY, self._on_reply)
        senders.register(engine, TOPIC_PEER, self._on_site_frame)
        engine.register_app_command(CMD_EXCHANGE, self._cmd_exchange)
        engine.register_app_command(CMD_STATUS, self._cmd_status)
        for site in self.router.sites:
            self._start_dispatcher(site)
        log.info("mesh controller started for sites %s", self.router.sites)

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        # The task channel only keeps site job processes alive; broadcast_forever
        # also hands the task to site job processes that start later.
        self.broadcast_forever(task=Task(name=STAY_TASK, data=Shareable(), timeout=0), fl_ctx=fl_ctx)
        assert self.router is not None
        # Heartbeat timeouts need a clock: check them every liveness_interval.
        while not abort_signal.triggered and not self._stop.wait(self.liveness_interval):
            for site in self.router.check_liveness():
                log.warning("site %s is dead: no heartbeat within %.1fs", site, self.site_timeout)
            for client, reason in self.router.expire_clients():
                log.warning("client %s is gone (%s); its work at the sites is cancelled", client, reason)

    def stop_controller(self, fl_ctx: FLContext) -> None:
        self._stop.set()
        if self.router is not None:
            self.router.stop("the mesh job is stopping")

    def process_result_of_unknown_task(
        self, client: Client, task_name: str, client_task_id: str, result: Shareable, fl_ctx: FLContext
    ) -> None:
        """Nothing to do: the only task never completes."""

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.CLIENT_DISCONNECTED and self.router is not None:
            name = fl_ctx.get_prop(FLContextKey.DISCONNECTED_CLIENT_NAME)
            if name and self.router.mark_dead(name, "FLARE reports the client disconnected"):
                log.warning("site %s is dead: FLARE reports it disconnected", name)

    # ------------------------------------------------------------ dispatch

    def _start_dispatcher(self, site: str) -> None:
        with self._lock:
            if site in self._dispatchers:
                return
            thread = threading.Thread(target=self._dispatch_loop, args=(site,), name=f"dfm-dispatch-{site}", daemon=True)
            self._dispatchers[site] = thread
        thread.start()

    def _dispatch_loop(self, site: str) -> None:
        router = self.router
        assert router is not None
        while True:
            batch = router.next_batch(site, self._stop)
            if batch is None:
                return
            answer = aux.send(self._engine, [site], TOPIC_DISPATCH, batch, self.dispatch_timeout, DispatchAck).get(site)
            if isinstance(answer, DispatchAck) and answer.error is None:
                continue
            reason = answer.error if isinstance(answer, DispatchAck) else answer
            log.warning("dispatch of %d frames to %s failed: %s", len(batch.frames), site, reason)
            router.dispatch_failed(site, str(reason))

    # ------------------------------------------------------ aux handlers

    def _site(self, origin: str) -> str | None:
        return senders.participant_of(origin, self._cells)

    def _on_hello(self, origin: str, request: Any) -> Shareable:
        try:
            hello = aux.unpack(request, Hello)
        except ValidationError as exc:
            return aux.bad_request(f"not a hello: {exc.errors()[0]['msg']}")
        assert self.router is not None
        refused = self.router.hello(hello, self._site(origin))
        if refused is not None:
            log.warning("refused a hello naming site %s from %s: %s", hello.site, origin, refused)
            return aux.bad_request(f"hello refused: {refused}")
        if hello.error:
            log.error("site %s could not start: %s", hello.site, hello.error)
        else:
            log.info("site %s is ready (pid %s, incarnation %s)", hello.site, hello.pid, hello.incarnation)
        return aux.reply(HeartbeatAck(known=True))

    def _on_heartbeat(self, origin: str, request: Any) -> Shareable:
        try:
            beat = aux.unpack(request, Heartbeat)
        except ValidationError as exc:
            return aux.bad_request(f"not a heartbeat: {exc.errors()[0]['msg']}")
        assert self.router is not None
        known = self.router.heartbeat(beat, self._site(origin))
        if isinstance(known, str):
            log.warning("refused a heartbeat naming site %s from %s: %s", beat.site, origin, known)
            return aux.bad_request(f"heartbeat refused: {known}")
        return aux.reply(HeartbeatAck(known=known, dead_sites=self.router.dead_sites()))

    def _on_site_frame(self, origin: str, request: Any) -> Shareable:
        try:
            frame = aux.unpack(request, SiteFrame)
        except ValidationError as exc:
            return aux.bad_request(f"not a site frame: {exc.errors()[0]['msg']}")
        assert self.router is not None
        ack = self.router.site_frame(frame, self._site(origin))
        if not ack.accepted:
            log.info("refused a frame from %s (naming site %s) for %s: %s", origin, frame.site, frame.target, ack.reason)
        return aux.reply(ack)

    def _on_reply(self, origin: str, request: Any) -> Shareable:
        try:
            chunk = aux.unpack(request, ReplyChunk)
        except ValidationError as exc:
            return aux.bad_request(f"not a reply chunk: {exc.errors()[0]['msg']}")
        assert self.router is not None
        ack = self.router.reply(chunk, self._site(origin))
        if not ack.retry:
            log.debug("refused a reply chunk naming site %s from %s: %s", chunk.site, origin, ack.reason)
        return aux.reply(ack)

    # ------------------------------------------------------- app commands

    def _cmd_exchange(self, topic: str, data: Any, fl_ctx: FLContext) -> dict[str, Any]:
        assert self.router is not None
        return _answer(lambda: self.router.exchange(ExchangeRequest.model_validate(data or {})))  # type: ignore[union-attr]

    def _cmd_status(self, topic: str, data: Any, fl_ctx: FLContext) -> dict[str, Any]:
        assert self.router is not None
        return _answer(lambda: self.router.status(StatusRequest.model_validate(data or {})))  # type: ignore[union-attr]


def _answer(run: Any) -> dict[str, Any]:
    try:
        result: BaseModel = run()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:10])
        result = CommandError(error=f"the command does not follow the mesh protocol: {problems}")
    return result.model_dump(mode="json")
