"""Operations on tables (Parquet and CSV sources, read as Dask dataframes partition by partition).

Filters are structured conditions, never query strings: a column, an operator
from a fixed list and a JSON value. Results come back as pandas dataframes,
stored as Parquet: ``table.filter`` and ``table.project`` return rows (kind
``table``, which export policies usually keep at the site), and
``table.groupby_aggregate`` returns one row per group (kind ``aggregate``).

Example:

```python
from adapters.tables import filter_rows, groupby_aggregate
from adapters.combine import combine_grouped

recent = filter_rows.submit(data="dfm://north/visits", where=[{"column": "year", "op": ">=", "value": 2020}])
parts = [groupby_aggregate.submit(data=f"dfm://{s}/visits", by=["ward"],
                                  aggregations={"n": {"column": "los", "func": "count"},
                                                "los_sum": {"column": "los", "func": "sum"}}) for s in sites]
pooled = combine_grouped([p.result().fetch() for p in parts], by=["ward"], how={"n": "sum", "los_sum": "sum"})
```
"""

from __future__ import annotations

import operator
from typing import Any, Literal, Union

from pydantic import Field, StrictBool, model_validator

from adapters.xarray_common import NAME
from dfm_prefect.core.errors import AccessDeniedError, InvalidParametersError
from dfm_prefect.core.operations import DataInput, OperationContext, OperationParams, operation

Scalar = Union[StrictBool, int, float, str]


class Condition(OperationParams):
    """One test on a column; a row passes a filter when every condition holds."""

    column: str = Field(min_length=1, max_length=256)
    op: Literal["==", "!=", "<", "<=", ">", ">=", "in", "not in", "between", "is null", "not null"]
    value: Scalar | list[Scalar] | None = None

    @model_validator(mode="after")
    def _value_fits(self) -> Condition:
        if self.op in ("is null", "not null"):
            if self.value is not None:
                raise ValueError(f"{self.op!r} takes no value")
        elif self.op in ("in", "not in"):
            if not isinstance(self.value, list) or not 1 <= len(self.value) <= 10_000:
                raise ValueError(f"{self.op!r} needs a list of 1 to 10000 values")
        elif self.op == "between":
            if not isinstance(self.value, list) or len(self.value) != 2:
                raise ValueError("'between' needs [low, high] (both inclusive)")
        elif self.value is None or isinstance(self.value, list):
            raise ValueError(f"{self.op!r} needs one value")
        return self


_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def open_table(ctx: OperationContext, data: Any) -> Any:
    """The data as a Dask dataframe (Parquet/CSV sources or a stored table result)."""
    import dask.dataframe as dd
    import pandas as pd

    value = ctx.open(data)
    if isinstance(value, pd.DataFrame):
        return dd.from_pandas(value, npartitions=1)
    if not isinstance(value, dd.DataFrame):
        raise AccessDeniedError(f"{data!r} is not a table (got {type(value).__name__}); table operations read Parquet or CSV")
    return value


def _check_columns(frame: Any, columns: list[str]) -> None:
    missing = sorted(set(columns) - set(frame.columns))
    if missing:
        raise InvalidParametersError(f"no columns {missing}; the table has {list(frame.columns)}")


def _literal(frame: Any, column: str, value: Any) -> Any:
    import pandas as pd

    if isinstance(value, list):
        return [_literal(frame, column, item) for item in value]
    if pd.api.types.is_datetime64_any_dtype(frame[column].dtype) and isinstance(value, str):
        try:
            return pd.Timestamp(value)
        except ValueError:
            raise InvalidParametersError(f"{value!r} is not a date for column {column!r}") from None
    return value


def _mask(frame: Any, condition: Condition) -> Any:
    column = frame[condition.column]
    value = _literal(frame, condition.column, condition.value)
    if condition.op == "is null":
        return column.isnull()
    if condition.op == "not null":
        return column.notnull()
    if condition.op == "in":
        return column.isin(value)
    if condition.op == "not in":
        return ~column.isin(value)
    if condition.op == "between":
        return (column >= value[0]) & (column <= value[1])
    return _COMPARE[condition.op](column, value)


def apply_filter(frame: Any, where: list[Condition]) -> Any:
    """Rows where every condition holds (lazily)."""
    _check_columns(frame, [c.column for c in where])
    for condition in where:
        try:
            frame = frame[_mask(frame, condition)]
        except TypeError:
            # The library's message may quote the column's cells; say only what was asked.
            raise InvalidParametersError(
                f"cannot compare column {condition.column!r} ({frame[condition.column].dtype}) with {condition.value!r}"
            ) from None
    return frame


class FilterParams(OperationParams):
    data: DataInput
    where: list[Condition] = Field(min_length=1, max_length=64)
    columns: list[str] | None = Field(default=None, max_length=1024, description="Keep only these columns.")
    limit: int | None = Field(default=None, ge=1, le=100_000_000, description="At most this many rows (the first ones).")


@operation("table.filter", version="1", result="table")
def filter_rows(params: FilterParams, ctx: OperationContext) -> Any:
    """Rows where every condition holds, optionally only some columns and the first ``limit`` rows.

    The rows kept (after ``limit``) are a selection the site's disclosure rules check.
    """
    source = open_table(ctx, params.data)
    frame = apply_filter(source, params.where)
    if params.columns is not None:
        _check_columns(frame, params.columns)
        frame = frame[params.columns]
    result, total = ctx.compute(frame, source.shape[0])
    if params.limit is not None:
        result = result.head(params.limit)
    ctx.check_selection(len(result), total)
    return result.reset_index(drop=True)


class ProjectParams(OperationParams):
    data: DataInput
    columns: list[str] = Field(min_length=1, max_length=1024)
    rename: dict[str, str] = Field(default_factory=dict, max_length=1024, description="Old name -> new name.")
    distinct: bool = Field(default=False, description="Drop duplicate rows.")


@operation("table.project", version="1", result="table")
def project(params: ProjectParams, ctx: OperationContext) -> Any:
    """Some columns of every row, optionally renamed and without duplicates."""
    import re

    frame = open_table(ctx, params.data)
    _check_columns(frame, params.columns)
    bad = [name for name in params.rename.values() if not re.match(NAME, name)]
    if bad or not set(params.rename) <= set(params.columns):
        raise InvalidParametersError("rename maps selected columns to valid names (letters, digits, '_', '.', '-')")
    frame = frame[params.columns]
    if params.distinct:
        frame = frame.drop_duplicates()
    (result,) = ctx.compute(frame.rename(columns=params.rename))
    return result.reset_index(drop=True)


class Aggregation(OperationParams):
    """One output column: ``func`` of ``column`` per group (``sumsq``: the sum of squares)."""

    column: str = Field(min_length=1, max_length=256)
    func: Literal["sum", "count", "mean", "min", "max", "std", "var", "sumsq"]


class GroupbyAggregateParams(OperationParams):
    data: DataInput
    by: list[str] = Field(min_length=1, max_length=16)
    aggregations: dict[str, Aggregation] = Field(min_length=1, max_length=256, description="Output column -> aggregation.")
    where: list[Condition] = Field(default_factory=list, max_length=64, description="Filter rows first.")


@operation("table.groupby_aggregate", version="1", result="aggregate")
def groupby_aggregate(params: GroupbyAggregateParams, ctx: OperationContext) -> Any:
    """One row per group with the requested aggregations; ``sum``, ``count``, ``sumsq``, ``min`` and ``max`` merge exactly across sites."""
    import re

    frame = open_table(ctx, params.data)
    _check_columns(frame, [*params.by, *(agg.column for agg in params.aggregations.values())])
    bad = [name for name in params.aggregations if not re.match(NAME, name) or name in params.by or name.startswith("__dfm")]
    if bad:
        raise InvalidParametersError(
            f"output names {bad} must be valid names, differ from the group columns and not start with '__dfm'"
        )
    _check_numeric(frame, params.aggregations)
    total = frame.shape[0]
    if params.where:
        frame = apply_filter(frame, params.where)
    # Contributors per group: its rows, and the non-missing values of each aggregated column.
    frame = frame.assign(**{_ROWS: 1})
    counted = [_ROWS, *dict.fromkeys(agg.column for agg in params.aggregations.values() if agg.column not in params.by)]
    counts = frame.groupby(params.by)[counted].count()
    spec = {}
    for name, agg in params.aggregations.items():
        column, func = agg.column, agg.func
        if func == "sumsq":
            column = f"__dfm_sq_{name}"
            frame = frame.assign(**{column: frame[agg.column].astype("float64") ** 2})
            func = "sum"
        spec[name] = (column, func)
    grouped = frame.groupby(params.by).agg(**spec)
    result, counts, kept, total = ctx.compute(grouped, counts, frame.shape[0], total)
    if params.where:
        ctx.check_selection(kept, total)
    ctx.count_groups(counts)
    return result.reset_index().sort_values(params.by).reset_index(drop=True)


_ROWS = "__dfm_rows"


def _check_numeric(frame: Any, aggregations: dict[str, Aggregation]) -> None:
    """Only ``count`` reads any column: a sum of text joins the text, a min or max of it is one row's text."""
    import pandas as pd

    for name, agg in aggregations.items():
        dtype = frame[agg.column].dtype
        numeric = pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
        ordered = pd.api.types.is_datetime64_any_dtype(dtype) and agg.func in ("min", "max")
        if agg.func != "count" and not (numeric or ordered):
            raise InvalidParametersError(
                f"aggregation {name!r}: {agg.func!r} needs a numeric column, and {agg.column!r} is {dtype}; "
                "count it, or aggregate a numeric column"
            )
