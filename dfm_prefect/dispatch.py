"""One task run's remote call: the placement made for it and the wait for its result.

The runner builds a :class:`Dispatch` in the task run's thread before Prefect's
engine starts, and the operation stub's body calls :meth:`Dispatch.execute`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging import get_run_logger
from pydantic_core import PydanticSerializationError, to_jsonable_python

from dfm_prefect.core.errors import FederationError, InvalidParametersError, SiteUnavailableError
from dfm_prefect.core.operations import MOVE, MOVE_OPERATION
from dfm_prefect.core.refs import DataRef
from dfm_prefect.core.wire import ProgressUpdate, RunResult, SiteMessage, b64size, unwrap
from dfm_prefect.placement import Placement
from dfm_prefect.report import ProgressReporter, StepRecord

if TYPE_CHECKING:
    from dfm_prefect.client import FederationClient
    from dfm_prefect.core.operations import Operation
    from dfm_prefect.task_runner import FederationTaskRunner


class OperationTimeoutError(TimeoutError):
    """An operation ran past its task's ``timeout_seconds``; the site was asked to cancel it.

    Prefect's engine reports it as the task run's timeout (state ``TimedOut``) with this message.
    """

    def __repr__(self) -> str:
        # Prefect's engine puts the exception's repr in the state message.
        return f"{type(self).__name__}: {self}"


@dataclass
class Dispatch:
    """The remote side of one operation task run."""

    op: Operation
    runner: FederationTaskRunner
    client: FederationClient | None
    placement: Placement | None
    error: FederationError | None = None
    timeout_s: float | None = None
    failed_sites: set[str] = field(default_factory=set)
    place_again: bool = False
    """Placing failed when the run was submitted (its site was down, say): each retry places it again."""
    named_site: str | None = None
    """The site the flow named (``site=``), which names the run even before it could be placed."""
    attempts: int = 0

    @property
    def run_name(self) -> str:
        return f"{self.op.name}@{self.placement.site if self.placement else self.named_site or '?'}"

    def execute(self, params: dict[str, Any]) -> DataRef:
        """Send the call to its site, wait for the result, return its `DataRef`."""
        site, payload, task_run, flow_ctx = self._call(params)
        logger = get_run_logger()
        progress = _ProgressSlot()
        request_id, future = self.client.run(
            site,
            self.op.name,
            payload,
            version=self.op.version,
            flow_run_id=str(flow_ctx.flow_run.id) if flow_ctx and flow_ctx.flow_run else None,
            task_run_id=str(task_run.id) if task_run else None,
            attempt=task_run.run_count if task_run else 1,
            timeout_s=self.timeout_s,
            on_progress=progress.push,
        )
        future.add_done_callback(lambda _: progress.wake.set())
        self.runner.track(site, request_id, future)
        started = time.monotonic()
        reporter = ProgressReporter(
            flow_ctx.flow_run.id if flow_ctx and flow_ctx.flow_run else None,
            task_run.id if task_run else None,
            f"{self.op.name} at {site}",
        )
        try:
            reply = self._wait(future, progress, reporter)
        except FutureTimeout:
            self.client.cancel(site, request_id)
            raise OperationTimeoutError(
                f"{self.op.name} at site {site!r} did not finish within its timeout of {self.timeout_s:g} s; "
                "the site was asked to cancel it"
            ) from None
        except SiteUnavailableError:
            self.failed_sites.add(site)
            raise
        finally:
            self.runner.untrack(request_id)
        assert isinstance(reply, RunResult)
        moved_from = str(params["ref"].site) if self.op.name == MOVE_OPERATION and isinstance(params.get("ref"), DataRef) else None
        for line in reply.logs:
            logger.log(line.level, "[site %s] %s", site, line.message)
        if reply.cached:
            logger.info("%s: site %s answered from its result cache (the same request on the same inputs ran before)", self.op.name, site)
        self.runner.record(
            StepRecord(
                task_run_id=str(task_run.id) if task_run else request_id,
                task_run_name=task_run.name if task_run else self.run_name,
                op=self.op.name,
                site=site,
                ok=reply.ok,
                duration_s=reply.duration_s if reply.duration_s else time.monotonic() - started,
                bytes_out=b64size(reply.payload) if reply.payload else 0,
                stored_bytes=reply.ref.size if reply.ref and not reply.ref.is_view and not reply.cached else 0,
                error=reply.error.message if reply.error else None,
                view=bool(reply.ref and reply.ref.is_view),
                lineage=reply.ref.lineage() if reply.ref else "",
                moved_from=moved_from,
                moved_bytes=reply.ref.size if moved_from and reply.ref else 0,
                placement=self.placement.reason,
                cached=reply.cached,
            )
        )
        ref = unwrap(reply)
        reporter.finish()
        return ref

    def stream(self, params: dict[str, Any]) -> Iterator[DataRef]:
        """Send a streaming call to its site and yield each item as it arrives (closing the stream stops the site)."""
        site, payload, task_run, flow_ctx = self._call(params)
        logger = get_run_logger()
        stream = self.client.stream(
            site,
            self.op.name,
            payload,
            version=self.op.version,
            timeout_s=self.timeout_s,
            flow_run_id=str(flow_ctx.flow_run.id) if flow_ctx and flow_ctx.flow_run else None,
            task_run_id=str(task_run.id) if task_run else None,
        )
        self.runner.track(site, stream.request_id, stream.done)
        started, bytes_out, error = time.monotonic(), 0, None
        try:
            deadline = None if self.timeout_s is None else started + self.timeout_s
            while True:
                try:
                    item = stream.next(None if deadline is None else max(0.0, deadline - time.monotonic()))
                except StopIteration:
                    break
                except TimeoutError:
                    raise OperationTimeoutError(
                        f"{self.op.name} at site {site!r} did not finish within its timeout of {self.timeout_s:g} s; "
                        "the site was asked to stop it"
                    ) from None
                bytes_out += item.size if item.is_local else 0
                yield item
        except FederationError as exc:
            error = str(exc)
            raise
        finally:
            stream.close()
            self.runner.untrack(stream.request_id)
            reply = stream.result
            if reply is not None:
                for line in reply.logs:
                    logger.log(line.level, "[site %s] %s", site, line.message)
            logger.info("%s at site %s: %d item(s) taken", self.op.name, site, stream.taken)
            self.runner.record(
                StepRecord(
                    task_run_id=str(task_run.id) if task_run else stream.request_id,
                    task_run_name=task_run.name if task_run else self.run_name,
                    op=self.op.name,
                    site=site,
                    ok=error is None,
                    duration_s=time.monotonic() - started,
                    bytes_out=bytes_out,
                    stored_bytes=0,
                    error=error,
                    placement=self.placement.reason if self.placement else "",
                    items=stream.taken,
                )
            )

    def _call(self, params: dict[str, Any]) -> tuple[str, dict[str, Any], Any, Any]:
        """Where the call goes and what it carries: (site, JSON parameters with moved inputs replaced, task run, flow context)."""
        explicit = params.pop("site", None)
        self.attempts += 1
        if self.placement is None and self.place_again and self.attempts > 1:
            self.client = self.runner.client
            self.placement = self.client.place(self.op.name, data=[params.get(name) for name in self.op.data_fields], explicit=explicit)
            self.error = None
        if self.error is not None:
            raise self.error
        assert self.client is not None and self.placement is not None
        logger = get_run_logger()
        try:
            payload = to_jsonable_python(params)
        except PydanticSerializationError as exc:
            raise InvalidParametersError(
                f"parameters of {self.op.name!r} must be JSON values or DataRefs: {exc}"
            ) from None

        site, moves = self.placement.site, self.placement.moves
        if site in self.failed_sites:
            moved = self.client.place(
                self.op.name,
                data=[params.get(name) for name in self.op.data_fields],
                explicit=explicit,
                exclude=self.failed_sites,
            )
            if moved.site != site:
                logger.info("site %s failed earlier; this attempt runs at %s (%s)", site, moved.site, moved.reason)
            site, moves = moved.site, moved.moves
        if moves:
            logger.info("%s runs at %s: %s", self.op.name, site, self.placement.reason)
            payload = _replace_refs(payload, {ref.uri: self._move(ref, site) for ref in moves})

        task_ctx = TaskRunContext.get()
        flow_ctx = FlowRunContext.get()
        task_run = task_ctx.task_run if task_ctx else None
        if task_run is not None:
            # Tags added here reach the API with the run's next state event. Tags set
            # before the run starts would make Prefect check tag concurrency limits
            # through the API for every run, which costs more than the remote call.
            task_run.tags = sorted({*task_run.tags, f"op:{self.op.name}", f"site:{site}"})
        return site, payload, task_run, flow_ctx

    def _move(self, ref: DataRef, site: str) -> DataRef:
        """Bring ``ref`` to ``site`` as a task run of its own (``move@north→gpu-hub``), with this task run's retries."""
        task_ctx = TaskRunContext.get()
        retries = task_ctx.task.retries if task_ctx is not None else 0
        mover = move_task.with_options(retries=retries, timeout_seconds=None)
        moved: DataRef = mover(ref=ref, source=ref.site, target=site, timeout_s=self.timeout_s)
        return moved

    def _wait(self, future: Future[SiteMessage], progress: _ProgressSlot, reporter: ProgressReporter) -> SiteMessage:
        """Wait for the reply within the task's timeout, mirroring progress reports meanwhile."""
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while not future.done():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise FutureTimeout()
            progress.wake.wait(remaining)
            progress.wake.clear()
            latest = progress.latest
            if latest is not None and not future.done():
                reporter.update(latest.fraction)
        return future.result()


class _ProgressSlot:
    """The latest progress report of one request, and an event that wakes its waiter."""

    def __init__(self) -> None:
        self.latest: ProgressUpdate | None = None
        self.wake = threading.Event()

    def push(self, update: ProgressUpdate) -> None:
        self.latest = update
        self.wake.set()


def _replace_refs(value: Any, moved: dict[str, DataRef]) -> Any:
    """``value`` (JSON-ready parameters) with each moved reference replaced by its copy at the new site."""
    if isinstance(value, dict):
        uri = value.get("uri")
        if isinstance(uri, str) and uri in moved and {"site", "sha256"} <= set(value):
            return moved[uri].model_dump(mode="json")
        return {key: _replace_refs(item, moved) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_refs(item, moved) for item in value]
    return value


@task(name=MOVE_OPERATION, task_run_name="move@{source}→{target}", cache_policy=NO_CACHE)
def move_task(ref: DataRef, source: str, target: str, timeout_s: float | None = None) -> DataRef:
    """Move a result from the site that holds it to another site, site to site (the client never holds the bytes)."""
    flow_ctx = FlowRunContext.get()
    runner = getattr(flow_ctx, "task_runner", None) if flow_ctx else None
    if not getattr(runner, "dispatches_operations", False):
        raise FederationError("a move runs inside a flow on FederationTaskRunner")
    task_ctx = TaskRunContext.get()
    if task_ctx is not None:
        task_ctx.task_run.tags = sorted({*task_ctx.task_run.tags, f"op:{MOVE_OPERATION}", f"site:{source}", f"site:{target}"})
    dispatch = Dispatch(
        op=MOVE, runner=runner, client=runner.client, placement=Placement(target, f"moves a result from {source}"), timeout_s=timeout_s
    )
    return dispatch.execute({"ref": ref})
