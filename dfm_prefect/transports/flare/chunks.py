"""Cutting frames into bounded chunks and putting them back together.

A reply frame can be large (a fetched chunk of a result, many inline values);
it crosses FLARE as a sequence of acknowledged chunks so that no single
message is huge and buffers stay bounded.

Example:

```python
parts = split("abcdefgh", 3)           # ['abc', 'def', 'gh']
joiner = Reassembler()
for i, part in enumerate(parts):
    whole = joiner.add(("north", "frame-1"), i, len(parts), part)
assert whole == "abcdefgh"
```
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from dfm_prefect.core.errors import MalformedRequestError
from dfm_prefect.transports.flare.protocol import PIECE_OVERHEAD


def split(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``size`` characters (one empty piece for an empty text)."""
    if size <= 0:
        raise ValueError("chunk size must be positive")
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


DONE_REMEMBERED = 4096
"""How many finished frames a `Reassembler` remembers, to ignore their resent pieces."""


class Reassembler:
    """Joins the pieces of frames that arrive in order per frame (frames may interleave).

    A piece sent again because its acknowledgement was lost (the same index with
    the same data, or any piece of a frame finished lately) is ignored: the
    frame is whole once, and the other frames being joined are kept.
    """

    def __init__(self, max_pending_bytes: int = 1 << 30) -> None:
        self.max_pending_bytes = max_pending_bytes
        self._parts: dict[Hashable, list[str]] = {}
        self._bytes = 0
        self._done: OrderedDict[Hashable, None] = OrderedDict()

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def add(self, key: Hashable, index: int, count: int, data: str) -> str | None:
        """Add one piece; return the whole frame when this was its last piece."""
        if key in self._done:
            return None  # resent after the frame was whole
        if count == 1 and index == 0:
            self._finished(key)
            return data
        parts = self._parts.setdefault(key, [])
        if index < len(parts) and parts[index] == data:
            return None  # resent while the frame is being joined
        if index != len(parts) or index >= count:
            self._parts.pop(key, None)
            self._bytes -= sum(len(p) + PIECE_OVERHEAD for p in parts)
            raise MalformedRequestError(f"frame {key!r}: piece {index} of {count} arrived after {len(parts)} pieces")
        if self._bytes + len(data) + PIECE_OVERHEAD > self.max_pending_bytes:
            if not parts:
                del self._parts[key]
            raise MalformedRequestError(
                f"frame {key!r}: more than {self.max_pending_bytes} bytes of unfinished frames are buffered"
            )
        parts.append(data)
        self._bytes += len(data) + PIECE_OVERHEAD
        if len(parts) < count:
            return None
        del self._parts[key]
        self._bytes -= sum(len(p) + PIECE_OVERHEAD for p in parts)
        self._finished(key)
        return "".join(parts)

    def _finished(self, key: Hashable) -> None:
        self._done[key] = None
        if len(self._done) > DONE_REMEMBERED:
            self._done.popitem(last=False)

    def drop(self, predicate: Callable[[Hashable], bool] | None = None) -> None:
        """Forget unfinished frames (all, or those whose key satisfies ``predicate``)."""
        for key in [k for k in self._parts if predicate is None or predicate(k)]:
            self._bytes -= sum(len(p) + PIECE_OVERHEAD for p in self._parts.pop(key))
