"""A small internet on one machine: one network namespace per host, point-to-point links, shaped bandwidth.

Tests and benchmarks use it to run a federation the way it is deployed: the
FLARE server on ``hub``, each site on a host of its own, the flow on
``client``, an S3 endpoint on ``cloud`` that only one site reaches. Each host
knows the others by name through its own hosts file (``/etc/netns/<ns>/hosts``,
which ``ip netns exec`` puts in place of ``/etc/hosts``). Only the links made
here exist and no host forwards packets, so a site linked to ``hub`` alone
reaches the server and nothing else: another site's name resolves, but no
route leads there.

Needs root and iproute2 (``ip``, ``tc``); :func:`unavailable` says why not.
Everything it made (namespaces, links, hosts files, the processes started in
them) is removed by :meth:`Internet.close`, also when the code using it failed.

Example (as root):

```python
from dfm_prefect.testing.netns import Internet

with Internet(["hub", "north", "client"], [("hub", "north"), ("hub", "client")]) as net:
    print(net.run("client", ["getent", "hosts", "hub.dfm.test"]).stdout)
    print(net.reachable("north", "client", 22))  # False: north's only link goes to hub
```
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

NETNS_ETC = Path("/etc/netns")
OWNERS = Path("/run/dfm-netns")
"""One file per namespace made here, holding the pid of the process that made it."""
PROBE = """
import socket, sys, time
host, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + wait
while True:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
        print("open")
        break
    except OSError as exc:
        if time.monotonic() >= deadline:
            print(type(exc).__name__, exc)
            break
        time.sleep(0.2)
"""


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no iproute2, no permission), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    resolve = "import socket; print(socket.gethostbyname('b.dfm.test'))"
    try:
        with Internet(["a", "b"], [("a", "b")]) as net:
            done = net.run("a", [sys.executable, "-c", resolve], timeout=30)
            if done.returncode != 0 or done.stdout.strip() != net.address("b", "a"):
                return f"a process in a namespace cannot run or find the other host by name: {done.stderr.strip()[-300:]}"
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot build network namespaces here: {exc}"
    return None


@dataclass(frozen=True)
class Link:
    """A veth pair between two hosts, with one address at each end."""

    a: str
    b: str
    a_if: str
    b_if: str
    a_addr: str
    b_addr: str

    def end(self, host: str) -> tuple[str, str]:
        """(interface, address) of this link on ``host``."""
        return (self.a_if, self.a_addr) if host == self.a else (self.b_if, self.b_addr)

    def other(self, host: str) -> str:
        return self.b if host == self.a else self.a


class Internet:
    """Hosts (network namespaces) joined by the given links; ``rate`` shapes every link (``"100mbit"``).

    ``router``: a host that forwards packets between its links, and that every
    host linked to it uses as its default route (a benchmark's "internet");
    without one, no host forwards and each reaches only its direct neighbours.
    """

    def __init__(
        self, hosts: Sequence[str], links: Sequence[tuple[str, str]], *, domain: str = "dfm.test", rate: str | None = None,
        router: str | None = None,
    ) -> None:  # fmt: skip
        unknown = {h for pair in links for h in pair} - set(hosts)
        if unknown:
            raise ValueError(f"links name hosts that are not listed: {sorted(unknown)}")
        self.hosts = list(hosts)
        self.domain = domain
        self.tag = secrets.token_hex(2)
        self.links = [
            Link(a, b, f"v{self.tag}-{i}a", f"v{self.tag}-{i}b", f"10.250.{i}.1", f"10.250.{i}.2") for i, (a, b) in enumerate(links)
        ]
        self.rate = rate
        if router is not None and router not in hosts:
            raise ValueError(f"router {router!r} is not one of the hosts")
        self.router = router
        self.processes: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []

    # ----------------------------------------------------------------- naming

    def ns(self, host: str) -> str:
        return f"dfm-{self.tag}-{host}"

    def name(self, host: str) -> str:
        """The host's DNS name, as every other host's hosts file has it."""
        return f"{host}.{self.domain}"

    def link(self, a: str, b: str) -> Link:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        raise KeyError(f"no link between {a} and {b}")

    def address(self, host: str, seen_from: str) -> str:
        """The address ``seen_from`` uses for ``host``: the direct link's, else the host's first link's."""
        try:
            return self.link(host, seen_from).end(host)[1]
        except KeyError:
            own = [link for link in self.links if host in (link.a, link.b)]
            return own[0].end(host)[1] if own else "127.0.0.1"

    # --------------------------------------------------------------- lifetime

    def __enter__(self) -> Internet:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        sweep_stale()
        for host in self.hosts:
            _ip("netns", "add", self.ns(host))
            self._made.append(host)
            OWNERS.mkdir(parents=True, exist_ok=True)
            (OWNERS / self.ns(host)).write_text(str(os.getpid()))
            _ip("-n", self.ns(host), "link", "set", "lo", "up")
        for link in self.links:
            _ip("link", "add", link.a_if, "netns", self.ns(link.a), "type", "veth", "peer", "name", link.b_if, "netns", self.ns(link.b))
            for host in (link.a, link.b):
                interface, address = link.end(host)
                _ip("-n", self.ns(host), "addr", "add", f"{address}/24", "dev", interface)
                _ip("-n", self.ns(host), "link", "set", interface, "up")
            if self.rate:
                self.shape(link.a, link.b, self.rate)
        if self.router is not None:
            _ip("netns", "exec", self.ns(self.router), "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            for link in self.links:
                if self.router in (link.a, link.b):
                    host = link.other(self.router)
                    _ip("-n", self.ns(host), "route", "add", "default", "via", link.end(self.router)[1])
        for host in self.hosts:
            etc = NETNS_ETC / self.ns(host)
            etc.mkdir(parents=True, exist_ok=True)
            lines = ["127.0.0.1 localhost", f"127.0.1.1 {self.name(host)} {host}"]
            lines += [f"{self.address(other, host)} {self.name(other)} {other}" for other in self.hosts if other != host]
            (etc / "hosts").write_text("\n".join(lines) + "\n")

    def close(self) -> None:
        """Stop every process in the namespaces, then remove the namespaces, their links and hosts files."""
        for host in self._made:
            _remove_namespace(self.ns(host))
        for process in self.processes:  # killed with their namespace: reap them
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
        self._made = []
        try:
            NETNS_ETC.rmdir()  # only if nothing else uses it
        except OSError:
            pass

    # -------------------------------------------------------------- processes

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def popen(
        self, host: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
        log: IO[bytes] | None = None, stdout: Any = None,
    ) -> subprocess.Popen[Any]:  # fmt: skip
        """Start ``argv`` on ``host``; it is stopped by :meth:`close` if it still runs."""
        out = stdout if stdout is not None else (log if log is not None else subprocess.DEVNULL)
        process = subprocess.Popen(
            self.command(host, argv), env=dict(env) if env is not None else None, cwd=cwd, stdout=out,
            stderr=subprocess.STDOUT if log is not None or stdout is not None else subprocess.DEVNULL,
        )  # fmt: skip
        self.processes.append(process)
        return process

    def run(self, host: str, argv: Sequence[str], *, timeout: float = 120.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(host, argv), capture_output=True, text=True, timeout=timeout, **kwargs)

    def probe(self, host: str, target: str, port: int, wait: float = 0.0) -> str:
        """From ``host``, connect to ``target`` (a host of this internet, or an address): "open" or the error."""
        address = self.name(target) if target in self.hosts else target
        done = self.run(host, [sys.executable, "-c", PROBE, address, str(port), str(wait)], timeout=wait + 30)
        return (done.stdout.strip() or done.stderr.strip()).splitlines()[-1]

    def reachable(self, host: str, target: str, port: int) -> bool:
        return self.probe(host, target, port) == "open"

    def wait_port(self, host: str, target: str, port: int, timeout: float = 60.0) -> None:
        found = self.probe(host, target, port, wait=timeout)
        if found != "open":
            raise TimeoutError(f"{target}:{port} did not open within {timeout:.0f}s as seen from {host}: {found}")

    # ------------------------------------------------------------------ links

    def shape(self, a: str, b: str, rate: str) -> None:
        """Limit the link between ``a`` and ``b`` to ``rate`` in each direction (a token bucket on each end)."""
        link = self.link(a, b)
        burst = max(32 * 1024, _bits(rate) // 8 // 250)  # at least one timer tick's worth of bytes
        for host in (link.a, link.b):
            interface = link.end(host)[0]
            _tc("-n", self.ns(host), "qdisc", "replace", "dev", interface, "root", "tbf", "rate", rate, "burst", str(burst), "latency", "100ms")

    def cut(self, a: str, b: str) -> None:
        """Take the link down at both ends, as a pulled cable or a failed router would."""
        link = self.link(a, b)
        for host in (link.a, link.b):
            _ip("-n", self.ns(host), "link", "set", link.end(host)[0], "down")

    def restore(self, a: str, b: str) -> None:
        link = self.link(a, b)
        for host in (link.a, link.b):
            _ip("-n", self.ns(host), "link", "set", link.end(host)[0], "up")


def _kill_namespace(ns: str, grace: float = 5.0) -> None:
    def pids() -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids() and time.monotonic() < deadline:
            time.sleep(0.1)


def _remove_namespace(ns: str) -> None:
    """Stop every process in ``ns``, then delete it (its links go with it), its hosts file and owner record."""
    _kill_namespace(ns)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    (OWNERS / ns).unlink(missing_ok=True)


def sweep_stale() -> list[str]:
    """Remove the namespaces (and their processes) of an `Internet` whose process died without closing it."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    removed = []
    for ns in (line.split()[0] for line in listed.splitlines() if line.startswith("dfm-")):
        try:
            owner = int((OWNERS / ns).read_text())
            os.kill(owner, 0)
            continue  # its owner still runs
        except (OSError, ValueError):
            pass
        _remove_namespace(ns)
        removed.append(ns)
    return removed


def _bits(rate: str) -> int:
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, factor in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * factor)
    raise ValueError(f"rate {rate!r}: use kbit, mbit or gbit")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _tc(*args: str) -> None:
    done = subprocess.run(["tc", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")
