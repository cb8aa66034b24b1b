"""Seeded, structure-aware hostile frames for the wire fuzzing (no hypothesis: thousands a second, reproducible).

:class:`HostileFrames` starts from valid frames a client could send (runs of
the site's operations, describe, stats, fetch of a real result, cancel) and
breaks each one: values replaced with wrong types, huge and negative numbers,
NaN, oversized strings, deep nesting; keys dropped or added; unknown kinds,
operations and versions; bad and duplicate ids; data paths outside the roots,
globs and references to other sites; forged refs; then, for some, the bytes
themselves (truncated, flipped, invalid UTF-8, duplicate keys, garbage
around, two frames glued). The same seed gives the same frames::

    frames = HostileFrames(seed=11, ref=None)
    frame = frames.frame()   # bytes, as a hostile client would send them

Reproduce a run with ``DFM_FUZZ_SEED=<seed>`` (the failing frame's index is in
the failure message).
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
from typing import Any

from dfm_prefect.core.wire import MAX_BATCH

SEED = int(os.environ.get("DFM_FUZZ_SEED", "20261127"))
"""The fuzzing seed; set DFM_FUZZ_SEED to reproduce (or vary) a run."""
FRAMES = int(os.environ.get("DFM_FUZZ_FRAMES", "10000"))
"""Hostile frames each transport must answer."""

OPERATIONS = ["core.echo", "table.filter", "table.project", "table.groupby_aggregate"]
"""What the fuzzed site offers (tests build it with a small CSV source ``visits``)."""

PATHS = [
    "/etc/passwd", "file:///etc/passwd", "file:///proc/self/environ", "../../../etc/passwd", "visits/../../etc/passwd",
    "file:///tmp/../etc/shadow", "dfm://other/visits", "dfm://fuzz/../../etc/passwd", "dfm://fuzz/nope", "*", "**/*.csv",
    "file:///*", "data/*.csv", "s3://bucket/key", "memory://x", "http://169.254.169.254/latest/meta-data", "zip::file:///x.zip",
    "file:///data?x=1", "visits\x00.csv", "", "visits", "dfm://fuzz/visits",
]  # fmt: skip
STRINGS = [
    "", " ", "\x00", "x" * 65, "é" * 64, "\u202e\u200b", "\ud800", "\udfff\ud800", "${env:HOME}", "${env:DFM_AUTHKEY}",
    "__import__('os').system('id')", "{{7*7}}", "%s%s%n", "core.echo\x00", "CORE.ECHO", " core.echo", "null", "1", "true",
]  # fmt: skip
NUMBERS: list[Any] = [
    0, -1, -(2**63), 2**63, 2**64 + 1, 10**30, -(10**30), 1e308, -1e-308, 0.5, float("nan"), float("inf"), float("-inf"),
]  # fmt: skip
TYPES: list[Any] = [None, True, False, [], {}, [1, "a", None], {"a": {"b": []}}, 0, "s", 1.5]
KINDS: list[Any] = ["run", "cancel", "describe", "fetch", "stats", "result", "error", "chunk", "progress", "pickle", "", "RUN", None, 1]
OPS = [*OPERATIONS, "core.sleep", "code.python", "xarray.reduce", "nope.op", "os.system", "a" * 129, "core.echo/../x"]
FIELDS = ["kind", "id", "op", "version", "params", "attempt", "timeout_s", "target", "ref", "offset", "length", "v"]
SIZES = [65, 129, 513, 8193]
HUGE = 100_000
"""Length of the oversized strings and depth of the deepest nesting."""
DEEP = re.compile(rb'"__DEEP:(\d+)__"')
BIG = re.compile(rb'"__BIG:(-?)(\d+)__"')
BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xc3", b"\xe2\x82"]


def templates(ref: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Valid messages for the fuzzed site: the starting points of every mutation."""
    where = [{"column": "ward", "op": "==", "value": "a"}]
    found: list[dict[str, Any]] = [
        {"kind": "run", "id": "r", "op": "core.echo", "params": {"value": "ok"}},
        {"kind": "run", "id": "r", "op": "core.echo", "version": "1", "params": {"value": [1, {"a": 2.5}]},
         "flow_run_id": "f", "task_run_id": "t", "attempt": 2, "timeout_s": 30.0},
        {"kind": "run", "id": "r", "op": "table.filter", "params": {"data": "visits", "where": where, "limit": 5}},
        {"kind": "run", "id": "r", "op": "table.project", "params": {"data": "dfm://fuzz/visits", "columns": ["ward"]}},
        {"kind": "run", "id": "r", "op": "table.groupby_aggregate",
         "params": {"data": "visits", "by": ["ward"], "aggregations": {"n": {"column": "los", "func": "count"}}}},
        {"kind": "describe", "id": "d"},
        {"kind": "stats", "id": "s"},
        {"kind": "cancel", "id": "c", "target": "r"},
    ]  # fmt: skip
    if ref is not None:
        found.append({"kind": "fetch", "id": "f", "ref": ref, "offset": 0, "length": 1 << 20})
    return found


class HostileFrames:
    """An endless, seeded stream of hostile frames (bytes).

    Args:
        seed: the stream is a function of it alone.
        ref: a real `DataRef` (as JSON) of the fuzzed site, for fetches to break.
        wide: largest batch of copies one frame may carry (keep it small where
            every answer is costly, as over FLARE); MAX_BATCH + 1 is always possible.
        huge: the share of oversized strings and nestings that are `HUGE` (the
            bytes a frame costs to carry; lower where they are costly).
    """

    def __init__(self, seed: int, ref: dict[str, Any] | None, *, wide: int = 64, huge: float = 0.2) -> None:
        self.huge = huge
        self.rng = random.Random(seed)
        self.templates = templates(ref)
        self.wide = wide
        self.count = 0

    # ----------------------------------------------------------------- values

    def value(self, depth: int = 0) -> Any:
        """One hostile JSON value."""
        rng = self.rng
        pick = rng.random()
        if pick < 0.2:
            return rng.choice(STRINGS)
        if pick < 0.35:
            return rng.choice(NUMBERS)
        if pick < 0.5:
            return copy.deepcopy(rng.choice(TYPES))
        if pick < 0.6:
            return rng.choice(PATHS)
        if pick < 0.7:
            return "A" * HUGE if rng.random() < self.huge else rng.choice("Aé\x01") * rng.choice(SIZES)
        if pick < 0.78:
            return f"__DEEP:{HUGE if rng.random() < self.huge else rng.choice([64, 200, 1000, 10_000])}__"
        if pick < 0.84:
            return f"__BIG:{rng.choice(['', '-'])}{rng.choice([20, 400, 5000])}__"
        if depth < 3 and pick < 0.92:
            return [self.value(depth + 1) for _ in range(rng.randrange(4))]
        if depth < 3:
            return {rng.choice([*FIELDS, "evil", ""]): self.value(depth + 1) for _ in range(rng.randrange(4))}
        return rng.choice(STRINGS)

    # -------------------------------------------------------------- mutations

    def _nodes(self, tree: Any) -> list[tuple[Any, Any]]:
        """Every (container, key) pair in ``tree``: the places a mutation can hit."""
        nodes: list[tuple[Any, Any]] = []
        stack = [tree]
        while stack:
            node = stack.pop()
            items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            for key, child in items:
                nodes.append((node, key))
                stack.append(child)
        return nodes

    def _message(self, envelope: dict[str, Any]) -> dict[str, Any] | None:
        messages = envelope.get("messages")
        dicts = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        return self.rng.choice(dicts) if dicts else None

    def mutate(self, envelope: dict[str, Any]) -> None:
        """Break ``envelope`` in place, once."""
        rng = self.rng
        pick = rng.random()
        message = self._message(envelope)
        nodes = self._nodes(envelope)
        params = message.get("params") if message is not None else None
        if pick < 0.3 and isinstance(params, dict):  # invalid parameters (the frame itself decodes)
            inner = self._nodes(params)
            container, key = rng.choice(inner) if inner and rng.random() < 0.8 else (params, rng.choice(["data", "evil", "value"]))
            container[key] = self.value() if rng.random() < 0.7 else rng.choice(PATHS)
        elif pick < 0.45 and nodes:  # any value, anywhere
            container, key = rng.choice(nodes)
            container[key] = self.value()
        elif pick < 0.52 and nodes:  # a key or item dropped
            container, key = rng.choice(nodes)
            del container[key]
        elif pick < 0.57:  # an unknown key
            targets = [node for node, _ in nodes if isinstance(node, dict)] or [envelope]
            rng.choice(targets)[rng.choice([*FIELDS, "evil", "__class__", "KIND"])] = self.value()
        elif pick < 0.64 and message is not None:  # unknown or mismatched kind
            message["kind"] = rng.choice(KINDS)
        elif pick < 0.70 and message is not None:  # unknown operation or version
            message["op" if rng.random() < 0.7 else "version"] = rng.choice([*OPS, *STRINGS, "99", 1])
        elif pick < 0.77 and message is not None:  # bad ids and targets
            message["id" if rng.random() < 0.8 else "target"] = rng.choice([*STRINGS, "r", "dup", 7, None, ["r"]])
        elif pick < 0.85 and message is not None:  # data outside the roots, refs to others, forged refs
            self._misplace(message)
        elif pick < 0.92 and isinstance(envelope.get("messages"), list):  # duplicate ids, wide batches, too many
            small = json.dumps(envelope["messages"])
            if rng.random() < 0.02:
                envelope["messages"] = [{"kind": "stats", "id": "dup"}] * (MAX_BATCH + 1)
            elif len(small) < 10_000 and "__DEEP" not in small:
                copies = rng.randint(2, self.wide) if rng.random() < 0.1 else rng.choice([2, 3])
                envelope["messages"] = [copy.deepcopy(m) for m in envelope["messages"] for _ in range(copies)]
        else:  # numbers out of range where the wire takes numbers
            field = rng.choice(["attempt", "timeout_s", "offset", "length", "v"])
            target = envelope if field == "v" else message if message is not None else envelope
            target[field] = rng.choice(NUMBERS + ["1", None])

    def _misplace(self, message: dict[str, Any]) -> None:
        rng = self.rng
        params = message.get("params")
        ref = message.get("ref")
        if isinstance(ref, dict) and ref:
            field = rng.choice(sorted(ref))
            ref[field] = rng.choice(["other", "fuzz", *PATHS, -1, 1 << 62, "0" * 64]) if rng.random() < 0.8 else self.value()
        elif isinstance(params, dict):
            params["data"] = rng.choice(PATHS) if rng.random() < 0.7 else copy.deepcopy(self.templates[-1].get("ref", {}))
        else:
            message["params"] = {"data": rng.choice(PATHS)}

    # ------------------------------------------------------------------ bytes

    def _encode(self, envelope: Any) -> bytes:
        rng = self.rng
        text = json.dumps(envelope, allow_nan=True, ensure_ascii=rng.random() < 0.8, separators=(",", ":"))
        raw = text.encode("utf-8", "surrogatepass")  # a lone surrogate unescaped: invalid UTF-8
        raw = DEEP.sub(lambda m: b"[" * int(m[1]) + b"]" * int(m[1]), raw)
        return BIG.sub(lambda m: m[1] + b"9" * int(m[2]), raw)

    def corrupt(self, raw: bytes) -> bytes:
        """Break the bytes of an encoded frame, once."""
        rng = self.rng
        pick = rng.random()
        at = rng.randrange(len(raw) + 1)
        if pick < 0.25:
            return raw[:at]
        if pick < 0.4:
            flipped = bytearray(raw)
            for _ in range(rng.randint(1, 8)):
                if flipped:
                    flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            return bytes(flipped)
        if pick < 0.6:
            return raw[:at] + rng.choice(BAD_UTF8) + raw[at:]
        if pick < 0.7:
            return raw.replace(b'"id":', b'"id":"dup","id":', 1) if rng.random() < 0.5 else raw.replace(b'"kind":', b'"kind":"run","kind":', 1)
        if pick < 0.8:
            return rng.choice([b"\xef\xbb\xbf", b" \t\n", b"[", b"\x00"]) + raw + rng.choice([b"", b"}", b"]", b"\x00", b",{}"])
        if pick < 0.9:
            return raw + raw
        return rng.choice([b"", b"null", b"[]", b"{}", b'{"v":1}', b'{"messages":[]}', b"1e999999", b'"' + b"m" * 70_000 + b'"'])

    def frame(self) -> bytes:
        """The next hostile frame."""
        rng = self.rng
        self.count += 1
        messages = [copy.deepcopy(rng.choice(self.templates)) for _ in range(1 if rng.random() < 0.7 else rng.randint(0, 4))]
        for index, message in enumerate(messages):  # distinct ids, so that duplicates are the mutations' doing
            message["id"] = f"{message['kind']}-{self.count}-{index}"
            if "target" in message:
                message["target"] = f"run-{self.count - rng.randrange(3)}-0"
        envelope: dict[str, Any] = {"v": 1, "messages": messages}
        for _ in range(rng.choice([1, 1, 1, 1, 2, 3])):
            current = envelope.get("messages")
            if isinstance(current, list) and len(current) > MAX_BATCH:
                break  # one shared message, MAX_BATCH + 1 times: mutate no further
            self.mutate(envelope)
        raw = self._encode(envelope)
        return self.corrupt(raw) if rng.random() < 0.2 else raw


def allowed_ids(frame: bytes | str) -> set[str]:
    """The ids an answer to ``frame`` may carry: those of its messages, as far as the frame parses."""
    try:
        data = json.loads(frame)
    except (ValueError, TypeError, RecursionError):
        return set()
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        return set()
    return {m["id"] for m in messages if isinstance(m, dict) and isinstance(m.get("id"), str)}
