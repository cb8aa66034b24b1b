"""Timing helpers, a peak sampler, result rows and the description of the machine a run used."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any


@dataclass
class Row:
    """One figure: the median of repeated measurements, and its ratio to the baseline."""

    bench: str
    variant: str
    metric: str
    median: float
    unit: str
    runs: int
    baseline: str | None = None
    ratio: float | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


class SamplingError(RuntimeError):
    """A probe of a :class:`PeakSampler` failed, so its peak is not a measurement."""


class PeakSampler:
    """The highest value of each probe, read by a background thread while a block runs.

    For figures that nothing pushes (the resident memory of other processes)::

        with PeakSampler({"client": lambda: float(psutil.Process().memory_info().rss)}) as sampler:
            work()
        sampler.peaks["client"]

    Probes are read once on entry, every ``interval`` seconds, and once on exit.
    Leaving the block raises :class:`SamplingError` if any probe failed.
    """

    def __init__(self, probes: Mapping[str, Callable[[], float]], interval: float = 0.2) -> None:
        self.probes = dict(probes)
        self.interval = interval
        self.peaks: dict[str, float] = {name: 0.0 for name in self.probes}
        self.samples = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def _sample(self) -> None:
        for name, probe in self.probes.items():
            try:
                self.peaks[name] = max(self.peaks[name], float(probe()))
            except Exception as exc:  # keep sampling the others; leaving the block reports it
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self.errors and exc_type is None:
            raise SamplingError(f"{len(self.errors)} failed readings, first: {self.errors[0]}")


def count_task_runs(api: str, flow_run_id: str, states: list[str] | None = None) -> int:
    """Task runs of a flow run the Prefect API has recorded (in ``states``), counted by the server."""
    import httpx

    body: dict[str, Any] = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    if states:
        body["task_runs"] = {"state": {"type": {"any_": states}}}
    response = httpx.post(f"{api}/task_runs/count", json=body, timeout=30)
    response.raise_for_status()
    return int(response.json())


def with_ratios(rows: list[Row], baseline_variant: str) -> list[Row]:
    """Fill in ratio = median / baseline median for rows of the same bench and metric."""
    base = {(r.bench, r.metric): r.median for r in rows if r.variant == baseline_variant}
    for row in rows:
        reference = base.get((row.bench, row.metric))
        if reference:
            row.baseline = baseline_variant
            row.ratio = row.median / reference
    return rows


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = float("nan")
    packages = {}
    for name in ("prefect", "prefect-dask", "nvflare", "dask", "distributed", "xarray", "zarr", "s3fs"):
        try:
            packages[name] = version(name)
        except Exception:
            packages[name] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "packages": packages,
    }
