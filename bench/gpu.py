"""dask-cuda against CPU Dask: the same site operations on the same >= 10 GB field.

A float32 (time, lat, lon) field is generated chunk by chunk on the host (NumPy,
seeded per chunk, so both clusters hold bit-identical data), moved to the
device on the GPU cluster, and persisted in the cluster's memory. Generation and
persisting are *outside* the timed region (reported separately): the timings
are the reductions alone, run through the real operations (`xarray.moments` with
area weights, `xarray.histogram`, `xarray.reduce` mean over time) on the real
backends (`site_workers.compute`): a `dask_cuda.LocalCUDACluster` with CuPy
chunks, and a `distributed.LocalCluster` of worker processes on every core.

    python -m bench.gpu --size-gb 10 --out gpu.json          # on a GPU machine
    python -m bench.gpu --size-gb 0.2 --force-cpu --out x.json  # the CPU path alone (dry run)
    python -m bench.gpu --verify-wheels .whl                  # are the carried wheels complete?

`python -m bench --only gpu` runs it too, with a smaller field (set DFM_BENCH_GPU_GB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import Row

NLAT, NLON, STEPS_PER_CHUNK = 1024, 1024, 32  # 128 MiB float32 chunks
PREINSTALLED = {
    # Already on the lent GPU machines (python3 3.12): no need to carry these.
    "numpy", "pandas", "xarray", "fsspec", "pyarrow", "h5py", "pyyaml", "psutil", "msgpack", "cloudpickle",
    "toolz", "click", "jinja2", "sortedcontainers", "typer", "rich", "pytest", "hypothesis", "nvidia-ml-py",
    "cupy-cuda13x", "cuda-core", "packaging", "typing-extensions", "urllib3", "numba", "pytest-timeout",
}
NOT_NEEDED = {
    # rapids-dask-dependency only pins dask's version and installs an import hook with no patches;
    # bokeh serves the dashboard, which the site clusters turn off.
    "rapids-dask-dependency", "bokeh",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _block(block_info: Any = None) -> np.ndarray:
    """One chunk of the field: a latitude profile, a seasonal cycle and seeded noise."""
    info = block_info[None]
    (t0, t1), (y0, y1), (x0, x1) = info["array-location"]
    lat = np.linspace(-89.9, 89.9, NLAT)[y0:y1]
    day = np.arange(t0, t1)
    rng = np.random.default_rng([7, *info["chunk-location"]])
    noise = rng.standard_normal((t1 - t0, y1 - y0, x1 - x0), dtype=np.float32)
    base = 300.0 - 40.0 * np.sin(np.deg2rad(lat)) ** 2
    cycle = 10.0 * np.cos(2 * np.pi * day / 365.25)
    return (base[None, :, None] + cycle[:, None, None] + 3.0 * noise).astype(np.float32)


def field(size_gb: float) -> Any:
    """A lazy (time, lat, lon) float32 dataset of at least ``size_gb`` GB (1e9 bytes)."""
    import dask.array as da
    import xarray as xr

    step_bytes = NLAT * NLON * 4
    steps = math.ceil(size_gb * 1e9 / step_bytes / STEPS_PER_CHUNK) * STEPS_PER_CHUNK
    data = da.map_blocks(_block, chunks=((STEPS_PER_CHUNK,) * (steps // STEPS_PER_CHUNK), (NLAT,), (NLON,)), dtype=np.float32)
    return xr.Dataset(
        {"temperature": (("time", "lat", "lon"), data)},
        coords={"time": np.arange(steps), "lat": np.linspace(-89.9, 89.9, NLAT), "lon": np.linspace(0.1, 359.9, NLON)},
    )


class _Context:
    """What an operation needs from a site, over an already persisted dataset."""

    def __init__(self, backend: Any, ds: Any) -> None:
        self.compute_backend = backend
        self._ds = ds

    def open_dataset(self, data: Any) -> Any:
        return self._ds

    def compute(self, *collections: Any) -> tuple[Any, ...]:
        return self.compute_backend.compute(*collections)


def _operations() -> dict[str, tuple[Any, dict[str, Any]]]:
    from adapters.xarray_ops import histogram, moments, reduce

    return {
        "moments (area-weighted, all dims)": (moments, {"dims": ["time", "lat", "lon"], "weights": "area"}),
        "histogram (100 bins)": (histogram, {"bins": {"start": 240, "stop": 340, "count": 100}}),
        "mean over time": (reduce, {"dims": ["time"], "stat": "mean"}),
    }


def run_backend(kind: str, size_gb: float, rounds: int) -> dict[str, Any]:
    """Start the backend, persist the field in its memory, time each operation ``rounds`` times."""
    from distributed import futures_of, wait

    from site_workers.compute import make_backend
    from site_workers.config import ComputeConfig

    cores = os.cpu_count() or 1
    if kind == "gpu":
        config = ComputeConfig(kind="gpu", threads_per_worker=min(8, cores))
    else:
        workers = max(1, min(4, cores // 4))
        config = ComputeConfig(kind="cpu", workers=workers, threads_per_worker=max(1, cores // workers))
    t0 = time.perf_counter()
    backend = make_backend(config)
    out: dict[str, Any] = {"backend": backend.name, "config": config.model_dump(exclude_none=True)}
    out["start_s"] = time.perf_counter() - t0
    log(f"{kind}: cluster up in {out['start_s']:.1f}s")
    try:
        ds = field(size_gb)
        out["bytes"] = int(ds.nbytes)
        t0 = time.perf_counter()
        persisted = backend.client.persist(backend.to_device(ds))
        with backend.client.as_current():
            wait(futures_of(persisted))
        out["generate_and_persist_s"] = time.perf_counter() - t0
        log(f"{kind}: {ds.nbytes / 1e9:.2f} GB generated and persisted in {out['generate_and_persist_s']:.1f}s")
        ctx = _Context(backend, persisted)
        out["ops"] = {}
        results = {}
        for label, (op, params) in _operations().items():
            model = op.params(data="field", **params)
            times = []
            try:
                for i in range(rounds + 1):
                    t0 = time.perf_counter()
                    value = op.run(model, ctx)
                    elapsed = time.perf_counter() - t0
                    if i:  # the first run warms up kernels and caches
                        times.append(elapsed)
            except Exception as exc:  # recorded in the figures; the other operations still run
                out["ops"][label] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                log(f"{kind}: {label} FAILED: {type(exc).__name__}: {exc}")
                continue
            results[label] = value
            median = float(np.median(times))
            out["ops"][label] = {"seconds": times, "median_s": median, "GB_per_s": ds.nbytes / 1e9 / median}
            log(f"{kind}: {label}: median {median:.3f}s over {len(times)} runs ({ds.nbytes / 1e9 / median:.1f} GB/s)")
        out["results"] = results
    finally:
        backend.close()
    return out


def compare(gpu: dict[str, Any], cpu: dict[str, Any]) -> dict[str, Any]:
    """Largest relative difference between the two backends' answers, per operation."""
    diffs = {}
    for label, a in gpu["results"].items():
        b = cpu["results"].get(label)
        if b is None:
            continue
        worst = 0.0
        for name in a.data_vars:
            x, y = np.asarray(a[name].values, dtype="float64"), np.asarray(b[name].values, dtype="float64")
            scale = np.maximum(np.abs(y), 1e-300)
            worst = max(worst, float(np.nanmax(np.abs(x - y) / scale)) if x.size else 0.0)
        diffs[label] = worst
    return diffs


def verify_wheels(folder: Path, preinstalled: set[str] = PREINSTALLED) -> list[str]:
    """Requirements of the carried wheels that are neither carried nor already installed there."""
    import re
    import zipfile

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    environment = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}
    carried: dict[str, str] = {}
    requirements: list[tuple[str, Requirement]] = []
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            text = archive.read(meta).decode()
        name = canonicalize_name(re.search(r"^Name: (.+)$", text, re.M).group(1).strip())
        if name in carried:
            raise SystemExit(f"two wheels of {name}: keep one ({wheel.name})")
        carried[name] = re.search(r"^Version: (.+)$", text, re.M).group(1).strip()
        for line in re.findall(r"^Requires-Dist: (.+)$", text, re.M):
            requirements.append((name, Requirement(line)))
    known = {canonicalize_name(n) for n in preinstalled | NOT_NEEDED}
    missing = []
    for owner, req in requirements:
        if req.marker is not None and not req.marker.evaluate(environment):
            continue
        name = canonicalize_name(req.name)
        if name in carried:
            if not req.specifier.contains(carried[name], prereleases=True):
                missing.append(f"{owner} needs {req}, carried {carried[name]}")
        elif name not in known:
            missing.append(f"{owner} needs {req}")
    return missing


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts of a pytest JUnit report, with the name and first line of each failure."""
    import xml.etree.ElementTree as ET

    cases = list(ET.parse(path).getroot().iter("testcase"))
    failed = {}
    skipped = 0
    for case in cases:
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failed[case.get("name", "?")] = (problem.get("message") or "").splitlines()[0][:300] if problem.get("message") else ""
        elif case.find("skipped") is not None:
            skipped += 1
    return {"total": len(cases), "passed": len(cases) - len(failed) - skipped, "skipped": skipped, "failed": failed}


def run(env: Any = None, *, rounds: int = 3, size_gb: float | None = None) -> list[Row]:
    """Benchmark rows for `python -m bench`: one per backend and operation (none without a GPU)."""
    from site_workers.compute import gpu_unavailable

    size = size_gb or float(os.environ.get("DFM_BENCH_GPU_GB", "10"))
    reason = gpu_unavailable()
    if reason is not None:
        recorded = Path(__file__).with_name("results-gpu.json")
        if recorded.exists():
            # No GPU here: show the figures the GPU check recorded, saying where they come from.
            return rows_from_report(json.loads(recorded.read_text()), note=f"recorded by scripts/gpu_check.sh, {recorded.name}")
        return [Row("gpu", "dask-cuda", "skipped", float("nan"), "", 0, note=reason[:120])]
    return rows_from_report({"gpu": run_backend("gpu", size, rounds), "cpu": run_backend("cpu", size, rounds), "rounds": rounds})


def rows_from_report(report: dict[str, Any], note: str = "") -> list[Row]:
    """Benchmark rows from a GPU report (this run's, or the one scripts/gpu_check.sh wrote)."""
    gpu, cpu, rounds = report["gpu"], report["cpu"], report["rounds"]
    device = report.get("device", "")
    rows = []
    for label in gpu["ops"]:
        base = cpu["ops"][label]["median_s"]
        for variant, data in (("CPU Dask (LocalCluster)", cpu), ("dask-cuda (LocalCUDACluster)", gpu)):
            median = data["ops"][label]["median_s"]
            suffix = f", {device}" if device else ""
            rows.append(Row("gpu", variant + suffix, f"{label}, {data['bytes'] / 1e9:.1f} GB", median, "s", rounds,
                            baseline="CPU Dask (LocalCluster)" + suffix, ratio=median / base, note=note))
    return rows


def _attempt(report: dict[str, Any], kind: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """One backend's figures, or its error recorded in the report (the other backend still runs)."""
    try:
        return run_backend(kind, args.size_gb, args.rounds)
    except Exception as exc:  # recorded in the figures, with the traceback in the log
        import traceback

        traceback.print_exc()
        report[f"{kind}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("numpy", "xarray", "dask", "distributed", "dask-cuda", "cupy-cuda13x", "cupy-cuda12x", "zarr"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--force-cpu", action="store_true", help="run only the CPU backend (what a machine without a GPU can check)")
    parser.add_argument("--verify-wheels", type=Path, help="check a folder of wheels and exit")
    parser.add_argument("--tests-xml", type=Path, help="a pytest JUnit report to summarize in the figures")
    args = parser.parse_args(argv)
    if args.verify_wheels:
        missing = verify_wheels(args.verify_wheels)
        print("\n".join(missing) or f"every requirement of {args.verify_wheels}/*.whl is carried or preinstalled")
        return 1 if missing else 0

    from site_workers.compute import gpu_unavailable

    report: dict[str, Any] = {"size_gb": args.size_gb, "rounds": args.rounds, "timed": "reductions only; generation and persist reported apart"}
    reason = "forced with --force-cpu" if args.force_cpu else gpu_unavailable()
    report["gpu_unavailable"] = reason
    report["versions"] = _versions()
    gpu = cpu = None
    if reason is None:
        import cupy

        report["device"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        gpu = _attempt(report, "gpu", args)
    else:
        log(f"no GPU run: {reason}")
    cpu = _attempt(report, "cpu", args)
    if gpu is not None and cpu is not None:
        report["max_rel_diff_gpu_vs_cpu"] = compare(gpu, cpu)
        report["speedup"] = {
            label: cpu["ops"][label]["median_s"] / gpu["ops"][label]["median_s"]
            for label in gpu["ops"]
            if "median_s" in gpu["ops"][label] and "median_s" in cpu["ops"].get(label, {})
        }
    if args.tests_xml and args.tests_xml.exists():
        report["tests"] = junit_summary(args.tests_xml)
    for name, data in (("gpu", gpu), ("cpu", cpu)):
        if data is not None:
            data.pop("results")
            report[name] = data
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if cpu is not None and (gpu is not None or reason is not None) else 1


if __name__ == "__main__":
    raise SystemExit(main())
