"""A real PostgreSQL server on 127.0.0.1 for tests, benchmarks and demos.

It runs the server binaries of the machine's PostgreSQL install (Debian's
``postgresql`` package: ``/usr/lib/postgresql/<version>/bin``; ``$DFM_PG_BIN``
names another directory) in a fresh temporary cluster with password
authentication (SCRAM) on a free loopback port and no Unix socket, and removes
the cluster when stopped. PostgreSQL refuses to run as root, so as root the
server runs as the ``postgres`` user when there is one, else as ``nobody``.

Example:

```python
from dfm_prefect.testing.postgres import LocalPostgres

with LocalPostgres() as pg:
    pg.execute("CREATE TABLE t (x int)")
    url = pg.url(password=False)      # postgresql+psycopg://dfm@127.0.0.1:PORT/dfm, password in pg.password
```
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from dfm_prefect.transports.base import free_port


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def server_binaries() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``."""
    candidates = [os.environ.get("DFM_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for candidate in candidates:
        if candidate and all((Path(candidate) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found; install Debian's postgresql package "
        "(./dev test does so when it can) or set DFM_PG_BIN to their directory"
    )


def _run_as() -> str | None:
    """The unprivileged user to run the server as when this process is root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return user
    raise PostgresUnavailable("running as root and there is no postgres or nobody user to run PostgreSQL as")


class LocalPostgres:
    """A throwaway PostgreSQL cluster: one database ``dfm`` owned by the superuser ``dfm`` with a random password."""

    def __init__(self, port: int | None = None, user: str = "dfm", database: str = "dfm") -> None:
        self.port = port or free_port()
        self.user = user
        self.database = database
        self.password = secrets.token_urlsafe(18)
        self._bin = server_binaries()
        self._as = _run_as()
        self._root: Path | None = None

    def url(self, *, password: bool = True, driver: str = "psycopg", database: str | None = None) -> str:
        """A SQLAlchemy URL for a database (default: ``dfm``; without the password when ``password=False``)."""
        secret = f":{self.password}" if password else ""
        return f"postgresql+{driver}://{self.user}{secret}@127.0.0.1:{self.port}/{database or self.database}"

    def create_database(self, name: str) -> str:
        """Create another database on this server; return its URL (with the password)."""
        import sqlalchemy as sa

        engine = sa.create_engine(self.url(database="postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()
        return self.url(database=name)

    def _cmd(self, *argv: str) -> list[str]:
        return ["runuser", "-u", self._as, "--", *argv] if self._as else list(argv)

    def start(self) -> LocalPostgres:
        # Not under pytest's tmp dirs: those are private to root, and the server may run as another user.
        self._root = Path(tempfile.mkdtemp(prefix="dfm-pg-"))
        data = self._root / "data"
        pwfile = self._root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            entry = pwd.getpwnam(self._as)
            for path in (self._root, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        pwfile.chmod(0o600)
        subprocess.run(
            self._cmd(str(self._bin / "initdb"), "-D", str(data), "-U", self.user, f"--pwfile={pwfile}",
                      "-A", "scram-sha-256", "-E", "UTF8", "--no-sync", "--locale=C"),
            check=True, capture_output=True, timeout=120,
        )
        pwfile.unlink()
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' -c fsync=off -c max_connections=50"
        result = subprocess.run(
            self._cmd(str(self._bin / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(self._root / "server.log"), "-w", "-t", "60", "start"),
            capture_output=True, text=True, timeout=90,
        )
        if result.returncode != 0:
            log = (self._root / "server.log").read_text() if (self._root / "server.log").exists() else ""
            self.stop()
            raise PostgresUnavailable(f"PostgreSQL did not start: {result.stderr.strip()} {log[-2000:]}")
        self.create_database(self.database)
        return self

    def execute(self, *statements: str) -> None:
        """Run SQL statements as the superuser (test setup only)."""
        import sqlalchemy as sa

        engine = sa.create_engine(self.url())
        try:
            with engine.begin() as conn:
                for statement in statements:
                    conn.exec_driver_sql(statement)
        finally:
            engine.dispose()

    def engine(self, database: str | None = None):  # type: ignore[no-untyped-def]
        """A SQLAlchemy engine as the superuser (dispose it when done)."""
        import sqlalchemy as sa

        return sa.create_engine(self.url(database=database))

    def stop(self) -> None:
        if self._root is None:
            return
        data = self._root / "data"
        if (data / "postmaster.pid").exists():
            subprocess.run(self._cmd(str(self._bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"),
                           capture_output=True, timeout=60)
        shutil.rmtree(self._root, ignore_errors=True)
        self._root = None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
