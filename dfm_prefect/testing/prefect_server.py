"""A local `prefect server start` (sqlite) on a free loopback port, for demos, tests and benchmarks.

Example:

```python
with LocalPrefectServer() as api_url:
    my_flow()          # reports to the local server
```
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from dfm_prefect.transports.base import free_port


class LocalPrefectServer:
    """Starts a Prefect API server and points this process (and its children) at it."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *, timeout: float = 120.0, ui: bool = False) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="dfm-prefect-home-") if home is None else None
        self.home = Path(home) if home is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.port = free_port()
        self.timeout = timeout
        self.ui = ui
        self.process: subprocess.Popen[bytes] | None = None
        self._stack = ExitStack()
        self._previous_env: str | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> str:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self.home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true" if self.ui else "false",
            "PREFECT_API_URL": "",
        }
        log = self._stack.enter_context(open(self.home / "server.log", "wb"))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self._previous_env = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = self.api_url  # for child processes
        self._stack.enter_context(temporary_settings({PREFECT_API_URL: self.api_url}))
        return self.api_url

    def _wait_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.timeout
        delay = 0.1
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.home / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"prefect server exited with code {self.process.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(delay)  # the server gives no readiness signal besides answering
            delay = min(delay * 1.5, 1.0)
        raise RuntimeError(f"prefect server did not answer on {self.api_url} within {self.timeout}s")

    def stop(self) -> None:
        self._drain_clients()
        if self._previous_env is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = self._previous_env
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
            except ProcessLookupError:
                pass
        self._stack.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    @staticmethod
    def _drain_clients() -> None:
        """Send the logs and events this process still holds before the server goes away."""
        try:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
            EventsWorker.drain_all(timeout=5)
        except Exception:  # best effort: nothing depends on it
            pass

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
