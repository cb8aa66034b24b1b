"""``code.python``: run Python source sent by a client, in a separate, limited process (opt-in only).

A site offers this operation only if its administrator lists ``code.python``
in ``operations`` *and* sets ``user_code: {enabled: true}``; the config is
refused otherwise, and this module is imported only on sites that opted in.
Read docs/security.md before enabling it: whoever can reach the site can then
run programs as the site's OS user.

What a run gets: the source is written to a private scratch directory and run
by a fresh interpreter (``python -I``: no ``PYTHON*`` variables, no user site,
no current directory on the path) in its own session, with an environment that
holds none of the site's variables (so none of its credentials), CPU-time,
address-space, file-size and core-dump limits, and a wall-clock timeout. A
runner process (`site_workers.containment`, a child subreaper) sits between the
site and the code: when the code ends, times out or is cancelled, or the site
dies, every process the code started (even one that left its session with
``setsid()``) is killed with it. The site process never compiles or runs the
source itself. The code sees its JSON ``inputs`` as the global
``inputs`` and returns a JSON value by setting the global ``result``; what it
prints comes back as log lines (if the site shares logs).

Example (in a flow):

```python
from site_workers.user_code import run_python

ref = run_python.submit(source="result = sum(inputs)", inputs=[1, 2, 3], site="lab")
ref.result().fetch()   # 6
```
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import Field, JsonValue

from dfm_prefect.core.errors import InvalidParametersError, OperationFailedError, UnknownOperationError
from dfm_prefect.core.operations import OperationParams, operation
from site_workers import containment
from site_workers.config import USER_CODE_OPERATION, UserCodePolicy

# Runs in the child, never in the site: set the limits, then run the client's file as __main__.
_BOOTSTRAP = """\
import json, resource, runpy, sys
script, limits, result_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
for name, value in limits.items():
    resource.setrlimit(getattr(resource, name), (value, value))
with open("inputs.json") as handle:
    inputs = json.load(handle)
namespace = runpy.run_path(script, init_globals={"inputs": inputs}, run_name="__main__")
with open(result_path, "w") as handle:
    json.dump(namespace.get("result"), handle, allow_nan=False)
"""
_TAIL = 4000
_MASK_MARGIN = 4096
_TICK = 0.1
_RUNNER_GRACE_S = 10.0


class PythonParams(OperationParams):
    source: str = Field(min_length=1, max_length=16 << 20, description="Python source; set the global `result`.")
    inputs: JsonValue = Field(default=None, description="JSON value the code sees as the global `inputs`.")
    timeout_s: float | None = Field(default=None, gt=0, le=3600, description="At most the site's user_code.timeout_s.")


@operation(USER_CODE_OPERATION, version="1", result="value")
def run_python(params: PythonParams, ctx: Any) -> JsonValue:
    """Run Python source in a separate, resource-limited process and return its JSON ``result`` (opt-in sites only)."""
    policy: UserCodePolicy = ctx.user_code
    if not policy.enabled:  # the worker never offers it then; this guards direct use
        raise UnknownOperationError("this site does not run code sent by clients (user_code.enabled is false)")
    size = len(params.source.encode("utf-8"))
    if size > policy.max_source_bytes:
        raise InvalidParametersError(f"the source is {size} bytes; this site runs at most {policy.max_source_bytes}")
    timeout = min(params.timeout_s or policy.timeout_s, policy.timeout_s)
    with tempfile.TemporaryDirectory(prefix="dfm-user-code-") as scratch:
        return _run(Path(scratch), params, policy, timeout, ctx)


def _limits(policy: UserCodePolicy) -> dict[str, int]:
    return {
        "RLIMIT_CPU": policy.cpu_s,
        "RLIMIT_AS": policy.memory_bytes,
        "RLIMIT_FSIZE": policy.max_output_bytes,
        "RLIMIT_CORE": 0,
    }


def _environment(scratch: Path) -> dict[str, str]:
    # Nothing from the site's own environment: that is where its credentials live.
    single = "1"
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": single,
        "OPENBLAS_NUM_THREADS": single,
        "MKL_NUM_THREADS": single,
    }


def _run(scratch: Path, params: PythonParams, policy: UserCodePolicy, timeout: float, ctx: Any) -> JsonValue:
    script = scratch / "user_code.py"
    script.write_text(params.source)
    (scratch / "inputs.json").write_text(json.dumps(params.inputs))
    result_path, status_path = scratch / "result.json", scratch / "status.json"
    code = [sys.executable, "-I", "-c", _BOOTSTRAP, str(script), json.dumps(_limits(policy)), str(result_path)]
    command = [sys.executable, "-I", containment.__file__, str(os.getpid()), str(status_path), "--", *code]
    with open(scratch / "output.txt", "wb") as output:
        process = subprocess.Popen(
            command,
            cwd=scratch,
            env=_environment(scratch),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
        timed_out = False
        try:
            deadline = time.monotonic() + timeout
            # A child's exit and the client's cancel cannot be waited on together: check
            # both every tick, which bounds how late either is noticed.
            while process.poll() is None:
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                if ctx.wait_cancelled(_TICK):
                    break
        finally:
            _stop(process)
    ctx.check_cancelled()
    output = scratch / "output.txt"
    printed = _tail(output, ctx)
    if timed_out:
        raise OperationFailedError(f"the code ran past its {timeout:g} s limit and was stopped")
    returncode = _exit_code(status_path, printed)
    if returncode != 0:
        reason = _exit_reason(returncode, policy, output.stat().st_size)
        raise OperationFailedError(f"the code failed ({reason}); the end of its output:\n{printed}")
    if printed:
        ctx.log.info("output of the code:\n%s", printed)
    return _result(result_path, policy)


def _stop(runner: subprocess.Popen[bytes]) -> None:
    """Have the runner kill everything the code started, then make sure the runner itself is gone."""
    if runner.poll() is None:
        runner.send_signal(signal.SIGTERM)
        try:
            runner.wait(_RUNNER_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(runner.pid, signal.SIGKILL)  # what is left of its session, if the runner was stuck
    except ProcessLookupError:
        pass
    runner.wait()


def _exit_code(status_path: Path, printed: str) -> int:
    """The code's exit status as its runner recorded it."""
    try:
        status = json.loads(status_path.read_text())
    except (OSError, ValueError):
        raise OperationFailedError(f"the user-code runner ended without a status; the end of its output:\n{printed}") from None
    if "error" in status:
        raise OperationFailedError(
            f"this site cannot contain user code ({status['error']}); its administrator must run it where "
            "prctl(PR_SET_CHILD_SUBREAPER) is allowed"
        )
    return int(status["exit"]) if status.get("exit") is not None else -signal.SIGKILL


def _tail(path: Path, ctx: Any) -> str:
    """The end of what the code printed, masked before it is cut (the margin is longer than any secret)."""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - _TAIL - _MASK_MARGIN))
        text = ctx.mask(handle.read().decode("utf-8", "replace"))
    return text[-_TAIL:].strip()


def _exit_reason(code: int, policy: UserCodePolicy, printed_bytes: int) -> str:
    if printed_bytes >= policy.max_output_bytes:
        # Python ignores SIGXFSZ: the write fails instead and the interpreter exits.
        return f"it printed more than {policy.max_output_bytes} bytes"
    reasons = {
        -signal.SIGXCPU: f"it used up its {policy.cpu_s} s of CPU time",
        -signal.SIGXFSZ: f"it wrote more than {policy.max_output_bytes} bytes",
        -signal.SIGKILL: "it was killed (out of memory, or stopped)",
    }
    return reasons.get(code, f"exit status {code}")


def _result(path: Path, policy: UserCodePolicy) -> JsonValue:
    if not path.exists():
        raise OperationFailedError("the code ended without a result")
    size = path.stat().st_size
    if size > policy.max_output_bytes:
        raise OperationFailedError(f"the result is {size} bytes; this site returns at most {policy.max_output_bytes}")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise OperationFailedError("the code's result is not JSON; set `result` to a JSON value") from None
