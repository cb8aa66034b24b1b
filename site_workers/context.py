"""What an operation sees while it runs at a site."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dfm_prefect.core.errors import AccessDeniedError, FederationError, RequestCancelledError
from dfm_prefect.core.refs import DataRef
from dfm_prefect.core.wire import LogLine
from site_workers.answers import wire_text
from site_workers.compute import ComputeBackend
from site_workers.config import DisclosurePolicy, UserCodePolicy
from site_workers.disclosure import DisclosureRules, smallest_group
from site_workers.opened import OpenedSources
from site_workers.readers import open_location
from site_workers.sources import SourceResolver
from site_workers.store import ResultStore
from site_workers.summaries import summarize

if TYPE_CHECKING:
    from site_workers.fusion import FusedMember
    from site_workers.views import Views

OPS_LOGGER = "dfm_prefect.site.ops"
_lines: contextvars.ContextVar[list[LogLine] | None] = contextvars.ContextVar("dfm_site_log_lines", default=None)
_LOG_LIMIT = 8192
_PROGRESS_LIMIT = 512
_redact: contextvars.ContextVar[Callable[[str], str] | None] = contextvars.ContextVar("dfm_site_redact", default=None)


class _RedactingFilter(logging.Filter):
    """Masks the site's credentials in what an operation logs, before any handler (the site's log included) sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact = _redact.get()
        if redact is not None:
            record.msg, record.args = redact(record.getMessage()), None
        return True


class _CapturingHandler(logging.Handler):
    """Collects the log lines of the operation running in the current thread, masked before they are cut.

    (Records of child loggers reach this handler without passing the filter above.)
    """

    def emit(self, record: logging.LogRecord) -> None:
        lines = _lines.get()
        if lines is not None:
            redact = _redact.get() or str
            message = wire_text(redact(record.getMessage()), _LOG_LIMIT)
            lines.append(LogLine(level=record.levelno, message=message, time=record.created))


logging.getLogger(OPS_LOGGER).addFilter(_RedactingFilter())
logging.getLogger(OPS_LOGGER).addHandler(_CapturingHandler(logging.INFO))
logging.getLogger(OPS_LOGGER).setLevel(logging.INFO)


class SiteContext:
    """Data access, compute and logging for one operation run."""

    def __init__(
        self,
        *,
        site: str,
        request_id: str,
        resolver: SourceResolver,
        store: ResultStore,
        compute: ComputeBackend,
        views: Views | None = None,
        opened: OpenedSources | None = None,
        cancelled: threading.Event,
        stopped: Callable[[], FederationError | None] | None = None,
        on_progress: Callable[[float, str], None] | None = None,
        user_code: UserCodePolicy | None = None,
        redact: Callable[[str], str] | None = None,
        disclosure: DisclosureRules | None = None,
        fusion: FusedMember | None = None,
    ) -> None:
        self.site = site
        self._fusion = fusion
        self.request_id = request_id
        self._resolver = resolver
        self._store = store
        self._views = views
        self._opened = opened
        self._compute = compute
        self._cancelled = cancelled
        self._stopped = stopped
        self._on_progress = on_progress
        self._redact = redact
        self._disclosure = disclosure or DisclosureRules(DisclosurePolicy())
        self.contributors: int | None = None
        """The smallest non-empty group the operation counted (`count_groups`); None until it counts."""
        self.user_code = user_code or UserCodePolicy()
        """The site's rules for running code sent by clients (``code.python``); disabled unless opted in."""
        self._last_progress = 0.0
        self.logs: list[LogLine] = []
        self.log = logging.getLogger(OPS_LOGGER)
        self.started = time.monotonic()

    @contextmanager
    def capturing_logs(self) -> Iterator[None]:
        """Collect what the operation logs (through ``ctx.log``) into :attr:`logs`, credentials masked."""
        token = _lines.set(self.logs)
        redact_token = _redact.set(self._redact)
        try:
            yield
        finally:
            _redact.reset(redact_token)
            _lines.reset(token)

    # -- data ---------------------------------------------------------------------

    def open(self, data: DataRef | str) -> Any:
        """Open a `DataRef` held here or a data source, lazily (xarray or Dask dataframe)."""
        self.check_cancelled()
        if isinstance(data, DataRef):
            if data.is_view:
                if self._views is None:
                    raise AccessDeniedError(f"{data!r} is a view, and views are not opened here")
                return self._views.open(data, self)
            return self._store.open_value(data)
        location = self._resolver.resolve(data)
        return self._opened.open(location) if self._opened is not None else open_location(location)

    def open_dataset(self, data: DataRef | str) -> Any:
        """Like :meth:`open`, and insist on an xarray Dataset."""
        import xarray as xr

        value = self.open(data)
        if isinstance(value, xr.DataArray):
            value = value.to_dataset(name=value.name or "value")
        if not isinstance(value, xr.Dataset):
            raise AccessDeniedError(f"{data!r} is not gridded data (got {type(value).__name__})")
        return value

    # -- compute ------------------------------------------------------------------

    def compute(self, *collections: Any) -> tuple[Any, ...]:
        """Compute Dask collections on the site's compute backend, reporting progress.

        The first computation of a request that came with others in one frame runs
        together with theirs (`site_workers.fusion`): chunks they share are read once.
        """
        self.check_cancelled()
        member, self._fusion = self._fusion, None
        if member is not None:
            shared = member.compute(collections, self._compute_now)
            if shared is not None:
                return shared
        return self._compute_now(collections)

    def _compute_now(self, collections: tuple[Any, ...]) -> tuple[Any, ...]:
        with _DaskProgress(self):
            return tuple(self._compute.compute(*collections))

    def to_device(self, value: Any) -> Any:
        """``value`` with its chunks on the site's compute device (CuPy on GPU sites, unchanged elsewhere)."""
        return self._compute.to_device(value)

    def describe(self, value: Any) -> dict[str, Any]:
        """A metadata summary of a value (dims, coordinate ranges, dtypes; no data read)."""
        return summarize(value)

    def count_groups(self, *counts: Any) -> None:
        """Record how many records or cells went into each group of the result; the site keeps the smallest."""
        smallest = smallest_group(*counts)
        self.contributors = smallest if self.contributors is None else min(self.contributors, smallest)

    def check_selection(self, kept: int, total: int, *, unit: str = "rows") -> None:
        """Refuse (`DisclosureRefusedError`) a selection that keeps, or leaves out, too few ``unit``."""
        self._disclosure.check_selection(int(kept), int(total), unit, site=self.site)

    def progress(self, fraction: float, message: str = "") -> None:
        """Tell the client how far the operation has come (0..1); sent at most twice a second."""
        now = time.monotonic()
        fraction = min(max(float(fraction), 0.0), 1.0)
        if self._on_progress is None or (now - self._last_progress < 0.5 and fraction < 1.0):
            return
        self._last_progress = now
        self._on_progress(fraction, wire_text(self.mask(message), _PROGRESS_LIMIT))  # masked before it is cut

    def mask(self, text: str) -> str:
        """``text`` with the site's credentials masked (do this before cutting text that may leave the site)."""
        return self._redact(text) if self._redact is not None else text

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, waking at once (and raising) if the request is cancelled; reports progress."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            # Wake every half second only to report progress; cancellation wakes at once.
            if self._cancelled.wait(min(left, 0.5)):
                self.check_cancelled()
            self.progress(1.0 - max(deadline - time.monotonic(), 0.0) / seconds if seconds else 1.0)

    def wait_cancelled(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True as soon as the client cancels this request."""
        return self._cancelled.wait(timeout)

    def check_cancelled(self) -> None:
        """Raise if the client cancelled this request or the site stopped it (its timeout); call between long steps."""
        if self._cancelled.is_set():
            stop = self._stopped() if self._stopped is not None else None
            raise stop if stop is not None else RequestCancelledError("the request was cancelled by the client", site=self.site)


class _DaskProgress:
    """Reports finished Dask tasks as progress (local schedulers; a no-op elsewhere)."""

    def __init__(self, ctx: SiteContext) -> None:
        self._ctx = ctx
        self._callback: Any = None

    def __enter__(self) -> _DaskProgress:
        if self._ctx._on_progress is None:
            return self
        from dask.callbacks import Callback

        ctx = self._ctx
        state = {"total": 0, "done": 0}
        # Dask callbacks are process-wide; the local schedulers call them in the
        # thread that called compute, so each operation keeps to its own thread.
        owner = threading.get_ident()

        def start_state(_dsk: Any, dask_state: dict[str, Any]) -> None:
            if threading.get_ident() == owner:
                state["total"] = max(1, sum(len(dask_state[key]) for key in ("ready", "waiting")))

        def posttask(*_args: Any) -> None:
            if threading.get_ident() != owner:
                return
            state["done"] += 1
            ctx.progress(state["done"] / state["total"], f"{state['done']} of {state['total']} chunks")
            ctx.check_cancelled()

        self._callback = Callback(start_state=start_state, posttask=posttask)
        self._callback.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._callback is not None:
            self._callback.__exit__(*exc)
