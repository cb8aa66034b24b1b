"""Moves between sites: throughput against a TLS socket copy, reliability, and NVIDIA DFM's two-site pipeline.

Two sites on 127.0.0.1, once per transport (local, then FLARE): ``north`` holds
a float32 zarr source of ``max(DFM_BENCH_MOVES_MB)`` MB (one time step is
exactly 1,000,000 bytes) and the benchmark grid of the DFM head-to-head;
``hub`` holds nothing and accepts datasets from north.

1. *Throughput.* For each size N MB of ``DFM_BENCH_MOVES_MB`` (default
   10,100,1000) north stores the first N time steps with ``xarray.write``
   (netCDF, a stored result, not a view) and hub runs ``dfm.move`` on it, timed
   at the client from the request to hub's stored copy. Against it, in the same
   run and alternating with the local transport's moves, a plain TLS copy of the
   same stored file over loopback: one sender process reads it in 4 MiB pieces,
   one receiver process writes them to a file (no hashing, no policy). Peak
   resident memory of each site's processes (local: the site process; FLARE: its
   FLARE client and mesh-job process) is sampled every 50 ms during each move.
   Each size is checked once per transport: the mean of hub's copy equals the
   mean at north.
2. *Reliability.* The 10 MB result moved 20 times one after another and 20
   times at once (20 client threads; each site runs 4 operations at a time), each
   with a deadline; a move that fails, hangs past it or returns a copy of
   another size counts as failed.
3. *Two-site pipeline.* Cut a box of the 24×90×180 grid at one site, take the
   mean at another, the number to the client: NVIDIA DFM (nv-dfm-core, its local
   and FLARE POC targets, in its own virtual environment) with Load/Subset at
   ``datasite`` and Mean at ``hubsite``; dfm-prefect with ``xarray.subset`` at
   north (a view) and ``xarray.reduce`` at hub (``site="hub"``: the box is
   materialized at north and moved north→hub), per execution as one flow run
   each and inside one running flow.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from bench import peer_dfm
from bench.env import BenchEnv
from bench.harness import PeakSampler, Row, median

LAT, LON = 250, 1000
STEP_BYTES = LAT * LON * 4
"""One time step of the source: exactly 1 MB of float32."""
SIZES_ENV = "DFM_BENCH_MOVES_MB"
RELIABILITY = 20
RELIABLE_MB = 10
MOVE_TIMEOUT = 1800.0
RELIABLE_TIMEOUT = 300.0
TLS = "TLS socket copy"
MiB = 1 << 20


def sizes_mb() -> list[int]:
    return [int(part) for part in os.environ.get(SIZES_ENV, "10,100,1000").split(",") if part.strip()]


def make_source(path: Path, steps: int) -> None:
    """A float32 zarr of ``steps`` × 250 × 1000 random values (uncompressed, 10 steps per chunk)."""
    import dask.array as da
    import numpy as np
    import xarray as xr

    data = da.random.default_rng(0).random((steps, LAT, LON), chunks=(10, LAT, LON), dtype=np.float32)
    ds = xr.Dataset(
        {"x": (("time", "lat", "lon"), data)},
        coords={"time": np.arange(steps), "lat": np.linspace(-89.5, 89.5, LAT), "lon": np.linspace(0.0, 359.5, LON)},
    )
    ds.to_zarr(path, mode="w", zarr_format=2, consolidated=True, encoding={"x": {"compressors": None}})


def site_configs(root: Path, sources: dict[str, list[dict]]) -> list[Path]:
    export = {"kinds": ["aggregate", "value"], "max_bytes": 1 << 20, "inline_bytes": 256 << 10}
    configs = {
        "north": {
            "operations": ["core.echo", "xarray.subset", "xarray.write", "xarray.reduce"],
            "sources": sources["north"],
            "export": {**export, "sites": {"hub": {"kinds": ["dataset"], "max_bytes": 4 << 30}}},
        },
        "hub": {
            "operations": ["core.echo", "xarray.reduce", "xarray.moments"],
            "sources": [],
            "export": export,
            "imports": {"sites": {"north": {"kinds": ["dataset"], "max_bytes": 4 << 30}}, "quota_bytes": 1 << 40},
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, config in configs.items():
        config.update(name=name, result_store={"url": f"file://{root / 'store' / name}"}, limits={"concurrency": 4})
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        paths.append(path)
    return paths


# ---------------------------------------------------------------- TLS ceiling

_TLS_PEER = r"""
import os, socket, ssl, sys, time
role, cert, key, path = sys.argv[1:5]
PIECE = 4 << 20
if role == "recv":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    raw, _ = listener.accept()
    start = time.perf_counter()
    conn = ctx.wrap_socket(raw, server_side=True)
    received = 0
    with open(path, "wb") as out:
        while True:
            data = conn.recv(PIECE)
            if not data:
                break
            out.write(data)
            received += len(data)
    seconds = time.perf_counter() - start
    conn.unwrap()
    print(received, seconds, flush=True)
else:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cert)
    ctx.check_hostname = False
    port = int(sys.argv[5])
    with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw) as conn, open(path, "rb") as src:
        while True:
            data = src.read(PIECE)
            if not data:
                break
            conn.sendall(data)
        conn.unwrap()
"""


def throwaway_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (EC P-256), for the TLS copy only."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def tls_copy(source: Path, cert: Path, key: Path, scratch: Path) -> float:
    """Seconds from the receiver's accept to the last byte written (handshake included); checks the byte count."""
    target = scratch / "tls-received"
    receiver = subprocess.Popen([sys.executable, "-c", _TLS_PEER, "recv", str(cert), str(key), str(target)], stdout=subprocess.PIPE, text=True)
    sender = None
    try:
        assert receiver.stdout is not None
        port = receiver.stdout.readline().strip()
        sender = subprocess.Popen([sys.executable, "-c", _TLS_PEER, "send", str(cert), str(key), str(source), port])
        if sender.wait(timeout=MOVE_TIMEOUT) != 0:
            raise RuntimeError("the TLS sender failed")
        received, seconds = receiver.stdout.readline().split()
        receiver.wait(timeout=60)
        if int(received) != source.stat().st_size:
            raise RuntimeError(f"the TLS copy received {received} of {source.stat().st_size} bytes")
        return float(seconds)
    finally:
        for process in (sender, receiver):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        target.unlink(missing_ok=True)


# ---------------------------------------------------------------- moves


class Mesh:
    """One running north/hub federation and its client."""

    def __init__(self, label: str, fed: Any, root: Path) -> None:
        from dfm_prefect.client import get_client

        self.label = label
        self.fed = fed
        self.root = root
        self.client = get_client(fed.federation_file)

    def rss(self, pids: list[int]) -> Callable[[], float]:
        import psutil

        processes = [psutil.Process(pid) for pid in pids]
        return lambda: float(sum(p.memory_info().rss for p in processes))

    def stored(self, steps: int) -> Any:
        """North's stored copy of the first ``steps`` time steps (netCDF, written by ``xarray.write``)."""
        box = self.client.call("north", "xarray.subset", {"data": "moves-source", "ranges": {"time": {"start": 0, "stop": steps - 1}}})
        return self.client.call("north", "xarray.write", {"data": box.model_dump(mode="json")}, timeout=MOVE_TIMEOUT)

    def stored_path(self, ref: Any) -> Path:
        name = ref.uri.rsplit("/", 1)[-1]
        path = self.root / "store" / "north" / name
        if not path.is_file() or path.stat().st_size != ref.size:
            raise RuntimeError(f"cannot find north's stored copy of {ref!r} at {path}")
        return path

    def move(self, ref: Any, timeout: float = MOVE_TIMEOUT) -> Any:
        moved = self.client.call("hub", "dfm.move", {"ref": ref.model_dump(mode="json")}, timeout=timeout)
        if moved.site != "hub" or moved.size != ref.size:
            raise RuntimeError(f"the move returned {moved!r} for {ref!r}")
        return moved

    def roles(self) -> dict[str, list[int]]:
        """The processes a move runs through, by role (FLARE: the server relays, its job process is the controller)."""
        roles = {site: self.fed.site_pids(site) for site in ("north", "hub")}
        if hasattr(self.fed, "server_pids"):
            server = self.fed.server_pids()
            roles.update({"FLARE server": server[:1], "mesh controller": server[1:]})
        return roles

    def measured_move(self, ref: Any) -> dict[str, float]:
        import psutil

        from bench.load import cpu_of, family

        probes = {site: self.rss(self.fed.site_pids(site)) for site in ("north", "hub")}
        start = {site: probe() for site, probe in probes.items()}
        roles = self.roles()
        # Each process once, in its own role: FLARE's job processes are children of the server and the clients.
        processes = {role: [psutil.Process(pid) for pid in pids] for role, pids in roles.items()}
        for role, pids in roles.items():
            processes[role] += [p for p in family(*pids).values() if not any(p.pid in other for other in roles.values())]
        cpu0, machine0 = {role: cpu_of(members) for role, members in processes.items()}, psutil.cpu_times()
        with PeakSampler(probes, interval=0.05) as sampler:
            t0 = time.perf_counter()
            self.move(ref)
            seconds = time.perf_counter() - t0
        cpu1, machine1 = {role: cpu_of(members) for role, members in processes.items()}, psutil.cpu_times()
        busy = sum(getattr(machine1, f) - getattr(machine0, f) for f in ("user", "system", "nice", "irq", "softirq"))
        return {
            "seconds": seconds,
            "machine cpu": busy,
            **{f"cpu {role}": cpu1[role] - cpu0[role] for role in processes},
            **{f"peak {s}": sampler.peaks[s] for s in probes},
            **{f"start {s}": start[s] for s in probes},
        }

    def check(self, ref: Any, moved: Any) -> None:
        """The mean of hub's copy equals the mean of north's."""
        params = {"dims": ["time", "lat", "lon"], "stat": "mean"}
        means = [
            float(self.client.call(r.site, "xarray.reduce", {"data": r.model_dump(mode="json"), **params}, timeout=MOVE_TIMEOUT).fetch()["x"])
            for r in (ref, moved)
        ]
        if means[0] != means[1]:
            raise RuntimeError(f"{self.label}: the moved copy's mean {means[1]} is not north's {means[0]}")

    def reliability(self, ref: Any) -> list[Row]:
        def one() -> bool:
            try:
                self.move(ref, timeout=RELIABLE_TIMEOUT)
                return True
            except Exception as exc:
                print(f"{self.label}: a move failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                return False

        t0 = time.perf_counter()
        sequential = [one() for _ in range(RELIABILITY)]
        sequential_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(RELIABILITY) as pool:
            concurrent = list(pool.map(lambda _: one(), range(RELIABILITY)))
        concurrent_s = time.perf_counter() - t0
        bench = f"moves: reliability ({RELIABLE_MB} MB)"
        variant = f"dfm-prefect {self.label}"
        rows = []
        for mode, results, seconds in (("sequential", sequential, sequential_s), ("concurrent", concurrent, concurrent_s)):
            failed = results.count(False)
            rows += [
                Row(bench, variant, f"{RELIABILITY} {mode} moves, wall time", seconds, "s", 1, note=f"{failed} failed or hung"),
                Row(bench, variant, f"{RELIABILITY} {mode} moves, failed or hung", float(failed), "", RELIABILITY),
            ]
        return rows


ROLE_NOTES = {
    "north": "the holding site (FLARE: its FLARE client and mesh-job process)",
    "hub": "the receiving site (FLARE: its FLARE client and mesh-job process)",
    "FLARE server": "FLARE's server process alone: it relays every message between the job processes and runs no dfm-prefect code",
    "mesh controller": "the mesh job's server process: dfm-prefect's controller, which checks and forwards each piece",
}


def throughput_rows(size_mb: int, nbytes: int, runs: dict[str, list[dict[str, float]]]) -> list[Row]:
    bench = f"moves: {size_mb} MB"
    if not runs[TLS]:
        return []
    tls = median([nbytes / 1e6 / r["seconds"] for r in runs[TLS]])
    rows = [Row(bench, TLS, "throughput", tls, "MB/s", len(runs[TLS]), baseline=TLS, note="loopback, one sender and one receiver process, to a file")]
    if all("cpu" in r for r in runs[TLS]):
        rows.append(Row(bench, TLS, "CPU per MB moved", median([r["cpu"] / (nbytes / 1e6) * 1e3 for r in runs[TLS]]), "ms", len(runs[TLS]),
                        note="the sender and the receiver together"))
    for label, measured in runs.items():
        if label == TLS:
            continue
        variant = f"dfm-prefect {label}"
        speed = median([nbytes / 1e6 / r["seconds"] for r in measured])
        rows.append(Row(bench, variant, "throughput", speed, "MB/s", len(measured), baseline=TLS, ratio=speed / tls,
                        note=f"stored netCDF of {nbytes:,} bytes (xarray.write), dfm.move at hub"))
        mb = nbytes / 1e6
        rows.append(Row(bench, variant, "CPU of the whole machine per MB moved", median([r["machine cpu"] / mb * 1e3 for r in measured]), "ms", len(measured),
                        note=f"{median([r['machine cpu'] / r['seconds'] for r in measured]):.2f} of {os.cpu_count()} cores busy during the moves"))
        for role in [key[4:] for key in measured[0] if key.startswith("cpu ")]:
            rows.append(Row(bench, variant, f"CPU per MB moved: {role}", median([r[f"cpu {role}"] / mb * 1e3 for r in measured]), "ms", len(measured),
                            note=ROLE_NOTES.get(role, "")))
        for site in ("north", "hub"):
            peak = max(r[f"peak {site}"] for r in measured)
            growth = max(r[f"peak {site}"] - r[f"start {site}"] for r in measured)
            rows.append(Row(bench, variant, f"peak RSS {site}", peak / MiB, "MiB", len(measured),
                            note=f"highest over the moves; at most +{growth / MiB:.0f} MiB over the move's start"))
    return rows


def two_site_pipeline(expected: float) -> float:
    """Box at north (a view), mean at hub (the box moves north→hub), the number to the client (inside a running flow)."""
    from adapters.xarray_ops import reduce, subset

    box = subset.submit(data="dfm://north/peer-grid", ranges=peer_dfm.BBOX, site="north")
    mean = reduce.submit(data=box, dims=["time", "lat", "lon"], stat="mean", site="hub")
    result = mean.result()
    if result.site != "hub":
        raise RuntimeError(f"the mean ran at {result.site}, not at hub")
    value = float(result.fetch()["t2m"])
    if abs(value - expected) > 1e-4:
        raise RuntimeError(f"wrong answer: {value} != {expected}")
    return value


PIPELINE = "moves: DFM two-site pipeline"


def run(env: BenchEnv, *, rounds: int = 5, include_flare: bool = True, include_nvdfm: bool = True) -> list[Row]:
    from dfm_prefect.client import close_clients
    from dfm_prefect.transports.flare.deploy.launcher import FlareFederation
    from dfm_prefect.transports.local.launcher import LocalFederation

    sizes = sizes_mb()
    root = env.root / "moves"
    source = root / "source.zarr"
    make_source(source, max(*sizes, RELIABLE_MB))
    sources = env.site_sources()
    sources = {"north": [*sources["north"], {"name": "moves-source", "url": f"file://{source}"}]}
    expected = env.peer_expected
    assert expected is not None
    cert, key = throwaway_cert(root / "tls")
    scratch = Path(tempfile.mkdtemp(prefix="tls-", dir=root))

    transports: dict[str, type] = {"local": LocalFederation}
    if include_flare:
        transports["FLARE"] = FlareFederation
    runs: dict[int, dict[str, list[dict[str, float]]]] = {size: {TLS: []} for size in sizes}
    nbytes: dict[int, int] = {}
    failed: dict[tuple[int, str], str] = {}
    reliability: list[Row] = []
    pipeline: list[Row] = []
    for label, launcher in transports.items():
        folder = root / label
        print(f"moves: {label} federation", file=sys.stderr, flush=True)
        with ExitStack() as stack:
            fed = stack.enter_context(launcher(site_configs(folder, sources), workdir=folder / "federation"))
            stack.callback(close_clients)
            mesh = Mesh(label, fed, folder)
            warm = mesh.stored(1)
            mesh.move(warm)  # both sites load what moves need (libraries, connections)
            for size in sizes:
                ref = mesh.stored(size)
                nbytes.setdefault(size, ref.size)
                try:
                    mesh.check(ref, mesh.move(ref))
                except Exception as exc:  # recorded as a failed row; the other sizes and parts still run
                    failed[(size, label)] = f"{type(exc).__name__}: {exc}"
                    print(f"moves: {label} {size} MB failed: {failed[(size, label)]}", file=sys.stderr, flush=True)
                    continue
                path = mesh.stored_path(ref) if label == "local" else None
                for _ in range(min(rounds, 3) if size >= 1000 else rounds):
                    if path is not None:
                        before = resource.getrusage(resource.RUSAGE_CHILDREN)
                        seconds = tls_copy(path, cert, key, scratch)
                        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # its two processes, once waited for
                        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                        runs[size][TLS].append({"seconds": seconds, "cpu": cpu})
                    runs[size].setdefault(label, []).append(mesh.measured_move(ref))
                    print(f"moves: {label} {size} MB: {runs[size][label][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
            reliability += mesh.reliability(mesh.stored(RELIABLE_MB))
            pipeline += peer_dfm.run_ours(fed.federation_file, expected, label, pipeline=two_site_pipeline, bench=PIPELINE)
    rows: list[Row] = []
    for size in sizes:
        rows += throughput_rows(size, nbytes[size], runs[size])
        rows += [Row(f"moves: {size} MB", f"dfm-prefect {label}", "failed", float("nan"), "", 0, note=error[:300])
                 for (failed_size, label), error in failed.items() if failed_size == size]
    rows += reliability
    if include_nvdfm:
        nvdfm = peer_dfm.nvdfm_rows(peer_dfm.run_nvdfm(two_site=True), bench=PIPELINE)
        baseline = {r.metric: r.median for r in nvdfm if r.variant == "nv-dfm-core local target"}
        for row in nvdfm + pipeline:
            if baseline.get(row.metric):
                row.baseline, row.ratio = "nv-dfm-core local target", row.median / baseline[row.metric]
        rows += nvdfm
    rows += pipeline
    return rows

