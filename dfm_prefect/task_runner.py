"""Interface and implementation of the federation task runner.

`FederationTaskRunner` runs a flow's operations at the sites that hold the data,
and its plain Python tasks on the client, like `ThreadPoolTaskRunner`. Prefect's
task engine runs on the client for every task run (states, retries, caching,
hooks and concurrency limits behave as usual); for an operation only the body is
remote: it is placed on a site, sent there over the federation's transport, and
its result comes back as a `DataRef`.

Example:
    Before: the data must be where the flow runs.
    ```python
    import xarray as xr
    from prefect import flow, task

    @task
    def yearly_mean(url):
        return xr.open_zarr(url).temperature.mean(["lat", "lon"]).compute()

    @flow
    def climate():
        return yearly_mean("s3://north/temperature.zarr")
    ```

    After: the work goes to the data; only the aggregate comes back.
    ```python
    from prefect import flow
    from adapters.xarray_ops import moments
    from dfm_prefect import FederationTaskRunner

    @flow(task_runner=FederationTaskRunner("federation.json"))
    def climate():
        agg = moments.submit(data="s3://north/temperature.zarr", dims=["lat", "lon"])
        return agg.result().fetch()
    ```
"""

from __future__ import annotations

import copy
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextvars import copy_context
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import RunInput
from prefect.context import FlowRunContext
from prefect.futures import PrefectConcurrentFuture, PrefectFuture
from prefect.task_engine import run_generator_task_sync, run_task_sync
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.engine import resolve_inputs_sync
from typing_extensions import Self

from dfm_prefect.client import FederationClient, get_client, set_session_lookup
from dfm_prefect.core.errors import FederationError, RequestCancelledError
from dfm_prefect.core.operations import Operation
from dfm_prefect.dispatch import Dispatch
from dfm_prefect.report import StepRecord, publish
from dfm_prefect.spec import FEDERATION_ENV
from dfm_prefect.tasks import CURRENT_DISPATCH

DEFAULT_MAX_WORKERS = 64
BLOCK_PREFIX = "block:"


def resolve_federation(federation: Any) -> Any:
    """Turn ``block:<name>`` (also in ``$DFM_FEDERATION``) and `Federation` blocks into a spec.

    Blocks are loaded only here, when the first operation runs, never at import.
    """
    if federation is None:
        federation = os.environ.get(FEDERATION_ENV)
    if isinstance(federation, str) and federation.startswith(BLOCK_PREFIX):
        from dfm_prefect.blocks import Federation

        federation = Federation.load(federation[len(BLOCK_PREFIX) :])
    if hasattr(federation, "federation_spec"):
        federation = federation.federation_spec()
    return federation


class FederationTaskRunner(ThreadPoolTaskRunner):
    """A task runner that sends operations to federation sites.

    Args:
        federation: how to reach the federation: a federation file written by
            ``dfm-prefect federation up``, a spec mapping or model, a `Federation`
            block or ``"block:<name>"`` (loaded when the first operation runs), or
            ``None`` for what ``$DFM_FEDERATION`` names (a file or ``block:<name>``).
        max_workers: task runs in flight at once (threads on the client). Remote
            work is also bounded by each site's own concurrency limit.
    """

    dispatches_operations = True

    def __init__(self, federation: Any = None, *, max_workers: int | None = DEFAULT_MAX_WORKERS) -> None:
        super().__init__(max_workers=max_workers)
        self.federation = federation
        self._reset_live_state()

    def _reset_live_state(self) -> None:
        self._client: FederationClient | None = None
        self._client_lock = threading.Lock()
        self._inflight: dict[str, tuple[str, Future[Any]]] = {}
        self._records: list[StepRecord] = []
        self._fetched: Counter[str] = Counter()
        self._flow_run_id: uuid.UUID | None = None
        self._engine_tasks: dict[int, tuple[Task[Any, Any], Task[Any, Any]]] = {}

    def duplicate(self) -> Self:
        return type(self)(self.federation, max_workers=self._max_workers)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FederationTaskRunner)
            and self._max_workers == other._max_workers
            and self.federation == other.federation
        )

    # ------------------------------------------------------------------ state

    @property
    def client(self) -> FederationClient:
        """The shared client of this runner's federation (connected on first use)."""
        with self._client_lock:
            if self._client is None:
                self._client = get_client(resolve_federation(self.federation))
            return self._client

    @property
    def records(self) -> list[StepRecord]:
        """Where each operation of this flow run ran, how long it took, and what it sent back."""
        with self._client_lock:
            return list(self._records)

    def record(self, step: StepRecord) -> None:
        with self._client_lock:
            self._records.append(step)

    def record_fetch(self, site: str, nbytes: int) -> None:
        """Count bytes of a value fetched from ``site`` during this flow run."""
        with self._client_lock:
            self._fetched[site] += nbytes

    def track(self, site: str, request_id: str, future: Future[Any]) -> None:
        with self._client_lock:
            self._inflight[request_id] = (site, future)

    def untrack(self, request_id: str) -> None:
        with self._client_lock:
            self._inflight.pop(request_id, None)

    # ----------------------------------------------------------------- submit

    def submit(
        self,
        task: Task[Any, Any],
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectFuture[Any]] | None = None,
        dependencies: dict[str, set[RunInput]] | None = None,
    ) -> PrefectConcurrentFuture[Any]:
        """Submit a task run; operations go to a site, anything else runs here."""
        op: Operation | None = getattr(task.fn, "__dfm_operation__", None)
        if op is None:
            return super().submit(task, parameters, wait_for, dependencies)
        if op.stream:
            raise FederationError(
                f"{op.name} streams its results: call it in the flow and iterate the items as they arrive "
                f"(for item in {op.name.split('.')[-1]}(...)), not with .submit or .map"
            )
        if not self._started or self._executor is None:
            raise RuntimeError("Task runner is not started")
        if self._flow_run_id is None:
            flow_ctx = FlowRunContext.get()
            if flow_ctx is not None and flow_ctx.flow_run is not None:
                self._flow_run_id = flow_ctx.flow_run.id

        task_run_id = uuid.uuid4()
        cancel_event = threading.Event()
        self._cancel_events[task_run_id] = cancel_event
        future = self._executor.submit(
            copy_context().run,
            self._run_operation,
            op,
            task,
            task_run_id,
            parameters,
            wait_for,
            dependencies,
            cancel_event,
        )
        return PrefectConcurrentFuture(task_run_id=task_run_id, wrapped_future=future)

    def _run_operation(
        self,
        op: Operation,
        task: Task[Any, Any],
        task_run_id: uuid.UUID,
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectFuture[Any]] | None,
        dependencies: dict[str, set[RunInput]] | None,
        cancel_event: threading.Event,
    ) -> Any:
        CURRENT_DISPATCH.set(self._prepare(op, task, parameters))
        return run_task_sync(
            task=self._engine_task(task),
            task_run_id=task_run_id,
            parameters=parameters,
            wait_for=wait_for,
            return_type="state",
            dependencies=dependencies,
            context=dict(cancel_event=cancel_event),
        )

    def stream(self, task: Task[Any, Any], parameters: dict[str, Any], wait_for: Any = None) -> Iterator[Any]:
        """Run a streaming operation as a generator task run in the calling thread; yield its items as they arrive."""
        op: Operation = task.fn.__dfm_operation__
        if self._flow_run_id is None:
            flow_ctx = FlowRunContext.get()
            if flow_ctx is not None and flow_ctx.flow_run is not None:
                self._flow_run_id = flow_ctx.flow_run.id
        token = CURRENT_DISPATCH.set(self._prepare(op, task, parameters))
        try:
            yield from run_generator_task_sync(task=self._engine_task(task), parameters=parameters, wait_for=wait_for, return_type="result")
        finally:
            CURRENT_DISPATCH.reset(token)

    def _prepare(self, op: Operation, task: Task[Any, Any], parameters: dict[str, Any]) -> Dispatch:
        """Place the task run before the engine names and tags it."""
        try:
            # Waits for upstream futures; if one failed, the engine reports it.
            resolved = resolve_inputs_sync(parameters)
        except Exception:
            return Dispatch(op=op, runner=self, client=None, placement=None, timeout_s=task.timeout_seconds,
                            error=FederationError(f"the inputs of {op.name!r} could not be resolved"))
        try:
            client = self.client
            placement = client.place(
                op.name,
                data=[resolved.get(name) for name in op.data_fields],
                explicit=resolved.get("site"),
            )
        except FederationError as exc:
            named = resolved.get("site")
            return Dispatch(
                op=op, runner=self, client=None, placement=None, error=exc, timeout_s=task.timeout_seconds, place_again=True,
                named_site=named if isinstance(named, str) else None,
            )  # fmt: skip
        return Dispatch(op=op, runner=self, client=client, placement=placement, timeout_s=task.timeout_seconds)

    def _engine_task(self, task: Task[Any, Any]) -> Task[Any, Any]:
        """The task as the engine should see it: the remote wait enforces the timeout.

        Prefect cannot interrupt a blocking wait in a worker thread; the dispatch
        waits with the task's own deadline instead and cancels the remote work.
        """
        if task.timeout_seconds is None:
            return task
        with self._client_lock:
            entry = self._engine_tasks.get(id(task))
            if entry is None:
                engine_task = copy.copy(task)
                engine_task.timeout_seconds = None
                entry = self._engine_tasks[id(task)] = (task, engine_task)
        return entry[1]

    # ------------------------------------------------------------------- exit

    def _cancel_remote(self) -> None:
        with self._client_lock:
            inflight = list(self._inflight.items())
            self._inflight.clear()
            client = self._client
        for request_id, (site, future) in inflight:
            if client is not None:
                client.cancel(site, request_id)
            elif not future.done():
                future.set_exception(RequestCancelledError("the flow run ended", site=site))

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        # Like ThreadPoolTaskRunner, a normal exit lets running task runs finish.
        # When the flow run fails or is interrupted its remote work is cancelled
        # here: Prefect calls cancel_all() on the template runner, not on this copy.
        if exc_type is not None:
            self._cancel_remote()
        super().__exit__(exc_type, exc_value, traceback)
        self._publish_report()

    def _publish_report(self) -> None:
        with self._client_lock:
            steps, fetched, flow_run_id = list(self._records), Counter(self._fetched), self._flow_run_id
        if not steps or flow_run_id is None:
            return
        try:
            publish(flow_run_id, steps, fetched)
        except Exception as exc:  # the flow's outcome must not depend on its report
            self.logger.warning("could not attach the federation report to flow run %s: %s", flow_run_id, exc)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for live in ("_client", "_client_lock", "_inflight", "_records", "_fetched", "_flow_run_id", "_engine_tasks"):
            state.pop(live, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_live_state()


def _running_session() -> FederationTaskRunner | None:
    """The runner of the flow running in this context, when it is a `FederationTaskRunner`."""
    ctx = FlowRunContext.get()
    runner = ctx.task_runner if ctx else None
    return runner if isinstance(runner, FederationTaskRunner) else None


set_session_lookup(_running_session)
