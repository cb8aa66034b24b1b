"""Timing helpers, result rows and the description of the machine a run used."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
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
