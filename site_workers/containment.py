"""Keeps everything a user-code run starts inside that run (Linux): the run's *runner* process.

The site starts this file as a script (``python -I containment.py <site pid>
<status file> -- <command...>``) for every ``code.python`` run. The runner:

- makes itself a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): every
  process the command starts, however deep and even after ``setsid()`` or a
  double fork, is re-parented to the runner when its own parent exits, so it
  stays a descendant the runner can find;
- asks the kernel for SIGTERM when the site process dies
  (``prctl(PR_SET_PDEATHSIG)``), so a killed site does not leave a run behind;
- runs the command, and when it exits, or the site sends SIGTERM (timeout,
  cancellation, shutdown), or the site dies, SIGKILLs every descendant until
  none is left, reaps them, and writes the command's exit status (JSON) to the
  status file.

What it does not stop: code that kills its runner first (it runs as the same OS
user) leaves its descendants to init. A cgroup would close that gap; this site
runtime does not assume a delegated cgroup (see docs/security.md).

It imports nothing but the standard library: it runs outside the site's packages.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_WATCHED = {signal.SIGTERM, signal.SIGCHLD}
STOPPED = "stopped"


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}) failed: {os.strerror(error)}")


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (from /proc; zombies included, they are reaped after)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:  # it exited while we looked
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def kill_descendants() -> None:
    """SIGKILL every descendant and reap them, until this process has no child left."""
    me = os.getpid()
    while True:
        for pid in descendants(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)  # a killed child, or an orphan re-parented here
        except ChildProcessError:
            return


def _wait(child: int) -> int | None:
    """The command's exit code (negative: the signal that ended it), or None if the site said stop."""
    while True:
        if signal.sigwait(_WATCHED) == signal.SIGTERM:
            return None
        while True:  # SIGCHLDs coalesce: reap everything that has exited
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == child:
                return os.waitstatus_to_exitcode(status)


def main(argv: list[str]) -> int:
    site, status_path, command = int(argv[1]), argv[2], argv[4:]
    try:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError as exc:
        with open(status_path, "w") as handle:
            json.dump({"error": str(exc)}, handle)
        return 1
    signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    code: int | None = None
    if os.getppid() == site:  # else the site died before PDEATHSIG was armed: run nothing
        child = os.fork()
        if child == 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            try:
                os.execv(command[0], command)
            finally:
                os._exit(127)
        code = _wait(child)
    kill_descendants()
    with open(status_path, "w") as handle:
        json.dump({"exit": code} if code is not None else {STOPPED: True}, handle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
