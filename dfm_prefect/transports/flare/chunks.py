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

from collections.abc import Callable, Hashable

from dfm_prefect.core.errors import MalformedRequestError


def split(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``size`` characters (one empty piece for an empty text)."""
    if size <= 0:
        raise ValueError("chunk size must be positive")
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class Reassembler:
    """Joins the pieces of frames; frames may interleave and a frame's pieces may arrive in any order.

    A site sends several pieces of one frame at once (see
    :class:`~dfm_prefect.transports.flare.mesh.replies.ReplySender`), so they can
    overtake each other; a piece that arrives twice (resent after a lost
    acknowledgement) is kept once.
    """

    def __init__(self, max_pending_bytes: int = 1 << 30) -> None:
        self.max_pending_bytes = max_pending_bytes
        self._parts: dict[Hashable, tuple[int, dict[int, str]]] = {}
        self._bytes = 0

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def add(self, key: Hashable, index: int, count: int, data: str) -> str | None:
        """Add one piece; return the whole frame when this completed it."""
        if count == 1 and index == 0:
            return data
        expected, parts = self._parts.get(key, (count, {}))
        if count != expected or not 0 <= index < count:
            self._forget(key)
            raise MalformedRequestError(f"frame {key!r}: piece {index} of {count} does not belong to a frame of {expected} pieces")
        if index in parts:
            return None  # a resent piece
        if self._bytes + len(data) > self.max_pending_bytes:
            raise MalformedRequestError(
                f"frame {key!r}: more than {self.max_pending_bytes} bytes of unfinished frames are buffered"
            )
        parts[index] = data
        self._parts[key] = (count, parts)
        self._bytes += len(data)
        if len(parts) < count:
            return None
        self._forget(key)
        return "".join(parts[i] for i in range(count))

    def _forget(self, key: Hashable) -> None:
        _, parts = self._parts.pop(key, (0, {}))
        self._bytes -= sum(len(p) for p in parts.values())

    def drop(self, predicate: Callable[[Hashable], bool] | None = None) -> None:
        """Forget unfinished frames (all, or those whose key satisfies ``predicate``)."""
        for key in [k for k in self._parts if predicate is None or predicate(k)]:
            self._forget(key)
