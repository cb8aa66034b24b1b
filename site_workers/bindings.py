"""The operations a site builds from its own config: databases, HTTP services, programs.

An installed operation is code every site of that version shares; these are
bound to one site's resources (an engine with its password, a service's token,
a program's path), which the operation holds in a closure and never receives
as a parameter. :func:`declared_operations` returns them for the worker to add
to its table, next to the installed operations its ``operations`` list names:

- ``sql.select`` and ``sql.aggregate`` when the site lists them and declares ``databases``;
- ``query.<name>`` for every named query of every database;
- ``service.<service>.<operation>`` for every operationId a service offers;
- ``program.<name>`` for every declared program.

Each section is bound by the function its ``dfm_prefect.site_bindings`` entry
point names (``databases = "adapters.sql:bind_databases"``), called with the
section's validated entries and the site's allow-list; the site runtime never
imports an adapter by name, and a site without such a section imports none.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.core.operations import Operation
from site_workers.config import SiteConfig

GROUP = "dfm_prefect.site_bindings"
SECTIONS = ("databases", "programs", "services")


def declared_operations(config: SiteConfig) -> dict[str, Operation]:
    """Every operation this site's ``databases``, ``services`` and ``programs`` sections declare."""
    ops: dict[str, Operation] = {}
    for section in SECTIONS:
        entries = getattr(config, section)
        if not entries:
            continue
        binder = next((ep for ep in entry_points(group=GROUP) if ep.name == section), None)
        if binder is None:
            raise ConfigError(f"site {config.name!r} declares {section} but no installed package binds them (entry point {GROUP}:{section})")
        bound: dict[str, Operation] = binder.load()(list(entries), list(config.operations))
        clash = sorted(set(bound) & set(ops))
        if clash:
            raise ConfigError(f"site {config.name!r}: operations {clash} are declared twice")
        ops.update(bound)
    return ops
