"""Confines one program run (Linux): resource limits, writes only under its scratch directory, no TCP.

The site starts this file as a script between the containment runner and the
program (``python -I sandbox.py <json settings> -- <executable> <args...>``).
It sets the run's resource limits, asks the kernel through Landlock to refuse
every write, removal, creation, rename, link or truncation outside the scratch
directory (reads stay allowed: the program needs its libraries), optionally
forbids TCP ``bind`` and ``connect`` (Landlock ABI 4, Linux 6.7+), sets
``no_new_privs``, and ``execv``s the program. The restrictions hold for the
program and everything it starts, and cannot be lifted from inside.

Where Landlock is missing (an older kernel, or it is not enabled) and the
settings require it, it runs nothing and exits with :data:`UNCONFINED`.

It imports nothing but the standard library: it runs outside the site's packages.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

UNCONFINED = 86
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_VERSION_FLAG = 1
_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
# Landlock filesystem rights that change something (ABI 1), then REFER (ABI 2) and TRUNCATE (ABI 3).
_WRITE_FILE, _REMOVE_DIR, _REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
_MAKES = sum(1 << bit for bit in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_REFER, _TRUNCATE = 1 << 13, 1 << 14
_NET_BIND_TCP, _NET_CONNECT_TCP = 1, 2


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi(libc: ctypes.CDLL) -> int:
    """The kernel's Landlock ABI version (0: none)."""
    version = libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_VERSION_FLAG))
    return max(int(version), 0)


def confine_writes(scratch: str, *, network: bool) -> None:
    """Allow writes only beneath ``scratch`` (and TCP only if ``network``) for this process and its children."""
    libc = ctypes.CDLL(None, use_errno=True)
    abi = landlock_abi(libc)
    if abi < 1:
        raise OSError("Landlock is not available in this kernel")
    handled = _WRITE_FILE | _REMOVE_DIR | _REMOVE_FILE | _MAKES | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    net = 0 if network or abi < 4 else _NET_BIND_TCP | _NET_CONNECT_TCP
    attr = _RulesetAttr(handled, net)
    size = ctypes.sizeof(attr) if abi >= 4 else 8
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    for path, allowed in ((scratch, handled), ("/dev/null", _WRITE_FILE | (_TRUNCATE if abi >= 3 else 0))):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            rule = _PathBeneathAttr(allowed, fd)
            if libc.syscall(_ADD_RULE, ruleset, _PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule({path}) failed")
        finally:
            os.close(fd)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.syscall(_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)


def main(argv: list[str]) -> int:
    settings, command = json.loads(argv[1]), argv[3:]
    for name, value in settings["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if settings["confine"]:
        try:
            confine_writes(settings["scratch"], network=settings["network"])
        except OSError as exc:
            print(f"cannot confine the program: {exc}", file=sys.stderr)
            return UNCONFINED
    os.execv(command[0], command)
    return 127  # not reached: execv replaces this process or raises


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
