"""What a flow run did in the federation, published as Prefect artifacts.

At the end of each flow run that ran operations, `FederationTaskRunner` adds two
artifacts to the run: a table of where every step ran, how long it took and what
it sent back, and a markdown summary of the bytes that left each site. During a
long operation, the site's progress reports update a progress artifact of the
task run.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

log = logging.getLogger("dfm_prefect.report")


@dataclass(frozen=True)
class StepRecord:
    """Where one operation ran and what it cost: a row of the flow-run report."""

    task_run_id: str
    task_run_name: str
    op: str
    site: str
    ok: bool
    duration_s: float
    bytes_out: int
    stored_bytes: int
    error: str | None = None
    view: bool = False
    """The result is a view: the site keeps its recipe, not a copy."""
    lineage: str = ""
    """What was done to which source, as one line."""
    moved_from: str | None = None
    """For a move: the site the result came from (``site`` received it)."""
    moved_bytes: int = 0
    """For a move: the bytes that went from ``moved_from`` to ``site``, never through the client."""
    placement: str = ""
    """Why the step ran at ``site`` (for a step whose inputs moved: the candidates and the bytes each would move)."""
    cached: bool = False
    """The site answered from its result cache: the same request on the same inputs ran before."""
    items: int | None = None
    """For a streaming operation: the items the flow took."""


def bytes_by_site(steps: Iterable[StepRecord], fetched: Counter[str]) -> Counter[str]:
    """Bytes that left each site for the client: values sent back with results plus values fetched later."""
    total: Counter[str] = Counter(fetched)
    for step in steps:
        total[step.site] += step.bytes_out
    return total


def moved_between_sites(steps: Iterable[StepRecord]) -> Counter[tuple[str, str]]:
    """Bytes that went from one site to another (moves), by (from, to)."""
    total: Counter[tuple[str, str]] = Counter()
    for step in steps:
        if step.ok and step.moved_from:
            total[(step.moved_from, step.site)] += step.moved_bytes
    return total


def summary_markdown(steps: list[StepRecord], fetched: Counter[str]) -> str:
    moves = moved_between_sites(steps)
    sites = sorted({step.site for step in steps} | set(fetched) | {site for pair in moves for site in pair})
    left = bytes_by_site(steps, fetched)
    lines = [
        "# Federation report",
        "",
        f"{len(steps)} operations on {len(sites)} site(s); {sum(not s.ok for s in steps)} failed attempts"
        f"{f'; {cached} answered from a site result cache' if (cached := sum(s.cached for s in steps)) else ''}.",
        "",
        "| site | operations | seconds at the site | bytes stored at the site | bytes to the client | bytes to other sites | bytes from other sites |",
        "|---|---|---|---|---|---|---|",
    ]
    for site in sites:
        mine = [step for step in steps if step.site == site]
        sent = sum(n for (frm, _), n in moves.items() if frm == site)
        received = sum(n for (_, to), n in moves.items() if to == site)
        lines.append(
            f"| {site} | {len(mine)} | {sum(s.duration_s for s in mine):.2f} | "
            f"{sum(s.stored_bytes for s in mine):,} | {left[site]:,} | {sent:,} | {received:,} |"
        )
    if moves:
        lines += ["", "## Moves between sites", "", "Site to site, never through the client.", "", "| from | to | bytes |", "|---|---|---|"]
        lines += [f"| {frm} | {to} | {n:,} |" for (frm, to), n in sorted(moves.items())]
    done = [step for step in steps if step.ok and step.lineage]
    if done:
        lines += [
            "",
            "## Lineage",
            "",
            "What each result is: the sources and the steps that made it. A *view* is kept at its site as this recipe "
            "and recomputed where it is used, not stored.",
            "",
            "| step | site | result | lineage |",
            "|---|---|---|---|",
        ]
        for step in done:
            lineage = step.lineage.replace("|", "\\|")
            lines.append(f"| {step.task_run_name} | {step.site} | {'view' if step.view else 'cached' if step.cached else 'stored'} | {lineage} |")
    return "\n".join(lines)


def publish(flow_run_id: uuid.UUID, steps: list[StepRecord], fetched: Counter[str]) -> None:
    """Attach the table and the summary to the flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    rows = [{**asdict(step), "duration_s": round(step.duration_s, 4)} for step in steps]
    with get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(type="table", data=json.dumps(rows), description="Where each operation ran", flow_run_id=flow_run_id)
        )
        client.create_artifact(
            ArtifactCreate(
                type="markdown",
                data=summary_markdown(steps, fetched),
                description="Bytes that left each site",
                flow_run_id=flow_run_id,
            )
        )


SHOW_PROGRESS_AFTER_S = 1.0
"""An operation shows a progress artifact once it has run this long (a quick one costs no API calls)."""
_ARTIFACTS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfm-progress")
"""Progress artifacts are written here, in order, never in the thread that waits for the site (a slow
Prefect API must not hold a task past its timeout)."""


class ProgressReporter:
    """Mirrors a site's progress reports into a progress artifact of the task run (at most once a second)."""

    def __init__(self, flow_run_id: uuid.UUID | None, task_run_id: uuid.UUID | None, description: str) -> None:
        self.flow_run_id = flow_run_id
        self.task_run_id = task_run_id
        self.description = description
        self.artifact_id: uuid.UUID | None = None
        self._started = time.monotonic()
        self._last = 0.0
        self._pending: Future[None] | None = None

    def finish(self) -> None:
        """Show 100% once the operation succeeded (only if progress was shown at all), and wait for it to be written."""
        if self._pending is None:
            return
        self.update(1.0, force=True)
        with contextlib.suppress(Exception):  # a progress bar is never worth failing the task run for
            self._pending.result(timeout=10)

    def update(self, fraction: float, *, force: bool = False) -> None:
        if self.task_run_id is None:
            return
        now = time.monotonic()
        if not force and (now - self._last < 1.0 or now - self._started < SHOW_PROGRESS_AFTER_S):
            return
        self._last = now
        # In the task's context: its Prefect settings (the API it talks to) come along.
        self._pending = _ARTIFACTS.submit(contextvars.copy_context().run, self._write, fraction)

    def _write(self, fraction: float) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        try:
            with get_client(sync_client=True) as client:
                if self.artifact_id is None:
                    artifact = client.create_artifact(
                        ArtifactCreate(
                            type="progress",
                            data=fraction * 100,
                            description=self.description,
                            flow_run_id=self.flow_run_id,
                            task_run_id=self.task_run_id,
                        )
                    )
                    self.artifact_id = artifact.id
                else:
                    client.update_artifact(self.artifact_id, ArtifactUpdate(data=fraction * 100))
        except Exception as exc:
            log.debug("progress artifact not written: %s", exc)
