"""Where a site's Dask work runs. Backends plug in by name with `register_backend`.

The site config picks one (``compute.kind``):

``threads``
    Dask's threaded scheduler inside the site process (the default).
``cpu``
    A `distributed.LocalCluster` of worker *processes* started by the site. Each
    worker's nanny holds it to ``memory_limit`` (it pauses at 80% and restarts a
    worker at 95%), so the limit is real, not advisory; worker processes also keep
    compute off the GIL of the process that serves requests, and a worker killed
    by the kernel does not take the site down.
``gpu``
    A `dask_cuda.LocalCUDACluster`, one worker per GPU. Operations move their
    chunks to CuPy with :meth:`ComputeBackend.to_device`; results come back as
    NumPy. Needs ``pip install 'dfm-prefect[gpu]'`` and a CUDA device.
``auto``
    ``gpu`` when a CUDA device, CuPy and dask-cuda are there, else ``cpu``, with a
    warning in the site log that says why.

Every cluster a site starts listens on 127.0.0.1 and speaks only mutual TLS,
with a CA and certificate made for it alone (`site_workers.dask_tls`): Dask runs
the pickled functions it is sent, so a cluster anyone could talk to would run
anyone's code as the site. Its HTTP listeners are closed.

With ``scheduler_address`` (and ``kind: cpu`` or ``gpu``) the site starts no
cluster and sends its work to that scheduler, as a TLS client with the
certificate in ``scheduler_tls`` (or, where the admin opted out, in clear, with
a warning at every start).

Example (a custom backend)::

    from site_workers.compute import ComputeBackend, register_backend

    class Synchronous(ComputeBackend):
        name = "sync"
        def compute(self, *collections):
            import dask
            return dask.compute(*collections, scheduler="synchronous")

    register_backend("sync", lambda config: Synchronous())
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dfm_prefect.core.errors import ConfigError
from site_workers.concurrency import unlock_cached_properties
from site_workers.config import ComputeConfig

if TYPE_CHECKING:
    from site_workers.dask_tls import ClusterCertificates

log = logging.getLogger("dfm_prefect.site.compute")


class ComputeBackend(ABC):
    """Computes Dask collections for operations."""

    name = "abstract"
    device = "cpu"
    """Where chunks live while operations compute: ``cpu`` (NumPy) or ``gpu`` (CuPy)."""

    @abstractmethod
    def compute(self, *collections: Any) -> tuple[Any, ...]:
        """Compute the collections and return concrete host (NumPy/pandas) values, in order."""

    def to_device(self, value: Any) -> Any:
        """``value`` with its array chunks on this backend's device (unchanged on CPU backends)."""
        return value

    def close(self) -> None:
        """Release workers and clusters."""


class ThreadsBackend(ComputeBackend):
    """Dask's threaded scheduler inside the site process (the default)."""

    name = "threads"

    def __init__(self, config: ComputeConfig) -> None:
        self.workers = config.workers or os.cpu_count() or 1

    def compute(self, *collections: Any) -> tuple[Any, ...]:
        import dask

        return dask.compute(*collections, scheduler="threads", num_workers=self.workers)


# ----------------------------------------------------------------- device arrays


@dataclass(frozen=True)
class ArrayModule:
    """How chunks move between host memory and a device (CuPy's functions on a GPU site)."""

    name: str
    asarray: Callable[[Any], Any]
    asnumpy: Callable[[Any], Any]
    empty: Callable[..., Any]
    array_type: type


def cupy_module() -> ArrayModule:
    """CuPy as an `ArrayModule` (raises ImportError where CuPy is not installed)."""
    import cupy

    return ArrayModule("cupy", cupy.asarray, cupy.asnumpy, cupy.empty, cupy.ndarray)


def _host(block: Any, module: ArrayModule) -> Any:
    return module.asnumpy(block) if isinstance(block, module.array_type) else block


def move_chunks(value: Any, convert: Callable[[Any], Any], meta: Callable[[Any], Any]) -> Any:
    """Apply ``convert`` to every chunk of an xarray object or Dask array, lazily.

    ``meta(dask_array)`` gives the empty array that describes the converted chunks,
    so that Dask picks the right functions for them. Variables that are not Dask
    arrays are chunked first, so the conversion runs on the workers, never here.
    """
    import dask.array as da
    import xarray as xr

    def lazy(data: Any) -> Any:
        array = data if isinstance(data, da.Array) else da.from_array(data, chunks=-1)
        return array.map_blocks(convert, dtype=array.dtype, meta=meta(array))

    if isinstance(value, da.Array):
        return lazy(value)
    if isinstance(value, xr.DataArray):
        return value.copy(data=lazy(value.data)) if value.dtype.kind in "biufc" else value
    if isinstance(value, xr.Dataset):
        moved = {name: move_chunks(var, convert, meta) for name, var in value.data_vars.items()}
        return value.assign(moved)
    return value


class DistributedBackend(ComputeBackend):
    """Work sent to a `distributed` scheduler through a client owned by the site.

    The client is not made Dask's default: only :meth:`compute` uses the cluster,
    so the site's own housekeeping (writing results) never competes with it.
    """

    name = "cpu"

    def __init__(
        self,
        client: Any,
        cluster: Any = None,
        *,
        arrays: ArrayModule | None = None,
        name: str | None = None,
        certificates: ClusterCertificates | None = None,
    ) -> None:
        self.client = client
        self.cluster = cluster
        self.certificates = certificates
        """The cluster's TLS certificates when the site started the cluster (removed by `close`)."""
        self.arrays = arrays
        if name:
            self.name = name
        self.device = "gpu" if arrays is not None else "cpu"

    def to_device(self, value: Any) -> Any:
        if self.arrays is None:
            return value
        arrays = self.arrays
        return move_chunks(value, arrays.asarray, lambda a: arrays.empty((0,) * a.ndim, dtype=a.dtype))

    def _to_host(self, value: Any) -> Any:
        if self.arrays is None:
            return value
        import numpy as np

        arrays = self.arrays
        return move_chunks(value, lambda block: _host(block, arrays), lambda a: np.empty((0,) * a.ndim, dtype=a.dtype))

    def compute(self, *collections: Any) -> tuple[Any, ...]:
        import dask

        results = dask.compute(*(self._to_host(c) for c in collections), scheduler=self.client)
        return tuple(self._host_values(r) for r in results)

    def _host_values(self, value: Any) -> Any:
        """Bring any value still on the device (a result that was not a Dask collection) to the host."""
        if self.arrays is None:
            return value
        import xarray as xr

        if isinstance(value, self.arrays.array_type):
            return self.arrays.asnumpy(value)
        if isinstance(value, (xr.Dataset, xr.DataArray)):
            return _xarray_to_host(value, self.arrays)
        return value

    def close(self) -> None:
        try:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            if self.certificates is not None:
                self.certificates.close()


def _xarray_to_host(value: Any, arrays: ArrayModule) -> Any:
    import xarray as xr

    if isinstance(value, xr.DataArray):
        return value.copy(data=_host(value.data, arrays))
    return value.assign({name: _xarray_to_host(var, arrays) for name, var in value.data_vars.items()})


def _cluster_kwargs(config: ComputeConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dashboard_address": None}
    if config.memory_limit is not None:
        kwargs["memory_limit"] = config.memory_limit
    if config.threads_per_worker is not None:
        kwargs["threads_per_worker"] = config.threads_per_worker
    return kwargs


def _connect(config: ComputeConfig) -> Any:
    from distributed import Client

    address = config.scheduler_address
    security = None
    if config.scheduler_tls is not None:
        from site_workers.dask_tls import admin_security

        tls = config.scheduler_tls
        security = admin_security(tls.ca_file, tls.cert_file, tls.key_file)
    elif config.allow_unauthenticated_scheduler and not str(address).startswith("inproc://"):
        log.warning(
            "compute: sending work to %s without authentication (allow_unauthenticated_scheduler: true): any process "
            "that reaches that scheduler runs code as this site; give it TLS and scheduler_tls instead",
            address,
        )
    try:
        return Client(address, security=security, set_as_default=False, timeout="30s")
    except OSError as exc:
        hint = " and that it trusts the CA of scheduler_tls.cert_file (and its CA signed the scheduler's certificate)" if security else ""
        raise ConfigError(
            f"compute.scheduler_address {address!r} cannot be reached: {exc}; "
            f"check that the scheduler runs{hint}, or remove scheduler_address to let the site start its own cluster"
        ) from None


def _start_cluster(make: Callable[..., Any], label: str, **kwargs: Any) -> tuple[Any, Any, ClusterCertificates]:
    """A cluster made by ``make`` that speaks only mutual TLS on 127.0.0.1, its client, and its certificates."""
    import dask
    from distributed import Client

    from site_workers.dask_tls import NO_HTTP_ROUTES, ClusterCertificates, close_http_servers

    certificates = ClusterCertificates(label)
    security = certificates.security()
    cluster = client = None
    try:
        with dask.config.set(NO_HTTP_ROUTES):  # nannies pass this config on to every worker they (re)start
            cluster = make(protocol="tls://", host="127.0.0.1", security=security, **kwargs)
        client = Client(cluster, security=security, set_as_default=False)
        close_http_servers(client)
        return cluster, client, certificates
    except BaseException:
        for part in (client, cluster):
            if part is not None:
                part.close()
        certificates.close()
        raise


def cpu_backend(config: ComputeConfig) -> DistributedBackend:
    """``kind: cpu``: a LocalCluster of worker processes (or the scheduler at ``scheduler_address``)."""
    from distributed import LocalCluster

    if config.scheduler_address:
        return DistributedBackend(_connect(config), name="cpu")
    cores = os.cpu_count() or 1
    workers = config.workers or max(1, min(cores, 4))
    kwargs = {"threads_per_worker": max(1, cores // workers), **_cluster_kwargs(config)}
    cluster, client, certificates = _start_cluster(LocalCluster, "dfm-dask-cpu", n_workers=workers, processes=True, **kwargs)
    log.info("compute: cpu, %d worker processes (%s), mutual TLS on 127.0.0.1", workers, kwargs.get("memory_limit", "auto memory limit"))
    return DistributedBackend(client, cluster, name="cpu", certificates=certificates)


def gpu_unavailable() -> str | None:
    """Why the GPU backend cannot run here, or None when it can."""
    try:
        import dask_cuda  # noqa: F401
    except ImportError as exc:
        return f"dask-cuda is not installed ({exc}); pip install 'dfm-prefect[gpu]'"
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); pip install 'dfm-prefect[gpu]'"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        return f"CUDA reports no usable device ({exc})"
    return None if count > 0 else "CUDA reports no device"


def gpu_backend(config: ComputeConfig) -> DistributedBackend:
    """``kind: gpu``: a LocalCUDACluster (or dask-cuda workers at ``scheduler_address``), CuPy chunks."""
    if config.scheduler_address:
        try:
            arrays = cupy_module()
        except ImportError:
            raise ConfigError("compute kind 'gpu' needs CuPy at the site: pip install 'dfm-prefect[gpu]'") from None
        return DistributedBackend(_connect(config), arrays=arrays, name="gpu")
    reason = gpu_unavailable()
    if reason is not None:
        raise ConfigError(f"compute kind 'gpu' cannot run here: {reason}; use kind: auto to fall back to the CPU")
    from dask_cuda import LocalCUDACluster

    kwargs = _cluster_kwargs(config)
    if config.workers is not None:
        kwargs["n_workers"] = config.workers
    cluster, client, certificates = _start_cluster(LocalCUDACluster, "dfm-dask-gpu", **kwargs)
    log.info("compute: gpu, dask-cuda LocalCUDACluster with %d GPU workers, mutual TLS on 127.0.0.1", len(cluster.workers))
    return DistributedBackend(client, cluster, arrays=cupy_module(), name="gpu", certificates=certificates)


def auto_backend(config: ComputeConfig) -> ComputeBackend:
    """``kind: auto``: the GPU backend when it can run here, else the CPU one (and say why)."""
    reason = gpu_unavailable()
    if reason is None:
        return gpu_backend(config)
    log.warning("compute: auto found no usable GPU (%s); running Dask on the CPU (distributed LocalCluster)", reason)
    return cpu_backend(config)


_BACKENDS: dict[str, Callable[[ComputeConfig], ComputeBackend]] = {
    "threads": ThreadsBackend,
    "cpu": cpu_backend,
    "gpu": gpu_backend,
    "auto": auto_backend,
}


def register_backend(kind: str, factory: Callable[[ComputeConfig], ComputeBackend]) -> None:
    """Make ``compute.kind: <kind>`` available in site configs."""
    _BACKENDS[kind] = factory


def make_backend(config: ComputeConfig) -> ComputeBackend:
    """Build the backend a site config asks for."""
    unlock_cached_properties()  # the site builds Dask graphs in several threads at once
    try:
        factory = _BACKENDS[config.kind]
    except KeyError:
        raise ConfigError(f"compute kind {config.kind!r} is not available here; known: {sorted(_BACKENDS)}") from None
    return factory(config)
