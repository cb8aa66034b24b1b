"""The ``databases``, ``services`` and ``programs`` sections of a site config: what the site binds besides files.

Each section names resources the administrator trusts and says exactly what
clients may do with them: the tables and columns of a database, the queries
written here, the operationIds of an HTTP service, the argv of a program.
Credentials come from the site's environment (``${env:NAME}``); the site masks
them in everything it sends.

Example:

```yaml
databases:
  - name: clinic
    url: postgresql+psycopg://analyst@db.internal:5432/clinic
    password: ${env:CLINIC_DB_PASSWORD}
    tables:
      - visits                                   # every column
      - {name: patients, columns: [id, ward, age]}
    queries:
      - name: stays_since
        sql: SELECT ward, count(*) AS n, sum(stay_days) AS stay_sum FROM visits WHERE admitted >= :since GROUP BY ward
        params: {since: {type: date}}
        result: aggregate
        counts: n
```
"""

from __future__ import annotations

import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_IDENT = r"^[a-z][a-z0-9_]{0,62}$"
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


ParamType = Literal["string", "integer", "number", "boolean", "date", "datetime"]


class ParamSpec(_Model):
    """A typed parameter of a named query or a program, validated before anything runs.

    Example::

        since: {type: date}
        ward: {type: string, choices: [cardio, neuro]}
        steps: {type: integer, minimum: 1, maximum: 1000, default: 10}
    """

    type: ParamType
    description: str = ""
    default: Union[bool, int, float, str, None] = None
    required: bool | None = Field(default=None, description="Default: required unless a default is given.")
    minimum: float | None = None
    maximum: float | None = None
    max_length: int = Field(default=256, ge=1, le=1 << 20, description="Strings: at most this many characters.")
    pattern: str | None = Field(default=None, description="Strings: a regular expression the whole value must match.")
    choices: list[Union[bool, int, float, str]] | None = Field(default=None, min_length=1)

    @property
    def is_required(self) -> bool:
        return self.required if self.required is not None else self.default is None


def _table_shorthand(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class TableConfig(_Model):
    """A table or view clients may query; ``columns`` limits which of its columns they see (default: all)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    schema_: str | None = Field(default=None, alias="schema", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    columns: list[str] | None = Field(default=None, min_length=1)

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("columns")
    @classmethod
    def _plain_columns(cls, value: list[str] | None) -> list[str] | None:
        bad = [c for c in value or [] if not _COLUMN.match(c)]
        if bad:
            raise ValueError(f"column names are letters, digits and '_': {bad}")
        return value


class NamedQueryConfig(_Model):
    """SQL the administrator wrote, offered as the operation ``query.<name>``; clients only fill ``:params``."""

    name: str = Field(pattern=_IDENT)
    sql: str = Field(min_length=1)
    description: str = ""
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    result: Literal["table", "aggregate"] = "table"
    counts: str | None = Field(default=None, description="aggregate: the column that counts each group's records (disclosure).")

    @model_validator(mode="after")
    def _params_used(self) -> NamedQueryConfig:
        bad = [p for p in self.params if not re.match(_IDENT, p)]
        if bad:
            raise ValueError(f"query {self.name!r}: parameter names are lowercase identifiers: {bad}")
        missing = [p for p in self.params if not re.search(rf"(?<!:):{p}\b", self.sql)]
        if missing:
            raise ValueError(f"query {self.name!r} declares parameters its SQL does not use as :name: {missing}")
        if self.result == "aggregate" and self.counts is None:
            raise ValueError(f"query {self.name!r}: an aggregate query names its group-count column with counts: <column>")
        return self


class DatabaseConfig(_Model):
    """A database the site reads (any SQLAlchemy dialect the site has installed), read-only.

    ``url`` is a SQLAlchemy URL without a password (it is published in the
    catalog); give the password with ``password: ${env:NAME}`` and any driver
    arguments in ``connect_args``. Structured queries (``sql.select``,
    ``sql.aggregate``) reach only the listed ``tables``; ``queries`` are offered
    as operations of their own. Rows are fetched ``batch_rows`` at a time through
    a server-side cursor; a result of more than ``max_rows`` rows is refused.
    """

    name: str = Field(pattern=_IDENT)
    url: str = Field(min_length=1)
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    connect_args: dict[str, Any] = Field(default_factory=dict, repr=False)
    tables: list[TableConfig] = Field(default_factory=list)
    queries: list[NamedQueryConfig] = Field(default_factory=list)
    batch_rows: int = Field(default=50_000, ge=1, le=10_000_000)
    max_rows: int = Field(default=10_000_000, ge=1)
    timeout_s: float = Field(default=300.0, gt=0, le=86_400, description="Longest one statement may run.")
    description: str = ""

    @field_validator("tables", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return [_table_shorthand(item) for item in value] if isinstance(value, list) else value

    @field_validator("url")
    @classmethod
    def _no_password(cls, value: str) -> str:
        try:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError
        except ImportError:
            raise ValueError("databases need SQLAlchemy at the site: pip install 'dfm-prefect[sql]'") from None

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("not a SQLAlchemy URL (dialect+driver://user@host:port/database)") from None
        if url.password:
            raise ValueError("the URL must not carry a password (it is published in the catalog); use password: ${env:NAME}")
        return value

    @model_validator(mode="after")
    def _unique(self) -> DatabaseConfig:
        for what, names in (("tables", [t.name for t in self.tables]), ("queries", [q.name for q in self.queries])):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"database {self.name!r}: {what} repeated: {repeated}")
        return self
