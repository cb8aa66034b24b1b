"""A local process that found some ports and tries to run code through Dask on them.

Run as ``python -m tests.dask_intruder MARKER PORT...``: for each port on
127.0.0.1 it asks who is there in Dask's own protocol and connects a Dask
client, each in clear (``tcp://``) and over TLS with a certificate of its own,
and asks for an HTTP page. Where a client gets in, it has a task and every
worker write ``MARKER``. It prints one JSON object, attempt -> outcome
(``refused: ...``, ``answered: ...``, ``ran``, ``no answer``), and exits within
about ``DEADLINE_S`` whatever the ports do.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ATTEMPT_S = 3.0
"""How long one attempt may try to connect (Dask retries a failed handshake until then)."""
DEADLINE_S = 40.0


async def _identity(address: str, security: Any) -> Any:
    from distributed.comm import connect

    args = security.get_connection_args("client") if security is not None else {}
    comm = await connect(address, timeout=ATTEMPT_S, **args)
    try:
        await comm.write({"op": "identity"})
        return await asyncio.wait_for(comm.read(), ATTEMPT_S)
    finally:
        comm.abort()


def ask_identity(address: str, security: Any) -> str:
    try:
        return f"answered: {asyncio.run(_identity(address, security))}"[:300]
    except (OSError, asyncio.TimeoutError) as exc:  # Dask reports a refused handshake as OSError (timed out)
        return f"refused: {type(exc).__name__}"


def run_code(address: str, marker: Path, security: Any) -> str:
    from distributed import Client

    try:
        client = Client(address, security=security, timeout=f"{ATTEMPT_S}s", set_as_default=False)
    except OSError as exc:
        return f"refused: {type(exc).__name__}"
    try:
        client.submit(Path.write_text, marker, "owned by a task").result(timeout=10)
        client.run(Path.write_text, marker, "owned on every worker")
        return "ran"
    finally:
        client.close()


def http_get(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info/main/workers.html", timeout=ATTEMPT_S) as response:
            return f"answered: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"answered: HTTP {exc.code}"
    except OSError as exc:  # URLError, a reset or a closed connection: nothing served
        return f"refused: {type(exc).__name__}"


def attack(marker: Path, ports: list[int]) -> dict[str, str]:
    from distributed.security import Security

    intruder = Security.temporary()  # a certificate of the attacker's own, not signed by the cluster's CA
    attempts: dict[str, Any] = {}
    for port in ports:
        clear, tls = f"tcp://127.0.0.1:{port}", f"tls://127.0.0.1:{port}"
        attempts[f"identity {clear}"] = (ask_identity, clear, None)
        attempts[f"identity {tls} with its own certificate"] = (ask_identity, tls, intruder)
        attempts[f"run code {clear}"] = (run_code, clear, marker, None)
        attempts[f"run code {tls} with its own certificate"] = (run_code, tls, marker, intruder)
        attempts[f"http {port}"] = (http_get, port)
    outcomes = dict.fromkeys(attempts, "no answer")

    def one(name: str, function: Any, *args: Any) -> None:
        outcomes[name] = function(*args)

    threads = [threading.Thread(target=one, args=(name, *attempt), daemon=True) for name, attempt in attempts.items()]
    deadline = time.monotonic() + DEADLINE_S
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return outcomes


if __name__ == "__main__":
    marker, *ports = sys.argv[1:]
    print(json.dumps(attack(Path(marker), [int(port) for port in ports])), flush=True)
    os._exit(0)  # threads still stuck on a port must not keep this process alive
