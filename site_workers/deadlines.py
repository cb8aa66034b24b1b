"""One thread that calls things back at their deadlines (request timeouts), instead of a timer thread each.

Example:

```python
deadlines = Deadlines("north")
handle = deadlines.add(time.monotonic() + 5.0, lambda: print("late"))
deadlines.discard(handle)   # finished in time: never called
deadlines.close()
```
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("dfm_prefect.site")


_LONGEST_WAIT_S = 3600.0


class Deadlines:
    """Calls each callback once, at (or soon after) its monotonic deadline, unless discarded first."""

    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int]] = []
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._name = f"site-deadlines-{name}"

    def add(self, deadline: float, callback: Callable[[], None]) -> int:
        """Call ``callback`` at ``deadline`` (``time.monotonic()`` clock); returns a handle for :meth:`discard`."""
        with self._cond:
            handle = next(self._ids)
            self._callbacks[handle] = callback
            heapq.heappush(self._heap, (deadline, handle))
            if self._thread is None:  # started on first use: most sites never see a timeout
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return handle

    def discard(self, handle: int) -> None:
        """Forget a deadline (what it guarded finished in time)."""
        with self._cond:
            self._callbacks.pop(handle, None)

    def _due(self) -> list[Callable[[], None]] | None:
        """Wait for the next deadline; the callbacks due now, or None once closed."""
        with self._cond:
            while not self._closed:
                while self._heap and self._heap[0][1] not in self._callbacks:
                    heapq.heappop(self._heap)  # discarded
                now = time.monotonic()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    _, handle = heapq.heappop(self._heap)
                    callback = self._callbacks.pop(handle, None)
                    if callback is not None:
                        due.append(callback)
                if due:
                    return due
                # A far deadline is waited for in steps: Condition.wait refuses waits past TIMEOUT_MAX.
                self._cond.wait(min(self._heap[0][0] - now, _LONGEST_WAIT_S) if self._heap else None)
            return None

    def _loop(self) -> None:
        while (due := self._due()) is not None:
            for callback in due:
                try:
                    callback()
                except Exception:  # one failing callback must not stop the others' deadlines
                    log.exception("a deadline callback failed")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
