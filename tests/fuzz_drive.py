"""Drive thousands of hostile frames through a real site, in batches, and check every answer.

A :class:`Channel` is one hostile client's way into a site: the local
transport's authenticated connection (:class:`LocalChannel`) or an admin session
through the FLARE mesh job (:class:`MeshChannel`). :func:`campaign` sends
batches of frames from a :class:`~tests.fuzz_frames.HostileFrames` stream and,
after each batch, checks that exactly the expected answers came within a
deadline (no hang, nothing lost, nothing extra), that every one is a valid wire
message with a known error code and an id the batch carried, that the site's
process is the one that started (no crash, no restart) and that an honest
request is answered. It stops at ``total`` frames or at its wall-clock cap and
returns a :class:`Tally`; the caller asserts on it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import ValidationError

from dfm_prefect.core.errors import ERROR_CODES
from dfm_prefect.core.wire import CancelRequest, Envelope, ErrorReply, RunResult, SiteMessage
from tests.fuzz_frames import HostileFrames, allowed_ids
from tests.support_sites import RawMeshConnection, RawSiteConnection, run_frame


def decode(frame: bytes | str) -> Envelope | None:
    """The envelope the site's decoder makes of ``frame``, or None if it refuses it."""
    try:
        return Envelope.model_validate_json(frame)
    except ValidationError:
        return None


def expected_answers(frame: bytes | str) -> int:
    """One error for a frame that does not decode; otherwise one answer per message except cancels."""
    envelope = decode(frame)
    if envelope is None:
        return 1
    return sum(not isinstance(message, CancelRequest) for message in envelope.messages)


class Channel(Protocol):
    def view(self, frame: bytes) -> bytes | str:
        """The frame as the site's decoder will see it."""

    def send_many(self, frames: list[bytes]) -> None: ...

    def collect(self, count: int, timeout: float) -> list[SiteMessage]:
        """The next ``count`` answers (valid wire messages), or raise after ``timeout`` seconds."""


class LocalChannel:
    """Frames as raw bytes over one authenticated local-transport connection, sent while answers are read."""

    def __init__(self, connection: RawSiteConnection) -> None:
        self.connection = connection
        self._sender: threading.Thread | None = None
        self._send_error: list[BaseException] = []

    def view(self, frame: bytes) -> bytes:
        return frame

    def send_many(self, frames: list[bytes]) -> None:
        def send() -> None:
            try:
                for frame in frames:
                    self.connection.send(frame)
            except BaseException as exc:  # reported by collect
                self._send_error.append(exc)

        # A thread, so that a site that stops reading while its answers are unread cannot deadlock the test.
        self._sender = threading.Thread(target=send, name="fuzz-send", daemon=True)
        self._sender.start()

    def collect(self, count: int, timeout: float) -> list[SiteMessage]:
        answers = self.connection.receive(count, timeout) if count else []
        if self._sender is not None:
            self._sender.join(timeout)
            assert not self._sender.is_alive(), f"the site stopped reading frames for {timeout}s"
        assert not self._send_error, f"sending failed: {self._send_error[0]!r}"
        return answers


class MeshChannel:
    """Frames as admin-command text through the FLARE mesh job: one exchange per batch."""

    def __init__(self, connection: RawMeshConnection) -> None:
        self.connection = connection

    def view(self, frame: bytes) -> str:
        return RawMeshConnection.as_text(frame)

    def send_many(self, frames: list[bytes]) -> None:
        self.connection.exchange([self.view(frame) for frame in frames])

    def collect(self, count: int, timeout: float) -> list[SiteMessage]:
        answers = self.connection.receive(count, timeout) if count else []
        assert not self.connection.problems, f"the mesh reported: {self.connection.problems[:5]}"
        return answers


@dataclass
class Tally:
    """What a campaign sent and got back."""

    frames: int = 0
    decoded: int = 0
    messages: int = 0
    answers: int = 0
    batches: int = 0
    seconds: float = 0.0
    codes: Counter[str] = field(default_factory=Counter)

    def report(self, transport: str, seed: int) -> str:
        return (
            f"wire fuzzing [{transport}] seed {seed}: {self.frames} hostile frames in {self.batches} batches, "
            f"{self.seconds:.1f}s; {self.decoded} decoded as envelopes carrying {self.messages} messages, "
            f"{self.frames - self.decoded} refused whole; {self.answers} answers, all valid; "
            f"results/errors by code: {dict(sorted(self.codes.items()))}"
        )


def check_answers(answers: list[SiteMessage], allowed: set[str], tally: Tally) -> None:
    """Every answer carries an id from the batch (or none) and a known error code."""
    for answer in answers:
        assert answer.id is None or answer.id in allowed, f"an answer to an id nobody sent: {answer!r}"[:2000]
        error = answer.error if isinstance(answer, (ErrorReply, RunResult)) else None
        if error is not None:
            assert error.code in ERROR_CODES, f"unknown error code {error.code!r}: {answer!r}"[:2000]
            tally.codes[error.code] += 1
        else:
            tally.codes[f"ok:{answer.kind}"] += 1
    tally.answers += len(answers)


def still_serves(channel: Channel, batch: int) -> None:
    """An honest echo is answered, and nothing unasked for comes before it."""
    request_id = f"honest-{batch}-{uuid.uuid4().hex[:8]}"
    channel.send_many([run_frame("core.echo", {"value": "ok"}, request_id).encode()])
    (answer,) = channel.collect(1, 60.0)
    assert isinstance(answer, RunResult) and answer.ok and answer.id == request_id, f"after the batch: {answer!r}"[:2000]


def campaign(
    channel: Channel,
    frames: HostileFrames,
    *,
    seed: int,
    total: int,
    batch: int,
    cap_s: float,
    alive: Callable[[], None],
    hang_s: float = 60.0,
) -> Tally:
    """Send up to ``total`` frames in batches of ``batch`` within ``cap_s`` seconds, checking after each batch."""
    tally = Tally()
    started = time.monotonic()
    while tally.frames < total and time.monotonic() - started < cap_s:
        first = tally.frames
        sent = [frames.frame() for _ in range(min(batch, total - first))]
        views = [channel.view(frame) for frame in sent]
        expected = [expected_answers(view) for view in views]
        try:
            channel.send_many(sent)
            answers = channel.collect(sum(expected), hang_s)
            check_answers(answers, set().union(*(allowed_ids(view) for view in views)), tally)
            alive()
            still_serves(channel, tally.batches)
        except Exception as exc:
            raise AssertionError(
                f"hostile frames {first}..{first + len(sent) - 1} of seed {seed} "
                f"(reproduce: DFM_FUZZ_SEED={seed}): {type(exc).__name__}: {exc}"[:4000]
            ) from exc
        tally.frames += len(sent)
        tally.batches += 1
        envelopes = [envelope for envelope in map(decode, views) if envelope is not None]
        tally.decoded += len(envelopes)
        tally.messages += sum(len(envelope.messages) for envelope in envelopes)
    tally.seconds = time.monotonic() - started
    return tally
