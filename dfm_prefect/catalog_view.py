"""The federation's catalog for people: every operation with its parameters, every site's sources and policy.

Rendered with rich for ``dfm-prefect catalog`` and ``dfm-prefect site check``.
Long names and descriptions wrap; nothing is cut, whatever the terminal width.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from dfm_prefect.core.wire import OperationInfo, SiteInfo
from dfm_prefect.schema_text import parameter_rows, referenced_models


def _parameter_table(title: str, schema: dict[str, object]) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False, expand=False)
    table.add_column("parameter", no_wrap=True, style="bold")
    table.add_column("type", overflow="fold")
    table.add_column("default", overflow="fold")
    table.add_column("description", overflow="fold", ratio=1)
    for row in parameter_rows(schema):  # type: ignore[arg-type]
        table.add_row(row.name, row.type, row.default, row.description)
    return table


def operation_view(op: OperationInfo, sites: Iterable[str], *, nested: bool = True) -> RenderableType:
    """One operation: name, result kind, version, the sites that offer it, its description and its parameters."""
    head = Text.assemble((op.name, "bold cyan"), f"  result: {op.result_kind}  version: {op.version}  offered by: {', '.join(sorted(sites))}")
    parts: list[RenderableType] = [head]
    if op.description:
        parts.append(Padding(Text(op.description.strip()), (0, 0, 0, 2)))
    if op.params_schema.get("properties"):
        parts.append(Padding(_parameter_table("parameters", op.params_schema), (0, 0, 0, 2)))
    if nested:
        for name, schema in referenced_models(op.params_schema).items():
            parts.append(Padding(_parameter_table(f"{name} (an item of the parameters above)", schema), (0, 0, 0, 2)))
    return Group(*parts)


def operations_by_name(sites: Mapping[str, SiteInfo]) -> dict[str, tuple[OperationInfo, list[str]]]:
    """Each operation once, with the sites that offer it (the first site's description stands for all)."""
    found: dict[str, tuple[OperationInfo, list[str]]] = {}
    for site, info in sorted(sites.items()):
        for name, op in info.operations.items():
            found.setdefault(name, (op, []))[1].append(site)
    return dict(sorted(found.items()))


def sources_view(info: SiteInfo) -> RenderableType:
    sources = Table(title=f"{info.name}: data sources", title_justify="left")
    sources.add_column("source", no_wrap=True, style="bold")
    for column in ("url", "format", "dims / rows", "variables / columns", "size"):
        sources.add_column(column, overflow="fold")
    for source in info.sources:
        summary = source.summary
        if "error" in summary:
            dims, variables = "[red]unreadable[/red]", escape(str(summary["error"]))
        elif "columns" in summary:  # a table
            rows = summary.get("rows")
            dims = f"rows={rows:,}" if isinstance(rows, int) else "rows=?"
            variables = ", ".join(f"{name}:{dtype}" for name, dtype in summary["columns"].items())
        else:
            dims = ", ".join(f"{k}={v}" for k, v in summary.get("dims", {}).items())
            variables = ", ".join(summary.get("data_vars", {}))
        sources.add_row(source.name, source.url, source.format, dims, variables, f"{source.size:,}" if source.size else "?")
    return sources


def policy_line(info: SiteInfo) -> str:
    export = info.export
    return (
        f"{info.name}: export kinds {', '.join(export.kinds) or 'none'}, at most {export.max_bytes:,} bytes per result; "
        f"groups of at least {export.min_group_size} and subsets of at least {export.min_subset_size} records or cells; "
        f"log lines {'shared' if export.share_logs else 'kept at the site'}"
        + "".join(
            f"; sends {', '.join(rule.kinds)} up to {rule.max_bytes:,} bytes to {site}" for site, rule in sorted(export.sites.items())
        )
        + "".join(
            f"; accepts {', '.join(rule.kinds)} up to {rule.max_bytes:,} bytes from {site}" for site, rule in sorted(export.imports.items())
        )
    )


def print_catalog(console: Console, sites: Mapping[str, SiteInfo], *, op: str | None = None) -> bool:
    """Print the operations (all, or only ``op``) and, without ``op``, each site's sources and policy.

    Returns False when ``op`` is given and no site offers it.
    """
    operations = operations_by_name(sites)
    if op is not None:
        if op not in operations:
            return False
        info, offered = operations[op]
        console.print(operation_view(info, offered, nested=True))
        return True
    console.rule("operations")
    for info, offered in operations.values():
        console.print(operation_view(info, offered, nested=False))
        console.print()
    console.print("[dim]`dfm-prefect catalog --op NAME` also shows the fields of nested parameters (conditions, ranges, aggregations).[/dim]")
    console.rule("sources and export policy")
    for info in sites.values():
        console.print(sources_view(info))
        console.print(policy_line(info))
    return True
