"""Batching writers: whatever queued up while the last frame was being sent goes out as one frame."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("dfm_prefect.core.framing")
_STOP = object()


class BatchingWriter(Generic[T]):
    """A thread that drains a queue and hands each batch to ``send``.

    A lone item is sent at once; items that arrive while a send is in progress
    are sent together next, which batches naturally under load. With
    ``linger`` > 0 a batch also waits that long for company after its first
    item (worth it where each send has a high fixed cost, as a FLARE aux message
    does).
    """

    def __init__(self, send: Callable[[list[T]], None], *, name: str, max_batch: int = 1000, linger: float = 0.0) -> None:
        self._send = send
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._linger = linger
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> None:
        self._queue.put(item)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            deadline = time.monotonic() + self._linger
            while len(batch) < self._max_batch:
                try:
                    wait = deadline - time.monotonic()
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            try:
                self._send(batch)  # type: ignore[arg-type]
            except Exception as exc:  # the sender reports its own failures; keep draining
                log.debug("batch of %d not sent: %s", len(batch), exc)
            if stop:
                return

    def close(self, timeout: float | None = 5.0) -> None:
        self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
