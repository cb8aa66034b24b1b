"""A small, allow-listed expression language for derived variables (never `eval`).

Expressions combine variables, numbers and the functions in :data:`FUNCTIONS`
with ``+ - * / **``, comparisons (``< <= > >= == !=``, for ``where``) and
parentheses. They are tokenized and parsed here, by a recursive-descent parser
with limits on length, depth and size, into a tree of plain dataclasses; nothing
in the text is ever executed or imported.

Example:

```python
from adapters.expressions import parse

tree = parse("where(t > 273.15, (t - 273.15) * 1.8 + 32, nan)")
tree.names()                  # {'t'}
value = tree.evaluate({"t": ds["temperature"]})   # lazily, on whatever arrays ds holds
```
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dfm_prefect.core.errors import InvalidParametersError

MAX_LENGTH = 2000
MAX_DEPTH = 32
MAX_NODES = 256


def _where(cond: Any, a: Any, b: Any) -> Any:
    import xarray as xr

    return xr.where(cond, a, b, keep_attrs=False)


def _clip(x: Any, low: Any, high: Any) -> Any:
    return x.clip(low, high) if hasattr(x, "clip") else np.clip(x, low, high)


FUNCTIONS: dict[str, tuple[int, Callable[..., Any]]] = {
    "abs": (1, np.abs),
    "sqrt": (1, np.sqrt),
    "exp": (1, np.exp),
    "log": (1, np.log),
    "log10": (1, np.log10),
    "sin": (1, np.sin),
    "cos": (1, np.cos),
    "tan": (1, np.tan),
    "arctan2": (2, np.arctan2),
    "deg2rad": (1, np.deg2rad),
    "rad2deg": (1, np.rad2deg),
    "floor": (1, np.floor),
    "ceil": (1, np.ceil),
    "minimum": (2, np.minimum),
    "maximum": (2, np.maximum),
    "clip": (3, _clip),
    "where": (3, _where),
}
"""Name -> (number of arguments, implementation). NumPy ufuncs stay lazy on xarray/Dask and run on CuPy chunks."""

CONSTANTS: dict[str, float] = {"pi": float(np.pi), "e": float(np.e), "nan": float("nan")}

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "**": operator.pow,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}

_TOKEN = re.compile(
    r"\s*(?:(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>\*\*|<=|>=|==|!=|[-+*/<>(),]))"
)


class Node:
    """A node of a parsed expression."""

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def names(self) -> set[str]:
        """The variable names the expression reads."""
        return set()


@dataclass(frozen=True)
class Number(Node):
    value: float

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True)
class Name(Node):
    name: str

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        if self.name in env:
            return env[self.name]
        if self.name in CONSTANTS:
            return CONSTANTS[self.name]
        raise InvalidParametersError(f"unknown name {self.name!r} in expression; variables here: {sorted(env)}")

    def names(self) -> set[str]:
        return set() if self.name in CONSTANTS else {self.name}


@dataclass(frozen=True)
class Unary(Node):
    operand: Node

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        return -self.operand.evaluate(env)

    def names(self) -> set[str]:
        return self.operand.names()


@dataclass(frozen=True)
class Binary(Node):
    op: str
    left: Node
    right: Node

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        return _BINARY[self.op](self.left.evaluate(env), self.right.evaluate(env))

    def names(self) -> set[str]:
        return self.left.names() | self.right.names()


@dataclass(frozen=True)
class Call(Node):
    function: str
    args: tuple[Node, ...]

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        return FUNCTIONS[self.function][1](*(arg.evaluate(env) for arg in self.args))

    def names(self) -> set[str]:
        return set().union(*(arg.names() for arg in self.args))


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    stripped = text.rstrip()
    while position < len(stripped):
        match = _TOKEN.match(stripped, position)
        if match is None or match.end() == position:
            raise InvalidParametersError(f"unexpected character {stripped[position:position + 1]!r} at {position} in expression")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


class _Parser:
    """Recursive descent: comparison > additive > multiplicative > unary > power > atom."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.index = 0
        self.nodes = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            found = "the end" if token is None else repr(token[1])
            raise InvalidParametersError(f"expected {value or 'more input'!r} in expression, found {found}")
        self.index += 1
        return token

    def node(self, node: Node) -> Node:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise InvalidParametersError(f"expression is too large (more than {MAX_NODES} terms)")
        return node

    def parse(self) -> Node:
        tree = self.comparison(0)
        if self.peek() is not None:
            raise InvalidParametersError(f"unexpected {self.peek()[1]!r} in expression")  # type: ignore[index]
        return tree

    def comparison(self, depth: int) -> Node:
        left = self.additive(depth)
        token = self.peek()
        if token and token[1] in ("<", "<=", ">", ">=", "==", "!="):
            self.take()
            left = self.node(Binary(token[1], left, self.additive(depth)))
        return left

    def additive(self, depth: int) -> Node:
        left = self.multiplicative(depth)
        while (token := self.peek()) and token[1] in ("+", "-"):
            self.take()
            left = self.node(Binary(token[1], left, self.multiplicative(depth)))
        return left

    def multiplicative(self, depth: int) -> Node:
        left = self.unary(depth)
        while (token := self.peek()) and token[1] in ("*", "/"):
            self.take()
            left = self.node(Binary(token[1], left, self.unary(depth)))
        return left

    def unary(self, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise InvalidParametersError(f"expression is nested too deeply (more than {MAX_DEPTH} levels)")
        token = self.peek()
        if token and token[1] in ("-", "+"):
            self.take()
            operand = self.unary(depth + 1)
            return self.node(Unary(operand)) if token[1] == "-" else operand
        return self.power(depth)

    def power(self, depth: int) -> Node:
        base = self.atom(depth)
        if (token := self.peek()) and token[1] == "**":
            self.take()
            return self.node(Binary("**", base, self.unary(depth + 1)))
        return base

    def atom(self, depth: int) -> Node:
        kind, value = self.take()
        if kind == "number":
            return self.node(Number(float(value)))
        if kind == "name":
            if (token := self.peek()) and token[1] == "(":
                return self.call(value, depth)
            return self.node(Name(value))
        if value == "(":
            inner = self.comparison(depth + 1)
            self.take(")")
            return inner
        raise InvalidParametersError(f"unexpected {value!r} in expression")

    def call(self, function: str, depth: int) -> Node:
        if function not in FUNCTIONS:
            raise InvalidParametersError(f"unknown function {function!r}; allowed: {sorted(FUNCTIONS)}")
        self.take("(")
        args: list[Node] = []
        if (token := self.peek()) and token[1] != ")":
            args.append(self.comparison(depth + 1))
            while (token := self.peek()) and token[1] == ",":
                self.take()
                args.append(self.comparison(depth + 1))
        self.take(")")
        arity = FUNCTIONS[function][0]
        if len(args) != arity:
            raise InvalidParametersError(f"{function}() takes {arity} argument(s), got {len(args)}")
        return self.node(Call(function, tuple(args)))


def parse(text: str) -> Node:
    """Parse an expression into a tree, or raise `InvalidParametersError` saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidParametersError("an expression must be a non-empty string")
    if len(text) > MAX_LENGTH:
        raise InvalidParametersError(f"expression is longer than {MAX_LENGTH} characters")
    return _Parser(text).parse()
