"""Operations on databases a site declares: structured read-only queries, and the administrator's named queries.

A client never sends SQL. ``sql.select`` and ``sql.aggregate`` take a table the
site lists, its columns, structured conditions (the same `Condition` as the
table operations) and aggregations, and the site compiles them with SQLAlchemy
Core: names are looked up in the reflected table, values are bound
parameters. ``sql.aggregate`` returns ``sum``, ``count``, ``sumsq``, ``min`` and
``max`` per group, which merge exactly across sites with
`adapters.combine.combine_grouped`. Named queries (``query.<name>``) are SQL the
administrator wrote in the site's YAML with typed ``:parameters``.

Results are pandas dataframes kept at the site (Parquet); the disclosure rules
see what each query kept (``check_selection``) and counted (``count_groups``).

Example (in a flow, over two hospitals):

```python
from adapters.sql import aggregate
from adapters.combine import combine_grouped

aggs = {"n": {"column": "stay_days", "func": "count"}, "s": {"column": "stay_days", "func": "sum"}}
parts = [aggregate.submit(database="clinic", table="visits", by=["ward"], aggregations=aggs, site=s) for s in ("north", "south")]
pooled = combine_grouped([p.result().fetch() for p in parts], by=["ward"], how={"n": "sum", "s": "sum"})
```
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

from pydantic import Field

from adapters.declared import bound_operation, params_model
from adapters.sql_database import Database
from adapters.tables import Condition
from adapters.xarray_common import NAME
from dfm_prefect.core.errors import InvalidParametersError, UnknownOperationError
from dfm_prefect.core.operations import Operation, OperationContext, OperationParams, operation

_ROWS = "__dfm_rows"


class SelectParams(OperationParams):
    database: str = Field(min_length=1, max_length=64, description="A database the site declares.")
    table: str = Field(min_length=1, max_length=64, description="A table or view the site lists for it.")
    columns: list[str] | None = Field(default=None, min_length=1, max_length=1024, description="Default: every offered column.")
    where: list[Condition] = Field(default_factory=list, max_length=64)
    order_by: list[str] = Field(default_factory=list, max_length=16, description="Sort by these columns (ascending).")
    limit: int | None = Field(default=None, ge=1, le=100_000_000)


class SqlAggregation(OperationParams):
    """One output column: ``func`` of ``column`` per group (``sumsq``: the sum of squares)."""

    column: str = Field(min_length=1, max_length=64)
    func: Literal["sum", "count", "sumsq", "min", "max"]


class AggregateParams(OperationParams):
    database: str = Field(min_length=1, max_length=64)
    table: str = Field(min_length=1, max_length=64)
    by: list[str] = Field(default_factory=list, max_length=16, description="Group columns (none: one group, the whole table).")
    aggregations: dict[str, SqlAggregation] = Field(min_length=1, max_length=256, description="Output column -> aggregation.")
    where: list[Condition] = Field(default_factory=list, max_length=64)


def _unbound(name: str) -> Any:
    def refuse(params: Any, ctx: OperationContext) -> Any:
        raise UnknownOperationError(f"{name} runs only at sites that declare databases (databases: in the site config)")

    refuse.__doc__ = _DOCS[name]
    return refuse


_DOCS = {
    "sql.select": "Rows of a table the site lists: chosen columns, structured conditions, order and limit (compiled by the site, never SQL text).",
    "sql.aggregate": "Per-group sum, count, sum of squares, min and max of a listed table, computed in the database; merge across sites with combine_grouped.",
}
select = operation("sql.select", version="1", result="table", params=SelectParams)(_unbound("sql.select"))
aggregate = operation("sql.aggregate", version="1", result="aggregate", params=AggregateParams)(_unbound("sql.aggregate"))


# ------------------------------------------------------------------ compiling


def _database(databases: Mapping[str, Database], name: str) -> Database:
    try:
        return databases[name]
    except KeyError:
        raise UnknownOperationError(f"no database {name!r} here; this site declares {sorted(databases)}") from None


def _column(table: Any, name: str) -> Any:
    try:
        return table.columns[name]
    except KeyError:
        raise InvalidParametersError(f"table {table.name!r} offers no column {name!r}; it offers {list(table.columns.keys())}") from None


def _value(column: Any, value: Any) -> Any:
    """A JSON value as the column's Python type (dates from ISO strings); a mismatch is a clear error, not a database error."""
    if isinstance(value, list):
        return [_value(column, item) for item in value]
    try:
        python = column.type.python_type
    except NotImplementedError:
        return value
    try:
        if python is dt.datetime and isinstance(value, str):
            return dt.datetime.fromisoformat(value)
        if python is dt.date and isinstance(value, str):
            return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidParametersError(f"{value!r} is not an ISO date for column {column.name!r}") from None
    numeric = python in (int, float) or python.__name__ == "Decimal"
    if (numeric and (isinstance(value, str) or isinstance(value, bool) and python is not bool)) or (python is str and not isinstance(value, str)):
        raise InvalidParametersError(f"column {column.name!r} holds {python.__name__} values; {value!r} does not compare with them")
    return value


def _condition(table: Any, condition: Condition) -> Any:
    column = _column(table, condition.column)
    value = _value(column, condition.value)
    op = condition.op
    if op == "is null":
        return column.is_(None)
    if op == "not null":
        return column.is_not(None)
    if op == "in":
        return column.in_(value)
    if op == "not in":
        return column.not_in(value)
    if op == "between":
        return column.between(value[0], value[1])
    return {"==": column.__eq__, "!=": column.__ne__, "<": column.__lt__, "<=": column.__le__, ">": column.__gt__, ">=": column.__ge__}[op](value)


def _total(db: Database, table: Any, ctx: OperationContext) -> int:
    import sqlalchemy as sa

    return int(db.scalar(sa.select(sa.func.count()).select_from(table), ctx))


def run_select(databases: Mapping[str, Database], params: SelectParams, ctx: OperationContext) -> Any:
    """``sql.select`` at a site with databases."""
    import sqlalchemy as sa

    db = _database(databases, params.database)
    table = db.table(params.table)
    columns = [_column(table, name) for name in params.columns] if params.columns else list(table.columns)
    statement = sa.select(*columns).where(*(_condition(table, c) for c in params.where))
    statement = statement.order_by(*(_column(table, name) for name in params.order_by))
    if params.limit is not None:
        statement = statement.limit(params.limit)
    frame = db.frame(statement, ctx)
    ctx.check_selection(len(frame), _total(db, table, ctx) if params.where or params.limit else len(frame))
    return frame


def _aggregate_expression(column: Any, func: str) -> Any:
    import sqlalchemy as sa

    if func == "count":
        return sa.func.count(column)
    if func in ("min", "max"):
        return getattr(sa.func, func)(column)
    python = _python_type(column)
    if python not in (int, float, bool) and python.__name__ != "Decimal":
        raise InvalidParametersError(f"{func!r} needs a numeric column, and {column.name!r} is {column.type}; count it instead")
    if func == "sumsq":
        value = sa.cast(column, sa.Float)
        return sa.cast(sa.func.sum(value * value), sa.Float)
    return sa.cast(sa.func.sum(column), sa.BigInteger if python in (int, bool) else sa.Float)


def _python_type(column: Any) -> type:
    try:
        return column.type.python_type  # type: ignore[no-any-return]
    except NotImplementedError:
        return object


def run_aggregate(databases: Mapping[str, Database], params: AggregateParams, ctx: OperationContext) -> Any:
    """``sql.aggregate`` at a site with databases: one row per group, plus the counts the disclosure rules need."""
    import sqlalchemy as sa

    bad = [name for name in params.aggregations if not re.match(NAME, name) or name in params.by or name.startswith("__dfm")]
    if bad:
        raise InvalidParametersError(f"output names {bad} must be valid names, differ from the group columns and not start with '__dfm'")
    db = _database(databases, params.database)
    table = db.table(params.table)
    groups = [_column(table, name) for name in params.by]
    outputs = [_aggregate_expression(_column(table, agg.column), agg.func).label(name) for name, agg in params.aggregations.items()]
    # Contributors per group: its rows, and the non-missing values of each aggregated column.
    counted = dict.fromkeys(agg.column for agg in params.aggregations.values())
    counts = [sa.func.count().label(_ROWS)] + [sa.func.count(_column(table, c)).label(f"__dfm_n_{i}") for i, c in enumerate(counted)]
    statement = sa.select(*groups, *outputs, *counts).where(*(_condition(table, c) for c in params.where))
    if groups:
        statement = statement.group_by(*groups).order_by(*groups)
    frame = db.frame(statement, ctx)
    hidden = [name for name in frame.columns if name.startswith("__dfm")]
    if params.where:
        ctx.check_selection(int(frame[_ROWS].sum()), _total(db, table, ctx))
    ctx.count_groups(*(frame[name].to_numpy() for name in hidden))
    return frame.drop(columns=hidden).reset_index(drop=True)


def run_named(db: Database, query: Any, params: OperationParams, ctx: OperationContext) -> Any:
    """A named query: the administrator's SQL with the validated parameters bound (never interpolated)."""
    import sqlalchemy as sa

    frame = db.frame(sa.text(query.sql), ctx, params=params.model_dump())
    if query.result == "aggregate":
        if query.counts not in frame.columns:
            raise InvalidParametersError(f"query {query.name!r} returns no column {query.counts!r} to count its groups; its administrator must fix it")
        ctx.count_groups(frame[query.counts].to_numpy())
    return frame


def bind_databases(configs: list[Any], offered: list[str]) -> dict[str, Operation]:
    """A site's SQL operations from its ``databases`` section (the ``dfm_prefect.site_bindings`` entry point).

    ``sql.select`` and ``sql.aggregate`` where the allow-list ``offered`` names them,
    bound to these databases; ``query.<name>`` for every named query.
    """
    listed = [name for name in ("sql.select", "sql.aggregate") if name in offered]
    databases = {
        db.name: Database(
            db.name,
            db.url,
            username=db.username,
            password=db.password,
            connect_args=db.connect_args,
            tables={t.name: (t.schema_, t.columns) for t in db.tables},
            batch_rows=db.batch_rows,
            max_rows=db.max_rows,
            timeout_s=db.timeout_s,
        )
        for db in configs
    }
    queries = {query.name: (db.name, query) for db in configs for query in db.queries}
    ops = _bind(databases, queries)
    return {name: op for name, op in ops.items() if name.startswith("query.") or name in listed}


def _offered(base: type[OperationParams], databases: Mapping[str, Database]) -> type[OperationParams]:
    """``base`` with ``database`` and ``table`` limited to what this site offers, so its catalog lists them."""
    from pydantic import create_model

    tables = sorted({table for db in databases.values() for table in db.allowed}) or [""]
    model: type[OperationParams] = create_model(
        base.__name__,
        __base__=base,
        database=(Literal[tuple(sorted(databases))], Field(description="A database this site declares.")),
        table=(Literal[tuple(tables)], Field(description="A table or view this site lists.")),
    )
    return model


def _bind(databases: Mapping[str, Database], queries: Mapping[str, tuple[str, Any]]) -> dict[str, Operation]:
    ops = {
        "sql.select": bound_operation(
            partial(run_select, databases), name="sql.select", result="table", params=_offered(SelectParams, databases), description=_DOCS["sql.select"]
        ),
        "sql.aggregate": bound_operation(
            partial(run_aggregate, databases),
            name="sql.aggregate",
            result="aggregate",
            params=_offered(AggregateParams, databases),
            description=_DOCS["sql.aggregate"],
        ),
    }
    for name, (database, query) in queries.items():
        op_name = f"query.{name}"
        ops[op_name] = bound_operation(
            partial(run_named, databases[database], query),
            name=op_name,
            result=query.result,
            params=params_model(op_name, query.params),
            description=query.description or f"Named query {name!r} on database {database!r}.",
        )
    return ops
