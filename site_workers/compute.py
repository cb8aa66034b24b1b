"""Where a site's Dask work runs. Backends plug in by name with `register_backend`."""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from dfm_prefect.errors import ConfigError
from site_workers.config import ComputeConfig

log = logging.getLogger("dfm_prefect.site.compute")


class ComputeBackend(ABC):
    """Computes Dask collections for operations."""

    name = "abstract"

    @abstractmethod
    def compute(self, *collections: Any) -> tuple[Any, ...]:
        """Compute the collections and return concrete values, in order."""

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


_BACKENDS: dict[str, Callable[[ComputeConfig], ComputeBackend]] = {"threads": ThreadsBackend}


def register_backend(kind: str, factory: Callable[[ComputeConfig], ComputeBackend]) -> None:
    """Make ``compute.kind: <kind>`` available in site configs."""
    _BACKENDS[kind] = factory


def make_backend(config: ComputeConfig) -> ComputeBackend:
    """Build the backend a site config asks for."""
    try:
        factory = _BACKENDS[config.kind]
    except KeyError:
        raise ConfigError(f"compute kind {config.kind!r} is not available here; known: {sorted(_BACKENDS)}") from None
    return factory(config)
