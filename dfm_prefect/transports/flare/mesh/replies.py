"""Site side: batch replies per client into frames and send them as acknowledged chunks.

Independent of FLARE (the executor passes the function that sends one chunk
with a site -> server aux message), so it is tested on its own.

Replies for one client queue up in a bounded
:class:`~dfm_prefect.core.backpressure.ReplyBuffer` while the previous frame is
being sent, then go out as one `ReplyEnvelope` frame. The buffer never blocks
(one intake thread reads every client's frames): a client whose replies do not
fit gets lighter ones, and one that leaves more than twice the bound unread is
given up on (``on_overflow``: the executor cancels its work). Frames are sent; a frame is capped at
``frame_bytes`` and cut into chunks of ``chunk_bytes``, each sent and
acknowledged before the next, so no single message is large and the
controller's buffer is the only place a frame waits. A chunk that could not be
sent or found the buffer full is resent with backoff until it is accepted or
the sender stops; one the controller refuses for good (``retry=False``: this
site may not answer that client any more) is given up with the rest of its frame.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from dfm_prefect.core.backpressure import DEFAULT_MAX_BYTES, ReplyBuffer
from dfm_prefect.core.wire import ReplyEnvelope, SiteMessage
from dfm_prefect.transports.flare.chunks import split
from dfm_prefect.transports.flare.protocol import ReplyAck, ReplyChunk

log = logging.getLogger("dfm_prefect.site.flare")

SendChunk = Callable[[ReplyChunk], "ReplyAck | None"]


@dataclass
class ReplyCounters:
    frames: int = 0
    chunks: int = 0
    bytes: int = 0
    resends: int = 0
    refused: int = 0


class ReplySender:
    """Sends a site's replies to the controller, one batching writer per client."""

    def __init__(
        self,
        site: str,
        incarnation: str,
        send: SendChunk,
        *,
        stop: threading.Event,
        chunk_bytes: int = 1 << 20,
        frame_bytes: int = 1 << 20,
        max_backoff: float = 2.0,
        linger: float = 0.0,
        max_buffer_bytes: int = DEFAULT_MAX_BYTES,
        on_overflow: Callable[[str, str], None] | None = None,
    ) -> None:
        self.site = site
        self.incarnation = incarnation
        self.chunk_bytes = chunk_bytes
        self.frame_bytes = frame_bytes
        self.max_backoff = max_backoff
        self.linger = linger
        self.counters = ReplyCounters()
        self._send = send
        self._stop = stop
        self._lock = threading.Lock()
        self.max_buffer_bytes = max_buffer_bytes
        self._on_overflow = on_overflow
        self._writers: dict[str, ReplyBuffer] = {}

    def reply_for(self, peer: str) -> Callable[[SiteMessage], None]:
        """The ``reply`` callback to hand `SiteWorker.handle_frame` for frames from ``peer``."""
        with self._lock:
            writer = self._writers.get(peer)
            if writer is None:
                writer = ReplyBuffer(
                    lambda batch: self._send_batch(peer, batch),
                    name=f"dfm-reply-{peer[:8]}",
                    on_overflow=lambda reason: self._overflowed(peer, reason),
                    max_bytes=self.max_buffer_bytes,
                    linger=self.linger,
                )
                self._writers[peer] = writer
            return writer.put

    def _overflowed(self, peer: str, reason: str) -> None:
        log.warning("site %s gave up on client %s: %s", self.site, peer, reason)
        if self._on_overflow is not None:
            self._on_overflow(peer, reason)
        self.close_peer(peer)

    @property
    def peers(self) -> list[str]:
        """The clients this site has answered (or is answering)."""
        with self._lock:
            return list(self._writers)

    def close_peer(self, peer: str) -> None:
        with self._lock:
            writer = self._writers.pop(peer, None)
        if writer is not None:
            writer.close(timeout=0)

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            writers, self._writers = list(self._writers.values()), {}
        for writer in writers:
            writer.close(timeout)

    # ------------------------------------------------------------- plumbing

    def _send_batch(self, peer: str, batch: list[SiteMessage]) -> None:
        for frame in self.frames(batch):
            frame_id = uuid.uuid4().hex
            parts = split(frame, self.chunk_bytes)
            for index, part in enumerate(parts):
                chunk = ReplyChunk(
                    site=self.site,
                    incarnation=self.incarnation,
                    peer=peer,
                    frame=frame_id,
                    index=index,
                    count=len(parts),
                    data=part,
                )
                if not self._send_until_accepted(chunk):
                    return
                with self._lock:
                    self.counters.chunks += 1
                    self.counters.bytes += len(part)
            with self._lock:
                self.counters.frames += 1

    def frames(self, batch: list[SiteMessage]) -> list[str]:
        """The batch as ReplyEnvelope JSON frames of at most ``frame_bytes`` (a bigger single message is alone)."""
        frames: list[str] = []
        group: list[SiteMessage] = []
        size = 0
        for message in batch:
            length = len(message.model_dump_json())
            if group and size + length > self.frame_bytes:
                frames.append(ReplyEnvelope(messages=group).model_dump_json())
                group, size = [], 0
            group.append(message)
            size += length
        if group:
            frames.append(ReplyEnvelope(messages=group).model_dump_json())
        return frames

    def _send_until_accepted(self, chunk: ReplyChunk) -> bool:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                ack = self._send(chunk)
            except Exception as exc:  # a transport error must not lose the reply; retry below
                log.warning("reply chunk for %s not sent: %s", chunk.peer, exc)
                ack = None
            if ack is not None and ack.accepted:
                return True
            if ack is not None and not ack.retry:
                log.warning("reply chunk for %s refused for good: %s", chunk.peer, ack.reason)
                with self._lock:
                    self.counters.refused += 1
                return False
            with self._lock:
                self.counters.resends += 1
            log.info("reply chunk for %s refused (%s); resending in %.2fs", chunk.peer, ack.reason if ack else "no answer", backoff)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)
        return False
