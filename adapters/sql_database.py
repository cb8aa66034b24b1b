"""A database a site reads: its engine, the tables its administrator lists, and read-only, streamed execution.

`Database` is built by the site from its config (``databases:``) and handed to
the SQL operations in a closure; clients never see it. Every statement runs in
a read-only transaction (PostgreSQL: ``SET TRANSACTION READ ONLY``; SQLite:
``PRAGMA query_only``) under a statement timeout, is cancelled at the database
when the request is cancelled or times out, and its rows are fetched in
batches through a server-side cursor into a pandas dataframe, refusing a
result of more than ``max_rows`` rows before it is all in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from dfm_prefect.core.errors import AccessDeniedError, InvalidParametersError, OperationFailedError

_CANCEL_TICK_S = 0.25


class Database:
    """One database of a site: a SQLAlchemy engine and the tables (with columns) clients may query."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        connect_args: Mapping[str, Any] | None = None,
        tables: Mapping[str, tuple[str | None, list[str] | None]] | None = None,
        batch_rows: int = 50_000,
        max_rows: int = 10_000_000,
        timeout_s: float = 300.0,
    ) -> None:
        import sqlalchemy as sa
        from sqlalchemy.engine import make_url

        self.name = name
        target = make_url(url)
        if username is not None:
            target = target.set(username=username)
        if password is not None:
            target = target.set(password=password)
        self.dialect = target.get_backend_name()
        self.engine = sa.create_engine(target, connect_args=dict(connect_args or {}), pool_pre_ping=True, pool_size=4, max_overflow=4) \
            if self.dialect != "sqlite" else sa.create_engine(target, connect_args=dict(connect_args or {}))
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_read_only)
        self.allowed = dict(tables or {})
        self.batch_rows = batch_rows
        self.max_rows = max_rows
        self.timeout_s = timeout_s
        self._tables: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Database({self.name!r}, dialect={self.dialect!r})"

    def table(self, name: str) -> Any:
        """The listed table ``name`` as a SQLAlchemy ``Table`` with only its allowed columns (reflected once)."""
        import sqlalchemy as sa

        if name not in self.allowed:
            raise AccessDeniedError(f"table {name!r} is not offered by database {self.name!r}; it offers {sorted(self.allowed)}")
        with self._lock:
            cached = self._tables.get(name)
        if cached is not None:
            return cached
        schema, columns = self.allowed[name]
        try:
            reflected = sa.Table(name, sa.MetaData(), schema=schema, autoload_with=self.engine)
        except sa.exc.NoSuchTableError:
            raise OperationFailedError(f"table {name!r} of database {self.name!r} does not exist (any more)") from None
        keep = [c for c in reflected.columns if columns is None or c.name in columns]
        table = sa.Table(name, sa.MetaData(), *(sa.Column(c.name, c.type) for c in keep), schema=schema)
        with self._lock:
            self._tables[name] = table
        return table

    def describe(self) -> dict[str, Any]:
        """Catalog entry: each listed table's columns and types (from the database's metadata, no rows read)."""
        tables = {}
        for name in self.allowed:
            try:
                tables[name] = {c.name: str(c.type) for c in self.table(name).columns}
            except Exception as exc:  # a missing table is reported, not fatal
                tables[name] = {"error": type(exc).__name__}
        return {"type": "database", "dialect": self.dialect, "tables": tables}

    @contextmanager
    def _connection(self, ctx: Any) -> Iterator[Any]:
        """A read-only transaction with a statement timeout, cancelled at the database when the request is."""
        with self.engine.connect() as conn:
            with conn.begin():
                if self.dialect == "postgresql":
                    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(self.timeout_s * 1000)}")
                done = threading.Event()
                raw = conn.connection.dbapi_connection
                watcher = threading.Thread(target=self._cancel_when_asked, args=(ctx, raw, done), daemon=True, name="dfm-sql-cancel")
                watcher.start()
                try:
                    yield conn
                finally:
                    done.set()
                    watcher.join()

    def _cancel_when_asked(self, ctx: Any, raw: Any, done: threading.Event) -> None:
        # A database call and a cancel cannot be waited on together: check both every tick.
        while not done.is_set():
            if ctx.wait_cancelled(_CANCEL_TICK_S):
                interrupt = getattr(raw, "cancel", None) or getattr(raw, "interrupt", None)
                if interrupt is not None and not done.is_set():
                    interrupt()
                return

    def frame(self, statement: Any, ctx: Any, *, params: Mapping[str, Any] | None = None) -> Any:
        """Run a statement and return its rows as a pandas dataframe, fetched ``batch_rows`` at a time."""
        import pandas as pd
        import sqlalchemy as sa

        parts: list[Any] = []
        rows = 0
        try:
            with self._connection(ctx) as conn:
                result = conn.execution_options(stream_results=True, max_row_buffer=self.batch_rows).execute(statement, dict(params or {}))
                columns = list(result.keys())
                for batch in result.partitions(self.batch_rows):
                    ctx.check_cancelled()
                    rows += len(batch)
                    if rows > self.max_rows:
                        raise OperationFailedError(
                            f"the query returns more than {self.max_rows} rows, the most database {self.name!r} returns; "
                            "filter or aggregate more at the database"
                        )
                    parts.append(pd.DataFrame.from_records([tuple(r) for r in batch], columns=columns))
                    ctx.progress(0.0, f"{rows} rows read")
        except sa.exc.DBAPIError as exc:
            ctx.check_cancelled()
            raise _database_error(exc, self.name, self.timeout_s) from None
        if not parts:
            return pd.DataFrame({name: pd.Series(dtype="object") for name in columns})
        frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        return _plain_dtypes(frame)

    def scalar(self, statement: Any, ctx: Any) -> Any:
        """One value (a count)."""
        import sqlalchemy as sa

        try:
            with self._connection(ctx) as conn:
                return conn.execute(statement).scalar_one()
        except sa.exc.DBAPIError as exc:
            ctx.check_cancelled()
            raise _database_error(exc, self.name, self.timeout_s) from None

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_read_only(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only = ON")
    cursor.close()


def _database_error(exc: Any, name: str, timeout_s: float) -> Exception:
    """A message that says what went wrong without quoting the database's own text (it may quote rows)."""
    original = getattr(exc, "orig", None)
    kind = type(original).__name__ if original is not None else type(exc).__name__
    sqlstate = getattr(original, "sqlstate", None) or getattr(getattr(original, "diag", None), "sqlstate", None)
    if sqlstate == "57014" or kind in ("QueryCanceled", "OperationalError") and "interrupt" in str(original).lower():
        return OperationFailedError(f"the query at database {name!r} was stopped: it ran past {timeout_s:g} s or was cancelled")
    if sqlstate and sqlstate.startswith("22") or kind in ("DataError",):
        return InvalidParametersError(f"database {name!r} rejected a value of the query ({kind}); check parameter types")
    return OperationFailedError(f"database {name!r} failed the query ({kind}{', SQLSTATE ' + sqlstate if sqlstate else ''})")


def _plain_dtypes(frame: Any) -> Any:
    """Decimal columns (PostgreSQL ``numeric``, e.g. sums) as float64, so results are ordinary numbers."""
    import decimal

    import pandas as pd

    for column in frame.columns:
        series = frame[column]
        if series.dtype == object:
            sample = series.dropna()
            if len(sample) and isinstance(sample.iloc[0], decimal.Decimal):
                frame[column] = pd.to_numeric(series.astype("float64"))
    return frame
