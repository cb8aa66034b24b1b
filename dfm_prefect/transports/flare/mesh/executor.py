"""The mesh job's site side: a FLARE Executor that serves one `SiteWorker` over aux messages.

Configured only by the job's JSON (no code travels with the job)::

    {"executors": [{"tasks": ["dfm_stay"],
                    "executor": {"path": "dfm_prefect.transports.flare.mesh.executor.MeshExecutor",
                                 "args": {"heartbeat_interval": 0.5}}}]}

What the site serves comes from the site itself, never from the job: the
FLARE client is started with ``DFM_SITE_CONFIG`` naming the site's YAML, and
the config's ``name`` must equal the site's FLARE identity (its mTLS
certificate), so a site cannot be made to serve under another name.

Life cycle: on START_RUN the executor registers its aux handler and starts a
thread that builds the worker and says hello to the controller (retried until
acknowledged: explicit readiness), then sends heartbeats with the site's load.
Each ``dfm.dispatch`` aux message is taken only from the FLARE server (another
site cannot send this site frames or cancel its clients' work: FLARE
authenticates the sender, see :mod:`~dfm_prefect.transports.flare.mesh.senders`)
and is acknowledged at once; its frames go to an
intake thread that hands them to `SiteWorker.handle_frame`. Replies go back
through a :class:`~dfm_prefect.transports.flare.mesh.replies.ReplySender`.

Work is cancelled when nobody can receive its answer any more: a client's when
the controller says it left or is gone (``closed_peers``), and all of it when
the controller answers a heartbeat with "unknown" (it declared this site dead,
so every client has failed its requests here), when no heartbeat has been
answered for ``orphan_timeout`` seconds (the server or its job is gone), and
when the job ends.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from pydantic import ValidationError

from dfm_prefect.core.errors import FederationError, MalformedRequestError, SiteUnavailableError
from dfm_prefect.core.wire import ClientMessage, Envelope, ReplyEnvelope
from dfm_prefect.transports.flare.chunks import Reassembler
from dfm_prefect.transports.flare.mesh import aux, senders
from dfm_prefect.transports.flare.mesh.replies import ReplySender
from dfm_prefect.transports.flare.protocol import (
    SITE_CONFIG_ENV,
    STAY_TASK,
    TOPIC_DISPATCH,
    TOPIC_HEARTBEAT,
    TOPIC_HELLO,
    TOPIC_PEER,
    TOPIC_REPLY,
    DispatchAck,
    DispatchBatch,
    Heartbeat,
    HeartbeatAck,
    Hello,
    ReplyAck,
    ReplyChunk,
    SiteFrame,
    SiteFrameAck,
)

log = logging.getLogger("dfm_prefect.site.flare")
SERVER_CELL = ("server", "server")
PEER_ANSWER_BYTES = 64 << 20
"""Unfinished answers one other site may have buffered here (a move asks for at most four 4 MiB pieces at once)."""
"""The FLARE server's cell (FLARE's FQCN.ROOT_SERVER): dispatches come only from it or its job process."""


class MeshExecutor(Executor):
    """Serves the site's operations to the mesh controller.

    Args:
        heartbeat_interval: seconds between heartbeats (the controller's
            ``site_timeout`` must be several of these).
        aux_timeout: how long one site -> server aux message may take.
        chunk_bytes: largest piece of a reply frame in one aux message.
        frame_bytes: replies are batched into frames up to this size.
        reply_linger: how long a reply waits for others to share its aux
            message (each aux message costs the FLARE server CPU; 2 ms cut their
            number by about a third in the 200-task benchmark).
        orphan_timeout: after this long without an answered heartbeat the
            controller is taken to be gone and the site cancels all its work.
    """

    def __init__(
        self,
        heartbeat_interval: float = 0.5,
        aux_timeout: float = 10.0,
        chunk_bytes: int = 1 << 20,
        frame_bytes: int = 1 << 20,
        reply_linger: float = 0.002,
        orphan_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self.orphan_timeout = orphan_timeout
        self.reply_linger = reply_linger
        self.heartbeat_interval = heartbeat_interval
        self.aux_timeout = aux_timeout
        self.chunk_bytes = chunk_bytes
        self.frame_bytes = frame_bytes
        self.incarnation = uuid.uuid4().hex[:16]
        self.refused_dispatches = 0
        self.site = ""
        self.worker: Any = None
        self.sender: ReplySender | None = None
        self._engine: Any = None
        self._stop = threading.Event()
        self._intake: queue.SimpleQueue[DispatchBatch | None] = queue.SimpleQueue()
        self.peers: Any = None
        self._answers: dict[str, Reassembler] = {}
        """Other sites' answers being put back together, one buffer per answering site (so one cannot starve the rest)."""
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ life cycle

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._start(fl_ctx)
        elif event_type in (EventType.ABOUT_TO_END_RUN, EventType.END_RUN):
            self._shutdown()

    def _start(self, fl_ctx: FLContext) -> None:
        self._engine = fl_ctx.get_engine()
        self.site = fl_ctx.get_identity_name()
        senders.register(self._engine, TOPIC_DISPATCH, self._on_dispatch)
        for target, name in ((self._life, "dfm-site-life"), (self._take_frames, "dfm-site-intake")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _shutdown(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._intake.put(None)
        self._cancel_all("the mesh job is ending")
        if self.sender is not None:
            self.sender.close(timeout=1.0)
        if self.worker is not None:
            # Cancels queued work; running operations finish in their own threads.
            threading.Thread(target=self.worker.close, name="dfm-site-close", daemon=True).start()

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """The keep-alive task: hold the job process open until the job ends (all work arrives by aux)."""
        if task_name != STAY_TASK:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        # FLARE's Signal has no wait(); checking it twice a second is the only way to see an abort.
        while not abort_signal.triggered and not self._stop.wait(0.5):
            pass
        return make_reply(ReturnCode.OK)

    # ------------------------------------------------------- build + hello

    def _build_worker(self) -> str | None:
        """Build the site's worker from its own config; the error text if that fails."""
        from site_workers.config import load_site_config
        from site_workers.worker import SiteWorker

        path = os.environ.get(SITE_CONFIG_ENV)
        if not path:
            return f"{SITE_CONFIG_ENV} is not set for this FLARE client; start it with the site's YAML (docs/flare.md)"
        from site_workers.peers import Peers

        try:
            config = load_site_config(path)
            if config.name != self.site:
                return f"{path} configures site {config.name!r} but this FLARE client is {self.site!r}"
            # Requests are signed by people with certificates from this federation's provisioning.
            root_ca = self._engine.get_workspace().get_file_path_in_startup("rootCA.pem") if self._engine else None
            # Other sites are reached through the controller, which tells them who sent each frame.
            self.peers = Peers(self.site, self._send_to_site)
            self.worker = SiteWorker(config, root_ca=root_ca, peers=self.peers)
        except FederationError as exc:
            return str(exc)
        except Exception as exc:  # report any start failure to the controller instead of dying silently
            log.exception("site %s could not start", self.site)
            return f"{type(exc).__name__}: {exc}"
        self.sender = ReplySender(
            self.site,
            self.incarnation,
            self._send_chunk,
            stop=self._stop,
            chunk_bytes=self.chunk_bytes,
            frame_bytes=self.frame_bytes,
            linger=self.reply_linger,
            max_buffer_bytes=self.worker.config.limits.reply_buffer_bytes,
            on_overflow=self._drop_peer,
        )
        return None

    def _drop_peer(self, peer: str, reason: str) -> None:
        """A client left more replies unread than the site holds: its work is cancelled, its replies dropped."""
        if self.worker is not None:
            cancelled = self.worker.cancel_peer(peer)
            log.warning("site %s dropped client %s (%s); cancelled %d of its requests", self.site, peer, reason, cancelled)

    def _life(self) -> None:
        error = self._build_worker()
        hello = Hello(
            site=self.site,
            incarnation=self.incarnation,
            pid=os.getpid(),
            capacity=self.worker.config.limits.concurrency if self.worker else 0,
            error=error,
        )
        announced = False
        backoff = 0.05
        heard = time.monotonic()
        while not self._stop.is_set():
            if not announced:
                answer = aux.send(self._engine, None, TOPIC_HELLO, hello, 5.0, HeartbeatAck)
                announced = any(isinstance(a, HeartbeatAck) for a in answer.values())
                if not announced:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                log.info("site %s said hello (incarnation %s)", self.site, self.incarnation)
                backoff = 0.05
                heard = time.monotonic()
            if self.worker is None:
                self._stop.wait(self.heartbeat_interval)
                continue
            beat = Heartbeat(site=self.site, incarnation=self.incarnation, load=self.worker.load())
            answer = aux.send(self._engine, None, TOPIC_HEARTBEAT, beat, 5.0, HeartbeatAck)
            acks = [a for a in answer.values() if isinstance(a, HeartbeatAck)]
            if acks and self.peers is not None:
                for site in acks[0].dead_sites:
                    self.peers.on_lost(site, "the mesh controller declared it dead")
            if acks and not acks[0].known:
                # The controller declared this site dead: its clients have failed what it holds.
                self._cancel_all("the mesh controller had declared this site dead")
                announced = False
                continue
            if acks:
                heard = time.monotonic()
            elif time.monotonic() - heard > self.orphan_timeout:
                self._cancel_all(f"no heartbeat was answered for {time.monotonic() - heard:.0f}s")
                heard = time.monotonic()  # cancel again only after another silence as long
            self._stop.wait(self.heartbeat_interval)

    def _cancel_all(self, reason: str) -> None:
        """Cancel every request the site holds, for every client (nobody will take the answers)."""
        if self.worker is None or self.sender is None:
            return
        cancelled = sum(self.worker.cancel_peer(peer) for peer in self.sender.peers)
        if cancelled:
            log.warning("site %s cancelled %d requests: %s", self.site, cancelled, reason)

    # ---------------------------------------------------------------- frames

    def _on_dispatch(self, origin: str, request: Any) -> Shareable:
        if senders.participant_of(origin, [SERVER_CELL]) is None:
            self.refused_dispatches += 1
            log.warning("site %s refused a dispatch from %s: only the FLARE server dispatches", self.site, origin)
            return aux.bad_request("only the FLARE server's mesh controller dispatches to a site")
        try:
            batch = aux.unpack(request, DispatchBatch)
        except ValidationError as exc:
            return aux.bad_request(f"not a dispatch batch: {exc.errors()[0]['msg']}")
        if self.worker is None or self.sender is None:
            return aux.reply(DispatchAck(accepted=0, error=f"site {self.site} is not serving"))
        self._intake.put(batch)
        return aux.reply(DispatchAck(accepted=len(batch.frames)))

    def _take_frames(self) -> None:
        # One thread keeps each client's frames in order (a cancel never overtakes its run).
        while True:
            batch = self._intake.get()
            if batch is None:
                return
            assert self.worker is not None and self.sender is not None
            # Closed peers first: the controller dropped a leaving client's queued frames,
            # so any frame of it in this batch came after (it returned) and must run.
            for peer in batch.closed_peers:
                cancelled = self.worker.cancel_peer(peer)
                if cancelled:
                    log.info("client %s left; cancelled %d of its requests", peer, cancelled)
                self.sender.close_peer(peer)
            for piece in batch.replies:
                self._answer_piece(piece.site, piece.frame, piece.index, piece.count, piece.data)
            for frame in batch.frames:
                self.worker.handle_frame(frame.data, self.sender.reply_for(frame.peer), frame.peer, from_site=frame.from_site)

    def _answer_piece(self, site: str, frame: str, index: int, count: int, data: str) -> None:
        """A piece of another site's answer to this site's own frame; the whole answer goes to `Peers`.

        Pieces from a site this site waits for nothing from are dropped (with that
        site's unfinished answers), and each answering site has its own bounded buffer.
        """
        if self.peers is None:
            return
        joiner = self._answers.setdefault(site, Reassembler(max_pending_bytes=PEER_ANSWER_BYTES))
        if not self.peers.waiting_for(site):
            joiner.drop()
            return
        try:
            whole = joiner.add(frame, index, count, data)
        except MalformedRequestError as exc:
            joiner.drop()
            log.warning("site %s dropped the answers from %s: %s", self.site, site, exc)
            return
        if whole is None:
            return
        try:
            envelope = ReplyEnvelope.model_validate_json(whole)
        except ValidationError as exc:
            log.warning("site %s got an answer from %s that is not wire v1: %s", self.site, site, exc.errors()[0]["msg"])
            return
        for message in envelope.messages:
            self.peers.on_message(site, message)

    def _send_to_site(self, site: str, messages: list[ClientMessage]) -> None:
        """This site's own frame for another site, through the controller."""
        frame = SiteFrame(
            site=self.site,
            incarnation=self.incarnation,
            target=site,
            id=uuid.uuid4().hex,
            data=Envelope(messages=list(messages)).model_dump_json(),
        )
        answer = aux.send(self._engine, None, TOPIC_PEER, frame, self.aux_timeout, SiteFrameAck)
        ack = next((a for a in answer.values() if isinstance(a, SiteFrameAck)), None)
        if ack is None or not ack.accepted:
            reason = ack.reason if ack is not None else next(iter(answer.values()), "no answer")
            raise SiteUnavailableError(f"the mesh controller did not take a frame for site {site!r}: {reason}", site=site)

    def _send_chunk(self, chunk: ReplyChunk) -> ReplyAck | None:
        answer = aux.send(self._engine, None, TOPIC_REPLY, chunk, self.aux_timeout, ReplyAck)
        return next((a for a in answer.values() if isinstance(a, ReplyAck)), None)
