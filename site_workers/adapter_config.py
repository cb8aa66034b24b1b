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


class ProgramInput(_Model):
    """A `DataRef` (or source) staged into the scratch directory as ``<name>.<format>`` before the program starts."""

    format: Literal["csv", "parquet", "json", "netcdf"] = "csv"
    description: str = ""


class ProgramOutput(_Model):
    """The file in the scratch directory that becomes the result, and how it is read."""

    path: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", description="A file name in the scratch directory.")
    format: Literal["csv", "parquet", "json", "text"] = "json"
    kind: Literal["value", "table", "aggregate"] = "value"
    max_bytes: int = Field(default=64 << 20, ge=1)


class ProgramConfig(_Model):
    """A command-line program offered as the operation ``program.<name>``; it runs with no shell, ever.

    ``argv`` is a template: each item is one argument, and ``{param}`` in it is
    replaced by a typed parameter's value, or by the staged file of an input
    (an argument never splits, whatever a value holds). The program runs in a
    fresh scratch directory it alone may write to (Landlock; the run is refused
    where the kernel cannot confine it, unless ``confine_writes: false``),
    without the site's environment, under the same CPU, memory, file-size and
    wall-clock limits as ``code.python``, and with every process it starts
    killed when it ends.

    Example::

        programs:
          - name: smooth
            executable: /opt/tools/smooth
            argv: [--window, "{window}", --in, "{series}", --out, smoothed.csv]
            params: {window: {type: integer, minimum: 1, maximum: 365}}
            inputs: {series: {format: csv}}
            output: {path: smoothed.csv, format: csv, kind: table}
    """

    name: str = Field(pattern=_IDENT)
    executable: str = Field(pattern=r"^/", description="Absolute path of the program.")
    argv: list[str] = Field(default_factory=list, max_length=1024)
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    inputs: dict[str, ProgramInput] = Field(default_factory=dict)
    output: ProgramOutput
    description: str = ""
    env: dict[str, str] = Field(default_factory=dict, description="The program's whole environment besides PATH, HOME, TMPDIR, LANG.")
    timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    cpu_s: int = Field(default=300, ge=1, le=86_400)
    memory_bytes: int = Field(default=2 << 30, ge=64 << 20)
    max_file_bytes: int = Field(default=256 << 20, ge=1024, description="Largest file (or printed output) the program may write.")
    confine_writes: bool = Field(default=True, description="Refuse to run where Landlock cannot keep its writes in its scratch directory.")
    network: bool = Field(default=False, description="Let it open TCP connections (Linux 6.7+ can forbid them; older kernels cannot).")

    @model_validator(mode="after")
    def _placeholders_known(self) -> ProgramConfig:
        names = set(self.params) | set(self.inputs)
        both = sorted(set(self.params) & set(self.inputs))
        if both:
            raise ValueError(f"program {self.name!r}: {both} are both parameters and inputs")
        bad = [p for p in names if not re.match(_IDENT, p)]
        if bad:
            raise ValueError(f"program {self.name!r}: parameter and input names are lowercase identifiers: {bad}")
        used = {m for item in self.argv for m in re.findall(r"\{([^{}]*)\}", item)}
        unknown = sorted(used - names)
        if unknown:
            raise ValueError(f"program {self.name!r}: argv uses {unknown}, which are neither params nor inputs")
        return self


class ServiceOperation(_Model):
    """How one operationId of a service is offered: what its answer becomes, and whether a `DataRef` feeds its body.

    With ``data_field`` the operation takes a ``data`` parameter (a table held at
    the site, or a table source) and sends its rows as that field of the JSON
    body (a list of records). ``response_field`` picks one field of the JSON
    answer. For a ``table`` result, ``append_to_input`` adds the answer (one value
    per input row) to the input rows as that column (scores, predictions).
    """

    result: Literal["value", "table"] = "value"
    data_field: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    response_field: str | None = Field(default=None, min_length=1, max_length=128)
    append_to_input: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    description: str = ""

    @model_validator(mode="after")
    def _append_needs_input(self) -> ServiceOperation:
        if self.append_to_input and not (self.data_field and self.result == "table"):
            raise ValueError("append_to_input needs data_field and result: table")
        return self


class ServiceConfig(_Model):
    """An HTTP service the site calls on clients' behalf: only the operationIds listed, only at ``base_url``.

    ``openapi`` is the service's OpenAPI 3 document (JSON or YAML), a file the
    administrator ships with the config; each listed operationId becomes the
    operation ``service.<name>.<operation_id in snake_case>`` whose parameters
    (path, query and JSON body) are checked against that document before any
    call. ``headers`` carry the site's credentials (``${env:NAME}``), never a
    client's. Redirects are not followed; an answer slower than ``timeout_s``
    or larger than ``max_response_bytes`` is cut off.

    Example::

        services:
          - name: risk
            base_url: http://models.internal:8080
            openapi: /etc/dfm/risk-openapi.json
            headers: {Authorization: "Bearer ${env:RISK_MODEL_TOKEN}"}
            operations:
              predict: {result: table, data_field: rows, response_field: predictions, append_to_input: risk}
    """

    name: str = Field(pattern=_IDENT)
    base_url: str = Field(pattern=r"^https?://[^/?#@]+(/[^?#]*)?$", description="Scheme, host, port and path prefix; no credentials.")
    openapi: str = Field(min_length=1, description="Path of the service's OpenAPI document at the site.")
    operations: dict[str, ServiceOperation] = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    timeout_s: float = Field(default=30.0, gt=0, le=3600, description="Longest a call may take, start to last byte.")
    max_response_bytes: int = Field(default=16 << 20, ge=1)
    max_request_bytes: int = Field(default=64 << 20, ge=1)
    description: str = ""
