"""Operations: named, versioned functions that sites run next to their data.

An operation is declared once, in an installed package, with the
:func:`operation` decorator. At a site it is the code the site runs (only if the
site's config lists it). In a flow the same object behaves like a Prefect task:
``.submit``, ``.map``, ``with_options`` and direct calls all work, and the
:class:`~dfm_prefect.task_runner.FederationTaskRunner` sends the call to a site.
This module does not import Prefect, so site processes never load it: the
Prefect task is built by the front end registered in the ``dfm_prefect.frontends``
entry-point group (``dfm_prefect.tasks``), on first use in a flow.

Example:

```python
from pydantic import Field
from dfm_prefect.core.operations import DataInput, OperationContext, OperationParams, operation

class ScaleParams(OperationParams):
    data: DataInput
    factor: float = Field(gt=0)

@operation("example.scale", version="1", result="dataset")
def scale(params: ScaleParams, ctx: OperationContext) -> "xr.Dataset":
    return ctx.open_dataset(params.data) * params.factor
```
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable
from functools import cached_property
from importlib.metadata import entry_points
from typing import Any, Protocol, Union, get_args, get_type_hints

from pydantic import BaseModel, ConfigDict

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.core.refs import DataRef, ResultKind

ENTRY_POINT_GROUP = "dfm_prefect.operations"
FRONTEND_GROUP = "dfm_prefect.frontends"
_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
RESERVED_PARAMETERS = frozenset({"site"})

DataInput = Union[DataRef, str]
"""An operation input: a `DataRef` held by the site, or a data source (name or URL)."""


class OperationContext(Protocol):
    """What a site hands an operation as ``ctx``: data access, compute, progress, logging, cancellation."""

    site: str
    request_id: str
    log: logging.Logger
    user_code: Any
    """The site's rules for running code sent by clients (``code.python``)."""

    def open(self, data: DataRef | str) -> Any:
        """Open a `DataRef` held here or a data source, lazily (xarray or Dask dataframe)."""

    def open_dataset(self, data: DataRef | str) -> Any:
        """Open as an xarray Dataset (chunked with Dask)."""

    def compute(self, *collections: Any) -> tuple[Any, ...]:
        """Compute Dask collections on the site's compute backend (CPU or GPU)."""

    def to_device(self, value: Any) -> Any:
        """Move an array to the backend's device (CuPy on a GPU site, unchanged on a CPU one)."""

    def describe(self, value: Any) -> dict[str, Any]:
        """A metadata summary of a value (dims, coordinate ranges, dtypes; no data read), as `DataRef` summaries show it."""

    def count_groups(self, *counts: Any) -> None:
        """Report how many records or cells contributed to each group of an ``aggregate`` result.

        ``counts`` are computed arrays of per-group counts (NumPy, xarray, pandas or
        numbers), counted by the operation from the data, e.g. the ``__n`` terms of
        moments or the bin counts of a histogram. The site keeps the smallest
        non-zero count and releases the aggregate only if it reaches the site's
        ``export.disclosure.min_group_size``; an aggregate that reports no counts
        does not leave a site that sets a minimum.
        """

    def check_selection(self, kept: int, total: int, *, unit: str = "rows") -> None:
        """Report that a selection (a filter, a subset) kept ``kept`` of ``total`` records or cells.

        Raises `~dfm_prefect.core.errors.DisclosureRefusedError` when it keeps fewer
        than the site's ``export.disclosure.min_subset_size``, or leaves out more
        than none but fewer than that (two such queries, differenced, would isolate
        the records left out).
        """

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress (0..1) to the flow run."""

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early (and raising) when the request is cancelled."""

    def wait_cancelled(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True if the request was cancelled."""

    def check_cancelled(self) -> None:
        """Raise if the request was cancelled."""


TaskFactory = Callable[["Operation"], Any]
_TASK_FACTORY: list[TaskFactory] = []


def set_task_factory(factory: TaskFactory) -> None:
    """Register how an operation becomes a task in flows (done by the front end when it is imported)."""
    _TASK_FACTORY[:] = [factory]


def _task_factory() -> TaskFactory:
    if not _TASK_FACTORY:
        for ep in entry_points(group=FRONTEND_GROUP):
            set_task_factory(ep.load())
            break
    if not _TASK_FACTORY:
        raise ConfigError(f"no front end is installed to run operations in flows (entry-point group {FRONTEND_GROUP!r})")
    return _TASK_FACTORY[0]


class OperationParams(BaseModel):
    """Base class of every operation's parameter model: frozen, no extra fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Operation:
    """A named operation; at a site its code, in a flow a Prefect task."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str,
        version: str,
        result: ResultKind,
        params: type[OperationParams],
        view: bool = True,
        stream: bool = False,
    ) -> None:
        if not _NAME.match(name):
            raise ConfigError(f"operation name {name!r} must look like 'package.verb' (lowercase, dotted)")
        clash = RESERVED_PARAMETERS & set(params.model_fields)
        if clash:
            raise ConfigError(f"operation {name!r}: parameter names {sorted(clash)} are reserved")
        self.fn = fn
        self.name = name
        self.version = version
        self.result_kind: ResultKind = result
        self.params = params
        self.view = view
        """Whether a lazy gridded result may stay a view (recomputed where it is used); False: always stored."""
        self.stream = stream
        """Whether the implementation is a generator whose every item is a result sent as soon as it is made."""
        if stream and not inspect.isgeneratorfunction(fn):
            raise ConfigError(f"operation {name!r} is declared stream=True: its function must be a generator (yield each item)")
        self.description = inspect.getdoc(fn) or ""

    def __repr__(self) -> str:
        return f"Operation({self.name!r}, version={self.version!r}, result={self.result_kind!r})"

    @cached_property
    def data_fields(self) -> tuple[str, ...]:
        """Parameters that name data (a `DataRef`, source or URL): what placement looks at."""
        return tuple(name for name, field in self.params.model_fields.items() if _mentions_ref(field.annotation))

    # -- site side ------------------------------------------------------------

    def run(self, params: OperationParams, ctx: OperationContext) -> Any:
        """Run the implementation (at a site, with validated parameters)."""
        return self.fn(params, ctx)

    # -- client side: a Prefect task ------------------------------------------

    @cached_property
    def task(self) -> Any:
        """The Prefect task that stands for this operation in flows."""
        task: Any = _task_factory()(self)
        return task

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(*args, **kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        """Submit like a Prefect task; returns a `PrefectFuture` of a `DataRef`."""
        return self.task.submit(*args, **kwargs)

    def map(self, *args: Any, **kwargs: Any) -> Any:
        """Map like a Prefect task; returns a `PrefectFutureList` of `DataRef` futures."""
        return self.task.map(*args, **kwargs)

    def with_options(self, **options: Any) -> Any:
        """A copy of the task with Prefect options (retries, timeout_seconds, tags, ...)."""
        return self.task.with_options(**options)


def _mentions_ref(annotation: Any) -> bool:
    if annotation is DataRef:
        return True
    return any(_mentions_ref(arg) for arg in get_args(annotation))


MOVE_OPERATION = "dfm.move"
"""The built-in operation that brings a result held by another site to the site it runs at (see `site_workers.moves`)."""


class MoveParams(OperationParams):
    """The parameters of ``dfm.move``: the result to bring, as the site that holds it gave it out."""

    ref: DataRef


def _moved_at_the_site(params: MoveParams, ctx: OperationContext) -> Any:
    raise ConfigError("dfm.move is carried out by the receiving site itself (SiteWorker), not as an installed operation")


MOVE = Operation(_moved_at_the_site, name=MOVE_OPERATION, version="1", result="dataset", params=MoveParams, view=False)
"""``dfm.move`` as an operation: every site offers it, and its ``imports`` rules decide."""

_REGISTRY: dict[str, Operation] = {}


def operation(
    name: str,
    *,
    version: str = "1",
    result: ResultKind,
    params: type[OperationParams] | None = None,
    view: bool = True,
    stream: bool = False,
) -> Callable[[Callable[..., Any]], Operation]:
    """Declare an operation; the parameter model defaults to the first argument's annotation.

    A ``dataset`` operation that returns lazy (Dask-backed) data makes a view: the
    site keeps its recipe and recomputes it where it is used. It must then be a
    pure function of its parameters and the data it reads. ``view=False`` makes
    the site store every result (for operations whose point is the stored copy,
    or whose result depends on more than their inputs).

    ``stream=True`` declares a generator: each item it yields is a result of
    kind ``result`` (stored, checked by the export policy and sent to the client
    as soon as it is made); the client takes them in order as they arrive, and
    the generator is not resumed while the client has as many untaken items as
    it allowed (back-pressure).
    """

    def register(fn: Callable[..., Any]) -> Operation:
        model = params or _params_model(fn, name)
        op = Operation(fn, name=name, version=version, result=result, params=model, view=view, stream=stream)
        existing = _REGISTRY.get(name)
        if existing is not None and existing.fn.__module__ != fn.__module__:
            raise ConfigError(f"operation {name!r} is declared twice: in {existing.fn.__module__} and {fn.__module__}")
        _REGISTRY[name] = op
        return op

    return register


def _params_model(fn: Callable[..., Any], name: str) -> type[OperationParams]:
    first = next(iter(inspect.signature(fn).parameters), None)
    model = get_type_hints(fn).get(first) if first else None
    if not (isinstance(model, type) and issubclass(model, OperationParams)):
        raise ConfigError(f"operation {name!r}: annotate the first argument with an OperationParams subclass")
    return model


def load_operations(modules: list[str] | tuple[str, ...] = ()) -> dict[str, Operation]:
    """Import every installed operation package (entry points) and ``modules``; return the registry."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"operation module {module!r} cannot be imported: {exc}") from exc
    return dict(_REGISTRY)


def get_operation(name: str) -> Operation | None:
    """The registered operation of that name, if its package has been imported."""
    return _REGISTRY.get(name)
