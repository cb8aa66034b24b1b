"""Let a site build Dask graphs in several threads at once without deadlocking (CPython < 3.12).

Up to Python 3.11, :class:`functools.cached_property` computes under one
``RLock`` per property *per class*, shared by every instance. Dask's dataframe
expressions are built from chains of cached properties (``_meta``, ``ndim``,
...) that read each other across classes, so two operations that build
different table pipelines in two site threads can take those class-wide locks
in opposite orders and wait for each other forever: both slots of the site
hang, and every later request queues behind them. The wire fuzzing found it
(two concurrent ``table.filter``/``table.project`` runs); two threads building
small pipelines in a loop reproduce it within seconds. CPython 3.12 removed the
lock (python/cpython#87634, "it locked across all instances of the class"),
so a getter may now run twice for one instance if two threads race, which
Dask supports because it runs on 3.12 and later.

:func:`unlock_cached_properties` gives the site process 3.12's behaviour on
older interpreters. Every site calls it when it builds its compute backend.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

_NOT_FOUND = object()


def _get_without_lock(self: functools.cached_property[Any], instance: Any, owner: type | None = None) -> Any:
    """`functools.cached_property.__get__` as in CPython 3.12: cache per instance, no class-wide lock."""
    if instance is None:
        return self
    if self.attrname is None:
        raise TypeError("Cannot use cached_property instance without calling __set_name__ on it.")
    try:
        cache = instance.__dict__
    except AttributeError:
        raise TypeError(
            f"No '__dict__' attribute on {type(instance).__name__!r} instance to cache {self.attrname!r} property."
        ) from None
    value = cache.get(self.attrname, _NOT_FOUND)
    if value is _NOT_FOUND:
        value = self.func(instance)
        try:
            cache[self.attrname] = value
        except TypeError:
            raise TypeError(
                f"The '__dict__' attribute on {type(instance).__name__!r} instance does not support item "
                f"assignment for caching {self.attrname!r} property."
            ) from None
    return value


def unlock_cached_properties() -> bool:
    """Drop the class-wide lock of `functools.cached_property` on Python < 3.12; True if it was dropped."""
    if sys.version_info >= (3, 12) or functools.cached_property.__get__ is _get_without_lock:
        return False
    functools.cached_property.__get__ = _get_without_lock  # type: ignore[method-assign]
    return True
