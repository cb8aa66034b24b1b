"""The Prefect task that stands for an operation in a flow.

The task's function is a stub with the operation's parameters (plus ``site``) as
its signature: Prefect binds arguments, resolves futures, names, retries, caches
and records states exactly as for any task. Only the stub's body is remote: it
hands the call to the dispatch that :class:`~dfm_prefect.task_runner.FederationTaskRunner`
prepared for this task run.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

from prefect import Task
from prefect.context import FlowRunContext
from prefect.utilities.callables import get_call_parameters

from dfm_prefect.core.errors import FederationError
from dfm_prefect.core.operations import set_task_factory
from dfm_prefect.core.refs import DataRef

if TYPE_CHECKING:
    from dfm_prefect.core.operations import Operation
    from dfm_prefect.dispatch import Dispatch

CURRENT_DISPATCH: contextvars.ContextVar[Dispatch | None] = contextvars.ContextVar("dfm_dispatch", default=None)


def _run_name() -> str:
    dispatch = CURRENT_DISPATCH.get()
    if dispatch is None:
        return "operation"
    return dispatch.run_name


class OperationTask(Task):  # type: ignore[type-arg]
    """A Prefect task whose body runs at a federation site."""

    operation: Operation

    def with_options(self, **options: Any) -> OperationTask:
        new = super().with_options(**options)
        new.__class__ = type(self)
        new.operation = self.operation
        new.source_code = self.source_code
        return new  # type: ignore[return-value]

    def __call__(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
        # A direct call inside a flow would run the engine in the flow's thread and
        # bypass the task runner; route it through the runner so placement, tags and
        # the site in the run name are the same as for `.submit`.
        ctx = FlowRunContext.get()
        runner = getattr(ctx, "task_runner", None) if ctx else None
        if self.operation.stream and getattr(runner, "dispatches_operations", False):
            if return_state:
                raise FederationError(f"{self.operation.name} streams its results: iterate what the call returns (no return_state)")
            # A generator task: Prefect's engine runs in the flow's thread and yields each item as it arrives.
            return runner.stream(self, get_call_parameters(self.fn, args, kwargs), wait_for)  # type: ignore[union-attr]
        if getattr(runner, "dispatches_operations", False):
            future = self.submit(*args, wait_for=wait_for, **kwargs)
            if return_state:
                future.wait()
                return future.state
            return future.result()
        return super().__call__(*args, return_state=return_state, wait_for=wait_for, **kwargs)


def operation_task(op: Operation) -> OperationTask:
    """Build the Prefect task for an operation."""

    def current() -> Dispatch:
        dispatch = CURRENT_DISPATCH.get()
        if dispatch is None:
            raise FederationError(
                f"operation {op.name!r} runs at a federation site: use it in a flow with "
                "task_runner=FederationTaskRunner(...)"
            )
        return dispatch

    def arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def call(*args: Any, **kwargs: Any) -> DataRef:
        return current().execute(arguments(args, kwargs))

    def stream(*args: Any, **kwargs: Any) -> Iterator[DataRef]:
        yield from current().stream(arguments(args, kwargs))

    body: Any = stream if op.stream else call

    parameters = [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True),
            annotation=field.annotation,
        )
        for name, field in op.params.model_fields.items()
    ]
    parameters.sort(key=lambda p: p.default is not inspect.Parameter.empty)
    parameters.append(
        inspect.Parameter("site", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Optional[str])
    )
    signature = inspect.Signature(parameters, return_annotation=Iterator[DataRef] if op.stream else DataRef)
    body.__signature__ = signature  # type: ignore[attr-defined]
    body.__name__ = op.name.replace(".", "_")
    body.__qualname__ = op.name
    body.__module__ = op.fn.__module__
    body.__doc__ = op.description
    body.__dfm_operation__ = op  # type: ignore[attr-defined]

    task = OperationTask(fn=body, name=op.name, task_run_name=_run_name, description=op.description.split("\n\n")[0])
    task.operation = op
    # Cache keys and task keys must tell operations apart, not the shared stub.
    task.source_code = f"dfm-prefect operation {op.name} version {op.version}"
    return task


set_task_factory(operation_task)
